"""Client login as a pure exchange: startup packet, protocol negotiation, authentication (no I/O)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable

from pgtwist.auth import (
    AuthFailed,
    AuthProtocolError,
    Credential,
    ScramServerExchange,
    md5_verify,
    mock_scram_verifier,
)
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import PgError, WireError
from pgtwist.wire.framing import pop_message, pop_startup_packet


class LoginError(PgError):
    """Login refused: the session sends this FATAL ErrorResponse and closes."""

    severity = "FATAL"


@dataclass(frozen=True)
class Reply:
    """Bytes to send to the client."""

    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Upgrade the connection to TLS now (after sending the Replies before it); then call tls_started().

    *initial*: TLS bytes already received (a direct-TLS ClientHello), for the TLS layer.
    """

    initial: bytes = b""


@dataclass(frozen=True)
class CancelReceived:
    process_id: int
    secret_key: bytes = field(repr=False)


class Authenticated:
    """Startup finished and the client proved who it is; AuthenticationOk has been queued.

    (A plain class, unlike the other events: one is made per login, and a frozen dataclass sets
    each field through object.__setattr__.)
    """

    __slots__ = ("startup", "credential", "client_key")

    def __init__(self, startup: m.StartupMessage, credential: Credential | None, client_key: bytes | None = None):
        self.startup = startup
        self.credential = credential
        self.client_key = client_key  # SCRAM pass-through to nodes

    def __repr__(self) -> str:
        return f"Authenticated(startup={self.startup!r})"  # (never the credential or the key)


@dataclass(frozen=True)
class LookupUser:
    """No configured secret for *user*: look it up (auth_query), then call user_found() with the result."""

    user: str
    database: str


# States of the exchange.
STARTUP, MD5, SASL_INITIAL, SASL_FINAL, DONE = "startup", "md5", "sasl-initial", "sasl-final", "done"
LOOKUP = "lookup"  # waiting for auth_query's answer: the client's bytes wait in the buffer
_MAX_NEGOTIATIONS = 2  # one SSLRequest and one GSSENCRequest at most, as PostgreSQL allows
TLS_REQUIRED_MODES = ("require", "verify-ca", "verify-full")  # [tls] modes that refuse plaintext logins
_TLS_RECORD_HANDSHAKE = 0x16  # first byte of a ClientHello; no startup packet length starts with it
_SSL_REQUEST = m.ssl_request()
_NO_TLS = Reply(b"N")
_AUTHENTICATION_OK = Reply(m.authentication_ok())
# A pool's short-lived clients send the same startup packet login after login (the same user,
# database and application_name): decoded once, not per login. Bounded: a flood of distinct
# packets only re-decodes. Nothing in it belongs to a login but the packet's own bytes (its key),
# and its parameters are read-only, so one login's can never become another's. (A packet found
# here is answered some microseconds sooner than one decoded: no sooner than the gap between a
# known user's answer and an unknown one's, here as in PostgreSQL, and what it could tell is only
# that some client sent those very bytes lately, never whether anyone logged in with them.)
_STARTUP_MESSAGES: dict[bytes, m.StartupMessage] = {}
_STARTUP_MESSAGES_LIMIT = 256


class ClientLogin:
    """Feed it the client's bytes; it answers with events until the client is authenticated.

    *lookup_user* returns the configured Credential or None; unknown users still run a full
    (always failing) exchange so that nobody can tell them from wrong passwords.

    *tls_mode* is [tls] mode: "disable" answers SSLRequest with N; any other answers S and emits
    StartTLS, as does a direct-TLS ClientHello; "require" and above refuse plaintext logins.
    Whoever runs the exchange calls tls_started() once the handshake is done.

    *admit* is asked about each StartupMessage as soon as it is read: False refuses the client
    with 53300 before any authentication work, as PostgreSQL does when it is full.
    """

    # Thousands may sit here during a flood of connections that never speak: no __dict__ each.
    __slots__ = (
        "auth_type",
        "lookup_user",
        "mock_secret",
        "token",
        "state",
        "buffer",
        "startup",
        "credential",
        "negotiations",
        "_salt",
        "_scram",
        "tls_mode",
        "client_host",
        "tls",
        "tls_pending",
        "channel_binding",
        "peer_cn",
        "admit",
        "look_up",
    )

    def __init__(
        self,
        auth_type: str,
        lookup_user: Callable[[str], Credential | None],
        mock_secret: bytes,
        *,
        token: Callable[[int], bytes] = secrets.token_bytes,
        tls_mode: str = "disable",
        client_host: str | None = None,
        admit: Callable[[m.StartupMessage], bool] | None = None,
        look_up: bool = False,
    ):
        self.auth_type = auth_type
        self.lookup_user = lookup_user
        self.mock_secret = mock_secret
        self.token = token
        self.state = STARTUP
        self.buffer = bytearray()
        self.startup: m.StartupMessage | None = None
        self.credential: Credential | None = None
        self.negotiations = 0
        self._salt = b""
        self._scram: ScramServerExchange | None = None
        self.tls_mode = tls_mode
        self.client_host = client_host
        self.tls = False  # the handshake is done: everything since came encrypted
        self.tls_pending: str | None = None  # "classic" (after SSLRequest) or "direct" until tls_started()
        self.channel_binding: bytes | None = None  # tls-server-end-point hash of our certificate
        self.peer_cn: str | None = None  # CN of the client's verified certificate
        self.admit = admit
        self.look_up = look_up  # auth_query: users lookup_user does not know are asked for (LookupUser)

    def leftover(self) -> bytes:
        """Bytes the client sent after its login finished (pipelined queries)."""
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def feed(self, data: bytes) -> list:
        """Consume client bytes; return events. Raises LoginError or WireError to refuse the client."""
        if self.tls_pending is not None:
            # Cannot happen through Twisted (bytes go to the TLS layer); never process them anyway.
            raise WireError("received data before the TLS handshake finished")
        if data == _SSL_REQUEST and self.tls_mode == "disable" and self.state == STARTUP and not self.negotiations and not self.buffer:
            # libpq's first packet under its default sslmode=prefer (psycopg, pgbench, psql, and
            # asyncpg's and pgjdbc's defaults do the same), when pgtwist offers no TLS: the answer
            # the general walk below gives it (N), without the walk, the decoding and its objects.
            self.negotiations = 1
            return [_NO_TLS]
        self.buffer += data
        if self.state == LOOKUP and len(self.buffer) > p.MAX_AUTH_MESSAGE + 5:
            # Nothing was asked of the client yet: whatever it sends waits, but not without bound.
            raise WireError("unexpected data from the client before the authentication request")
        events: list = []
        if (
            self.state == STARTUP
            and self.tls_mode != "disable"
            and not self.tls
            and not self.negotiations
            and self.buffer[:1] == bytes((_TLS_RECORD_HANDSHAKE,))
        ):
            # Direct TLS (PostgreSQL 17's sslnegotiation=direct): the ClientHello is for the TLS layer.
            initial = bytes(self.buffer)
            self.buffer.clear()
            self.tls_pending = "direct"
            return [StartTLS(initial)]
        while self.state != DONE and self.state != LOOKUP:
            if self.state == STARTUP:
                body = pop_startup_packet(self.buffer, p.MAX_STARTUP_PACKET)
                if body is None:
                    break
                events.extend(self._startup_packet(body))
                if self.state == STARTUP and isinstance(events[-1], CancelReceived):
                    self.state = DONE
                    break
                if self.tls_pending is not None:
                    break  # nothing more until the handshake is done
            else:
                msg = pop_message(self.buffer, p.MAX_AUTH_MESSAGE)
                if msg is None:
                    break
                events.extend(self._auth_message(*msg))
        return events

    # -- startup ----------------------------------------------------------------------------

    def _startup_packet(self, body: bytes) -> list:
        packet = _STARTUP_MESSAGES.get(body)
        if packet is None:
            packet = m.decode_startup_packet(body)
            if type(packet) is m.StartupMessage:
                if len(_STARTUP_MESSAGES) >= _STARTUP_MESSAGES_LIMIT:
                    _STARTUP_MESSAGES.clear()
                _STARTUP_MESSAGES[body] = packet
        if isinstance(packet, m.CancelRequest):
            # Accepted after a refused SSLRequest/GSSENCRequest too, as PostgreSQL does: libpq >= 17
            # (PQcancelCreate) negotiates encryption first under the default sslmode=prefer.
            return [CancelReceived(packet.process_id, packet.secret_key)]
        if isinstance(packet, (m.SSLRequest, m.GSSENCRequest)):
            self.negotiations += 1
            if self.negotiations > _MAX_NEGOTIATIONS:
                raise WireError("too many encryption negotiation requests")
            if self.tls:
                raise WireError("encryption negotiation request on a connection that already uses TLS")
            if isinstance(packet, m.GSSENCRequest) or self.tls_mode == "disable":
                return [Reply(b"N")]
            if self.buffer:
                # Bytes sent before the handshake were not encrypted: perhaps injected by a man
                # in the middle (CVE-2021-23214). Never process them.
                error = WireError("received unencrypted data after SSL request")
                error.detail = "This could be either a client-software bug or evidence of an attempted man-in-the-middle attack."
                raise error
            self.tls_pending = "classic"
            return [Reply(b"S"), StartTLS()]
        assert isinstance(packet, m.StartupMessage)
        self.startup = packet
        if self.admit is not None and not self.admit(packet):
            raise LoginError(sqlstate.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
        self._check_tls(packet)
        if packet.parameters.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            raise LoginError(sqlstate.FEATURE_NOT_SUPPORTED, "replication connections are not supported by pgtwist")
        events: list = []
        if packet.minor > p.PROTOCOL_LATEST_MINOR or packet.unrecognized_options:
            events.append(Reply(m.negotiate_protocol_version(p.PROTOCOL_LATEST_MINOR, packet.unrecognized_options)))
        events.extend(self._begin_auth(packet.user))
        return events

    def _begin_auth(self, user: str) -> list:
        self.credential = self.lookup_user(user)
        if self.credential is None and self.look_up:
            self.state = LOOKUP
            return [LookupUser(user, self.startup.database)]
        return self._challenge(user)

    def user_found(self, credential: Credential | None) -> list:
        """auth_query answered (None: no such user, or no usable secret); returns events.

        An unknown user goes through the same always-failing exchange as without auth_query."""
        if self.state != LOOKUP:
            raise WireError("user lookup answered out of turn")
        self.state = STARTUP
        self.credential = credential
        events = self._challenge(self.startup.user)
        if self.state != DONE and self.buffer:
            events.extend(self.feed(b""))  # (what the client sent meanwhile)
        return events

    def _challenge(self, user: str) -> list:
        if self.auth_type == "cert":
            # The verified client certificate's CN is the user, as PostgreSQL's cert method.
            if self.credential is None or self.peer_cn != user:
                raise LoginError(sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, f'certificate authentication failed for user "{user}"')
            return self._done()
        if self.auth_type == "trust":
            if self.credential is None:
                raise LoginError(sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, f'role "{user}" does not exist')
            return self._done()
        # PostgreSQL upgrades md5 to SCRAM when the stored secret is a SCRAM verifier.
        if self.auth_type == "md5" and (self.credential is None or self.credential.kind != "scram"):
            self._salt = self.token(4)
            self.state = MD5
            return [Reply(m.authentication_md5_password(self._salt))]
        # Over TLS, SCRAM-SHA-256-PLUS is offered too (channel_binding=require clients need it).
        cb = self.channel_binding if self.tls else None
        if self.credential is not None and self.credential.scram is not None:
            self._scram = ScramServerExchange(self.credential.scram, channel_binding=cb)
        else:
            # Unknown user (or an md5-only secret under scram-sha-256): a full exchange that always fails.
            self._scram = ScramServerExchange(mock_scram_verifier(user, self.mock_secret), mock=True, channel_binding=cb)
        self.state = SASL_INITIAL
        return [Reply(m.authentication_sasl(self._scram.mechanisms()))]

    # -- TLS ------------------------------------------------------------------------------------

    def tls_started(
        self,
        *,
        channel_binding: bytes | None = None,
        alpn: bytes | None = None,
        peer_cn: str | None = None,
        peer_certificate: bool = False,
    ) -> list:
        """The TLS handshake the last StartTLS asked for is done; returns events (none so far).

        *channel_binding*: tls-server-end-point hash of the certificate we presented; *alpn*: the
        protocol negotiated; *peer_cn*: CN of the client's certificate (verified by the handshake).
        """
        if self.tls_pending is None:
            raise WireError("TLS handshake without a request for it")
        direct, self.tls_pending = self.tls_pending == "direct", None
        if direct and alpn != b"postgresql":
            raise WireError("received direct SSL connection request without ALPN protocol negotiation extension")
        self.tls = True
        self.channel_binding = channel_binding
        self.peer_cn = peer_cn if peer_certificate else None
        return []

    def _check_tls(self, packet: m.StartupMessage) -> None:
        if self.tls_mode in TLS_REQUIRED_MODES and not self.tls:
            host = f'host "{self.client_host}", ' if self.client_host else ""
            # PostgreSQL's words when only hostssl lines match.
            raise LoginError(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
                f'no pg_hba.conf entry for {host}user "{packet.user}", database "{packet.database}", no encryption: TLS is required',
                f'pgtwist\'s [tls] mode is "{self.tls_mode}": connect with sslmode=require or stronger.',
            )
        if self.tls_mode == "verify-full" and self.peer_cn != packet.user:
            # As clientcert=verify-full: the certificate must name the user logging in.
            raise LoginError(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
                f'certificate authentication failed for user "{packet.user}"',
                f'The client certificate\'s CN is "{self.peer_cn}"; [tls] mode "verify-full" requires the user name.',
            )

    # -- authentication messages -------------------------------------------------------------

    def _auth_message(self, msg_type: int, body: bytes) -> list:
        if msg_type != p.PASSWORD:
            raise WireError(f"expected password response, got message type {msg_type}")
        try:
            if self.state == MD5:
                response = m.decode_password(body)
                if self.credential is None or not md5_verify(self.credential, self._salt, response):
                    self._fail()
                return self._done()
            if self.state == SASL_INITIAL:
                mechanism, data = m.decode_sasl_initial_response(body)
                reply = self._scram.initial(mechanism, data)
                self.state = SASL_FINAL
                return [Reply(m.authentication_sasl_continue(reply))]
            if self.state == SASL_FINAL:
                reply = self._scram.final(body)
                return [Reply(m.authentication_sasl_final(reply))] + self._done(self._scram.client_key)
        except AuthFailed:
            self._fail()
        except AuthProtocolError as e:
            raise WireError(str(e)) from None
        raise WireError("unexpected authentication message")

    def _fail(self):
        user = self.startup.user if self.startup else ""
        raise LoginError(sqlstate.INVALID_PASSWORD, f'password authentication failed for user "{user}"')

    def _done(self, client_key: bytes | None = None) -> list:
        self.state = DONE
        return [_AUTHENTICATION_OK, Authenticated(self.startup, self.credential, client_key)]
