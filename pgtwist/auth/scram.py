"""SCRAM-SHA-256 exchanges (RFC 5802 / RFC 7677) as PostgreSQL speaks them, both sides."""

from __future__ import annotations

import functools
import hmac
import re
import secrets

from pgtwist.auth.credentials import (
    SCRAM_KEY_LEN,
    AuthFailed,
    AuthProtocolError,
    ScramVerifier,
    _b64decode_strict,
    _b64encode,
    _client_server_keys,
    _h,
    _hmac,
    _salted_password,
    saslprep,
)

__all__ = [
    "SCRAM_SHA_256",
    "SCRAM_SHA_256_PLUS",
    "MAX_MESSAGE_BYTES",
    "MAX_CLIENT_ITERATIONS",
    "ScramServerExchange",
    "ScramClientExchange",
]

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"

# Every SCRAM message is tiny (client-first from libpq is ~35 bytes); 8 KiB leaves room
# for long user names and extensions while bounding what a peer can make us parse.
MAX_MESSAGE_BYTES = 8192
# A node picks the iteration count and we run PBKDF2 on the event loop.  Without a cap
# a hostile or broken node could ask for 2**31 rounds and freeze the proxy for minutes.
# 10M rounds is ~2 s of one core (2,400x PostgreSQL's default 4096, 16x OWASP's 600k),
# and the result is cached per (password, salt, iterations), so it is paid once.
MAX_CLIENT_ITERATIONS = 10_000_000
# Salts from PostgreSQL are 16 bytes; anything past 1 KiB is nonsense.
_MAX_SALT_BYTES = 1024
# PostgreSQL's SCRAM_RAW_NONCE_LEN: 18 random bytes, base64 encoded on the wire.
_RAW_NONCE_LEN = 18
_CB_TYPE = "tls-server-end-point"  # the only channel-binding type PostgreSQL supports
_CB_GS2_HEADER = f"p={_CB_TYPE},,"
_ATTR_VALUE = re.compile(r"([A-Za-z])=(.*)", re.DOTALL)
_DIGITS = re.compile(r"[0-9]{1,10}", re.ASCII)


_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]*")


def _is_printable(value: str) -> bool:
    # RFC 5802 "printable": %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
    return _PRINTABLE.fullmatch(value) is not None


def _make_nonce(nonce: bytes | None) -> str:
    if nonce is None:
        return _b64encode(secrets.token_bytes(_RAW_NONCE_LEN))
    if not isinstance(nonce, (bytes, bytearray)):
        raise TypeError("nonce must be bytes")
    text = bytes(nonce).decode("latin-1")
    if not text or not _is_printable(text):
        raise ValueError("nonce must be non-empty printable ASCII without ','")
    return text


def _decode_message(data: bytes, what: str) -> str:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AuthProtocolError(f"malformed SCRAM message: {what} is not bytes")
    data = bytes(data)
    if not data:
        raise AuthProtocolError(f"malformed SCRAM message: {what} is empty")
    if len(data) > MAX_MESSAGE_BYTES:
        raise AuthProtocolError(f"malformed SCRAM message: {what} exceeds {MAX_MESSAGE_BYTES} bytes")
    if b"\x00" in data:
        # PostgreSQL: "The message length does not match input length."
        raise AuthProtocolError(f"malformed SCRAM message: {what} contains a NUL byte")
    # latin-1 maps bytes 1:1, so re-encoding gives back the exact bytes for AuthMessage
    # and fields PostgreSQL ignores (the user name) may be in any encoding.
    return data.decode("latin-1")


def _split_attr(item: str, what: str) -> tuple[str, str]:
    m = _ATTR_VALUE.fullmatch(item)
    if m is None:
        raise AuthProtocolError(f"malformed SCRAM message: {what} has an attribute that is not 'x=value'")
    return m.group(1), m.group(2)


def _expect_attr(item: str, attr: str, what: str) -> str:
    name, value = _split_attr(item, what)
    if name != attr:
        raise AuthProtocolError(f"malformed SCRAM message: {what}: expected attribute '{attr}'")
    return value


def _b64_field(value: str, what: str) -> bytes:
    try:
        return _b64decode_strict(value)
    except ValueError:
        raise AuthProtocolError(f"malformed SCRAM message: {what} is not valid base64") from None


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("_xor of unequal lengths")
    # (as integers: one operation, not a generator step per byte, on every SCRAM login)
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


@functools.lru_cache(maxsize=128)
def _cached_salted_password(prepared: bytes, salt: bytes, iterations: int) -> bytes:
    # The proxy logs in to the same nodes with the same password over and over;
    # PBKDF2 on the event loop is the single most expensive step, so remember it.
    return _salted_password(prepared, salt, iterations)


class ScramServerExchange:
    """Server side of one SASL exchange (proxy authenticating a client).

    Call mechanisms(), initial(), final() in order; any error ends the exchange."""

    def __init__(
        self,
        verifier: ScramVerifier,
        *,
        mock: bool = False,
        channel_binding: bytes | None = None,
        nonce: bytes | None = None,
    ) -> None:
        """*mock*: run the exchange normally but always fail in final() (unknown user).
        *channel_binding*: tls-server-end-point hash of our certificate on a TLS
        connection, None without TLS.  *nonce*: server nonce as sent on the wire
        (printable ASCII), random by default; for tests."""
        self._verifier = verifier
        self._mock = mock
        self._cb_data = bytes(channel_binding) if channel_binding is not None else None
        self._server_nonce = _make_nonce(nonce)
        self._state = "start"
        self._cb_flag = ""
        self._use_cb = False
        self._client_nonce = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._client_key: bytes | None = None

    def mechanisms(self) -> list[str]:
        # PLUS first: PostgreSQL lists it first and clients pick the first they like.
        if self._cb_data is not None:
            return [SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        return [SCRAM_SHA_256]

    @property
    def client_key(self) -> bytes | None:
        """ClientKey recovered from the proof after a successful final(), else None.

        It lets the proxy log in to a node that holds the same verifier (SCRAM
        pass-through, as PgBouncer does)."""
        return self._client_key

    def _fail(self, exc: Exception) -> Exception:
        self._state = "failed"
        return exc

    def initial(self, mechanism: str, response: bytes) -> bytes:
        """Take the client-first-message from SASLInitialResponse, return server-first-message."""
        if self._state != "start":
            raise self._fail(AuthProtocolError("SCRAM exchange out of order: initial response already received"))
        try:
            return self._initial(mechanism, response)
        except AuthProtocolError as exc:
            raise self._fail(exc) from None

    def _initial(self, mechanism: str, response: bytes) -> bytes:
        if mechanism not in self.mechanisms():
            raise AuthProtocolError("client selected an invalid SASL authentication mechanism")
        self._use_cb = mechanism == SCRAM_SHA_256_PLUS
        msg = _decode_message(response, "client-first-message")
        what = "client-first-message"

        # GS2 header: cbind-flag "," [authzid] ","
        flag, sep, rest = msg.partition(",")
        if not sep:
            raise AuthProtocolError(f"malformed SCRAM message: {what} has no GS2 header")
        if flag == "n":
            if self._use_cb:
                raise AuthProtocolError(
                    "malformed SCRAM message: the client selected SCRAM-SHA-256-PLUS, "
                    "but the SCRAM message does not include channel binding data"
                )
        elif flag == "y":
            if self._use_cb:
                raise AuthProtocolError(
                    "malformed SCRAM message: the client selected SCRAM-SHA-256-PLUS, "
                    "but the SCRAM message does not include channel binding data"
                )
            if self._cb_data is not None:
                # The client could bind but believes we cannot: someone stripped
                # the PLUS mechanism in transit (downgrade attack).
                raise AuthProtocolError(
                    "SCRAM channel binding negotiation error: the client supports channel binding "
                    "but thinks the server does not, although this server does support it"
                )
        elif flag.startswith("p="):
            if self._cb_data is None:
                raise AuthProtocolError(
                    "malformed SCRAM message: the client requires channel binding, "
                    "but this connection does not use TLS"
                )
            if not self._use_cb:
                raise AuthProtocolError(
                    "malformed SCRAM message: the client selected SCRAM-SHA-256 without channel "
                    "binding, but the SCRAM message includes channel binding data"
                )
            if flag[2:] != _CB_TYPE:
                raise AuthProtocolError("unsupported SCRAM channel-binding type")
        else:
            raise AuthProtocolError(f"malformed SCRAM message: {what}: unexpected channel-binding flag")
        self._cb_flag = flag[0]

        authzid, sep, bare = rest.partition(",")
        if not sep:
            raise AuthProtocolError(f"malformed SCRAM message: {what} has an incomplete GS2 header")
        if authzid:
            if authzid.startswith("a="):
                raise AuthProtocolError("client uses authorization identity, but it is not supported")
            raise AuthProtocolError(f"malformed SCRAM message: {what}: unexpected attribute in GS2 header")

        if bare.startswith("m="):
            raise AuthProtocolError("client requires an unsupported SCRAM extension")
        items = bare.split(",")
        if len(items) < 2:
            raise AuthProtocolError(f"malformed SCRAM message: {what} lacks user name or nonce")
        # The user name is ignored, as PostgreSQL does: the startup packet's user counts.
        _expect_attr(items[0], "n", what)
        nonce = _expect_attr(items[1], "r", what)
        if not nonce:
            raise AuthProtocolError(f"malformed SCRAM message: {what} has an empty nonce")
        if not _is_printable(nonce):
            raise AuthProtocolError("non-printable characters in SCRAM nonce")
        # Optional extensions may follow; we support none, so only check their syntax.
        for item in items[2:]:
            _split_attr(item, what)

        self._client_nonce = nonce
        self._client_first_bare = bare
        v = self._verifier
        self._server_first = f"r={nonce}{self._server_nonce},s={_b64encode(v.salt)},i={v.iterations}"
        self._state = "first_sent"
        return self._server_first.encode("latin-1")

    def final(self, response: bytes) -> bytes:
        """Take the client-final-message, return server-final-message ``v=...``.

        Raises AuthFailed on a wrong proof (always, when mock) and AuthProtocolError
        on anything malformed."""
        if self._state != "first_sent":
            raise self._fail(AuthProtocolError("SCRAM exchange out of order: final response not expected now"))
        try:
            return self._final(response)
        except (AuthProtocolError, AuthFailed) as exc:
            raise self._fail(exc) from None

    def _final(self, response: bytes) -> bytes:
        what = "client-final-message"
        msg = _decode_message(response, what)
        items = msg.split(",")
        if len(items) < 3:
            raise AuthProtocolError(f"malformed SCRAM message: {what} lacks channel binding, nonce or proof")

        cb_value = _expect_attr(items[0], "c", what)
        cb_failed = False
        if self._use_cb:
            assert self._cb_data is not None
            received = _b64_field(cb_value, "channel binding")
            header = _CB_GS2_HEADER.encode("ascii")
            if not received.startswith(header):
                raise AuthProtocolError(
                    f"malformed SCRAM message: {what}: channel-binding header does not match client-first-message"
                )
            # Check the proof's syntax before failing on this, so a malformed message
            # is still reported as malformed.
            cb_failed = not hmac.compare_digest(received, header + self._cb_data)
        elif not ((cb_value == "biws" and self._cb_flag == "n") or (cb_value == "eSws" and self._cb_flag == "y")):
            # Without binding the value must echo the GS2 header: base64("n,,") or base64("y,,").
            raise AuthProtocolError(
                f"malformed SCRAM message: unexpected SCRAM channel-binding attribute in {what}"
            )

        final_nonce = _expect_attr(items[1], "r", what)
        for item in items[2:-1]:  # extensions: ignored, syntax only
            _split_attr(item, what)
        proof = _b64_field(_expect_attr(items[-1], "p", what), "client proof")
        if len(proof) != SCRAM_KEY_LEN:
            raise AuthProtocolError(f"malformed SCRAM message: malformed proof in {what}")

        if not hmac.compare_digest(
            final_nonce.encode("latin-1"), (self._client_nonce + self._server_nonce).encode("latin-1")
        ):
            raise AuthProtocolError("invalid SCRAM response: nonce does not match")
        if cb_failed:
            raise AuthFailed("SCRAM channel binding check failed")

        without_proof = msg[: msg.rindex(",")]
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof)).encode("latin-1")
        v = self._verifier
        client_signature = _hmac(v.stored_key, auth_message)
        client_key = _xor(proof, client_signature)
        ok = hmac.compare_digest(_h(client_key), v.stored_key)
        # Same message for mock and real failures, so forwarding str() leaks nothing.
        if self._mock or not ok:
            raise AuthFailed("SCRAM authentication failed: client proof does not match")
        self._client_key = client_key
        self._state = "done"
        return b"v=" + _b64encode(_hmac(v.server_key, auth_message)).encode("ascii")


class ScramClientExchange:
    """Client side of one SASL exchange (proxy authenticating to a PostgreSQL node).

    Either *password*, or *client_key* (with optional *server_key*) recovered by
    ScramServerExchange.client_key for pass-through.  Pass-through works only when
    the node holds the very same verifier as the proxy (same salt, iteration count
    and keys): ClientKey is derived from the salted password, so a node with a
    different salt or count needs a different ClientKey that we cannot compute.
    Pass *expected_salt* / *expected_iterations* (from the proxy's verifier) to get
    a clear AuthFailed instead of a failed login when they differ.  Without
    *server_key* the node's server signature cannot be checked."""

    def __init__(
        self,
        *,
        password: str | None = None,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        nonce: bytes | None = None,
        username: str = "",
        expected_salt: bytes | None = None,
        expected_iterations: int | None = None,
    ) -> None:
        """*nonce*: client nonce as sent on the wire (printable ASCII), random by default.
        *username*: put in ``n=``; PostgreSQL ignores it, so libpq (and we) send ''."""
        if (password is None) == (client_key is None):
            raise ValueError("give exactly one of password or client_key")
        if client_key is not None and (not isinstance(client_key, bytes) or len(client_key) != SCRAM_KEY_LEN):
            raise ValueError(f"client_key must be {SCRAM_KEY_LEN} bytes")
        if server_key is not None:
            if password is not None:
                raise ValueError("server_key only applies with client_key (it is derived from the password)")
            if not isinstance(server_key, bytes) or len(server_key) != SCRAM_KEY_LEN:
                raise ValueError(f"server_key must be {SCRAM_KEY_LEN} bytes")
        self._prepared = saslprep(password) if password is not None else None
        self._client_key = client_key
        self._server_key = server_key
        self._nonce = _make_nonce(nonce)
        # RFC 5802 saslname: ',' and '=' must be escaped.
        self._username = username.replace("=", "=3D").replace(",", "=2C")
        self._expected_salt = expected_salt
        self._expected_iterations = expected_iterations
        self._state = "start"
        self._client_first_bare = ""
        self._server_signature: bytes | None = None

    def mechanism(self, offered: list[str]) -> str:
        """Pick the mechanism from AuthenticationSASL; no channel binding to nodes yet."""
        if SCRAM_SHA_256 in offered:
            return SCRAM_SHA_256
        listed = ", ".join(str(m)[:40] for m in list(offered)[:8])
        raise AuthProtocolError(f"node offers no supported SASL mechanism (offered: {listed or 'none'})")

    def _fail(self, exc: Exception) -> Exception:
        self._state = "failed"
        return exc

    def first(self) -> bytes:
        """Return the client-first-message ``n,,n=,r=<nonce>``."""
        if self._state != "start":
            raise self._fail(AuthProtocolError("SCRAM exchange out of order: client-first-message already sent"))
        self._client_first_bare = f"n={self._username},r={self._nonce}"
        self._state = "first_sent"
        return ("n,," + self._client_first_bare).encode("utf-8")

    def handle_server_first(
        self,
        data: bytes,
        *,
        expected_salt: bytes | None = None,
        expected_iterations: int | None = None,
    ) -> bytes:
        """Take server-first-message, return client-final-message.

        *expected_salt* / *expected_iterations* override the constructor's (see class doc)."""
        if self._state != "first_sent":
            raise self._fail(AuthProtocolError("SCRAM exchange out of order: server-first-message not expected now"))
        try:
            return self._server_first(
                data,
                expected_salt if expected_salt is not None else self._expected_salt,
                expected_iterations if expected_iterations is not None else self._expected_iterations,
            )
        except (AuthProtocolError, AuthFailed) as exc:
            raise self._fail(exc) from None

    def _server_first(self, data: bytes, expected_salt: bytes | None, expected_iterations: int | None) -> bytes:
        what = "server-first-message"
        msg = _decode_message(data, what)
        if msg.startswith("m="):
            raise AuthProtocolError("node requires an unsupported SCRAM extension")
        items = msg.split(",")
        if len(items) != 3:
            # libpq also rejects anything after i= ("garbage at end of server-first-message").
            raise AuthProtocolError(f"malformed SCRAM message: {what} must be r=...,s=...,i=...")
        nonce = _expect_attr(items[0], "r", what)
        salt_text = _expect_attr(items[1], "s", what)
        iter_text = _expect_attr(items[2], "i", what)

        if not _is_printable(nonce):
            raise AuthProtocolError("non-printable characters in SCRAM nonce")
        # The server must echo our nonce and add its own part; an empty server part
        # would let a replayed exchange through.
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthProtocolError("invalid SCRAM response: nonce mismatch")
        salt = _b64_field(salt_text, "salt")
        if not salt or len(salt) > _MAX_SALT_BYTES:
            raise AuthProtocolError(f"malformed SCRAM message: invalid salt length in {what}")
        if _DIGITS.fullmatch(iter_text) is None:
            raise AuthProtocolError(f"malformed SCRAM message: invalid iteration count in {what}")
        iterations = int(iter_text)
        if not 1 <= iterations <= MAX_CLIENT_ITERATIONS:
            raise AuthProtocolError(
                f"SCRAM iteration count {iterations} from node is outside 1..{MAX_CLIENT_ITERATIONS}"
            )

        if self._client_key is not None:
            if (expected_salt is not None and salt != expected_salt) or (
                expected_iterations is not None and iterations != expected_iterations
            ):
                raise AuthFailed(
                    "node uses a different SCRAM salt/iteration count than the proxy's verifier for this "
                    "user; SCRAM pass-through needs the node to store the same verifier (copy it from "
                    "pg_authid into the config, or configure a plaintext password)"
                )
            client_key, server_key = self._client_key, self._server_key
        else:
            assert self._prepared is not None
            client_key, server_key = _client_server_keys(_cached_salted_password(self._prepared, salt, iterations))

        without_proof = f"c=biws,r={nonce}"  # base64("n,,"): we never bind to nodes yet
        # Byte-exact: the user name went out as UTF-8, the server's message as received.
        auth_message = b",".join(
            (self._client_first_bare.encode("utf-8"), msg.encode("latin-1"), without_proof.encode("ascii"))
        )
        proof = _xor(client_key, _hmac(_h(client_key), auth_message))
        self._server_signature = _hmac(server_key, auth_message) if server_key is not None else None
        self._state = "final_sent"
        return f"{without_proof},p={_b64encode(proof)}".encode("ascii")

    def handle_server_final(self, data: bytes) -> None:
        """Check server-final-message; AuthFailed on ``e=`` or a wrong server signature."""
        if self._state != "final_sent":
            raise self._fail(AuthProtocolError("SCRAM exchange out of order: server-final-message not expected now"))
        try:
            self._server_final(data)
        except (AuthProtocolError, AuthFailed) as exc:
            raise self._fail(exc) from None
        self._state = "done"

    def _server_final(self, data: bytes) -> None:
        what = "server-final-message"
        msg = _decode_message(data, what)
        if msg.startswith("e="):
            # Server error text is not secret but is peer-controlled: keep it short and printable.
            text = "".join(c if 0x20 <= ord(c) <= 0x7E else "?" for c in msg[2:200])
            raise AuthFailed(f"node rejected SCRAM authentication: {text}")
        if "," in msg:
            raise AuthProtocolError(f"malformed SCRAM message: garbage at end of {what}")
        signature = _b64_field(_expect_attr(msg, "v", what), "server signature")
        if len(signature) != SCRAM_KEY_LEN:
            raise AuthProtocolError(f"malformed SCRAM message: invalid server signature in {what}")
        if self._server_signature is not None and not hmac.compare_digest(signature, self._server_signature):
            raise AuthFailed("node's SCRAM server signature is invalid (is it really the configured server?)")
