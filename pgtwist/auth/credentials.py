"""Configured user credentials: auth errors, SCRAM verifiers, SASLprep and key derivation."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass, field

from pgtwist.auth.md5 import md5_hash
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import PgError

__all__ = [
    "AuthError",
    "AuthProtocolError",
    "AuthFailed",
    "ScramVerifier",
    "Credential",
    "mock_scram_verifier",
    "saslprep",
]

SCRAM_KEY_LEN = 32  # SHA-256 output size
DEFAULT_SALT_LEN = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
DEFAULT_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
# pg_authid stores the count as a C int; anything larger was not made by PostgreSQL.
MAX_VERIFIER_ITERATIONS = 2**31 - 1
# pg_saslprep's MAX_PASSWORD_LENGTH: PostgreSQL does not even try to normalise longer input.
SASLPREP_MAX_BYTES = 1024


class AuthError(PgError):
    """Base class of every authentication error raised by pgtwist.auth (FATAL; the class names the SQLSTATE).

    str() is a DBA-readable reason and never contains secrets."""

    sqlstate = sqlstate.INVALID_AUTHORIZATION_SPECIFICATION
    severity = "FATAL"

    def __init__(self, message: str):
        super().__init__(None, message)


class AuthProtocolError(AuthError):
    """Malformed client/server auth message (PROTOCOL_VIOLATION)."""

    sqlstate = sqlstate.PROTOCOL_VIOLATION


class AuthFailed(AuthError):
    """Wrong password or proof mismatch (INVALID_PASSWORD)."""

    sqlstate = sqlstate.INVALID_PASSWORD


# --------------------------------------------------------------------------- SASLprep


def _saslprep_prohibited(ch: str) -> bool:
    # RFC 4013 section 2.3 prohibited output (C.1.2, C.2.1, C.2.2, C.3 - C.9) plus
    # unassigned code points (A.1), exactly the tables pg_saslprep uses.
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
        or stringprep.in_table_a1(ch)
    )


def _pg_saslprep(raw: bytes) -> bytes | None:
    """Mirror of PostgreSQL's pg_saslprep(); None where it reports failure."""
    if len(raw) > SASLPREP_MAX_BYTES:
        return None
    if raw.isascii():
        # pg_saslprep's fast path: pure ASCII is passed through untouched (even controls).
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # 1) Map: non-ASCII spaces to SPACE, "commonly mapped to nothing" to nothing.
    mapped = [" " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)]
    if not mapped:
        return None
    # 2) Normalise with NFKC.  PostgreSQL uses its current Unicode tables, not 3.2,
    #    and so does unicodedata.normalize (Python 3.11 and PostgreSQL 15: Unicode 14).
    normalized = unicodedata.normalize("NFKC", "".join(mapped))
    # 3) + 4) Prohibit and check bidi.  pg_saslprep runs these checks on the *mapped
    #    input*, not on the normalised output (RFC 3454 says output); we copy that quirk
    #    because the point is to derive the same bytes PostgreSQL does.
    if any(_saslprep_prohibited(ch) for ch in mapped):
        return None
    if any(stringprep.in_table_d1(ch) for ch in mapped):
        if any(stringprep.in_table_d2(ch) for ch in mapped):
            return None
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return None
    return normalized.encode("utf-8")


def saslprep(password: str | bytes) -> bytes:
    """Normalise a password the way PostgreSQL does before SCRAM key derivation.

    When SASLprep fails (invalid UTF-8, prohibited characters, bidi violation) the
    raw bytes are used, like PostgreSQL's fallback.  Passwords over 1024 bytes are
    refused by PostgreSQL; we use them raw rather than fail the whole config."""
    raw = password.encode("utf-8") if isinstance(password, str) else bytes(password)
    prepared = _pg_saslprep(raw)
    return raw if prepared is None else prepared


# --------------------------------------------------------------------------- SCRAM primitives


# HMAC-SHA-256 with the key's padded blocks hashed once: a SCRAM login computes two HMACs under
# its verifier's StoredKey and ServerKey, the same keys login after login. With OpenSSL 3 each
# one-shot hmac.digest() looks the digest up again and rehashes the key's pads (about 7 µs here);
# copying two prepared hash states costs less than half. Bounded: emptied when it is full
# (one-off keys, e.g. the mock verifiers of unknown users, come and go).
_PADS: dict[bytes, tuple] = {}
_PADS_LIMIT = 1024
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_BLOCK = 64  # SHA-256's block size


def _hmac(key: bytes, msg: bytes) -> bytes:
    pads = _PADS.get(key)
    if pads is None:
        block = (hashlib.sha256(key).digest() if len(key) > _BLOCK else key).ljust(_BLOCK, b"\0")
        pads = (hashlib.sha256(block.translate(_IPAD)), hashlib.sha256(block.translate(_OPAD)))
        if len(_PADS) >= _PADS_LIMIT:
            _PADS.clear()
        _PADS[key] = pads
    inner = pads[0].copy()
    inner.update(msg)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _salted_password(prepared: bytes, salt: bytes, iterations: int) -> bytes:
    # Hi() of RFC 5802 is PBKDF2-HMAC with a single output block.
    return hashlib.pbkdf2_hmac("sha256", prepared, salt, iterations, SCRAM_KEY_LEN)


def _client_server_keys(salted: bytes) -> tuple[bytes, bytes]:
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}", re.ASCII)


def _b64decode_strict(text: str) -> bytes:
    """Strict base64 (alphabet, padding); raise ValueError without echoing input."""
    if len(text) % 4 or not _BASE64.fullmatch(text):
        raise ValueError("invalid base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64") from None


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- verifier


@dataclass(frozen=True)
class ScramVerifier:
    """A SCRAM-SHA-256 secret as PostgreSQL keeps it in pg_authid.rolpassword."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    PREFIX = "SCRAM-SHA-256$"  # class attribute, not a field (no annotation)

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool):
            raise ValueError("SCRAM verifier iteration count must be an integer")
        if not 1 <= self.iterations <= MAX_VERIFIER_ITERATIONS:
            raise ValueError(f"SCRAM verifier iteration count must be between 1 and {MAX_VERIFIER_ITERATIONS}")
        if not isinstance(self.salt, bytes) or not self.salt:
            raise ValueError("SCRAM verifier salt must be non-empty bytes")
        for name in ("stored_key", "server_key"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != SCRAM_KEY_LEN:
                raise ValueError(f"SCRAM verifier {name} must be {SCRAM_KEY_LEN} bytes")

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Parse ``SCRAM-SHA-256$<iter>:<b64salt>$<b64StoredKey>:<b64ServerKey>``.

        Error messages name the broken part only; the text holds keys, so it is never echoed."""
        if not isinstance(text, str) or not text.startswith(cls.PREFIX):
            raise ValueError("SCRAM verifier must start with 'SCRAM-SHA-256$'")
        parts = text[len(cls.PREFIX):].split("$")
        if len(parts) != 2:
            raise ValueError("SCRAM verifier must look like SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")
        iter_salt = parts[0].split(":")
        keys = parts[1].split(":")
        if len(iter_salt) != 2 or len(keys) != 2:
            raise ValueError("SCRAM verifier must look like SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")
        iter_text, salt_text = iter_salt
        # Ten digits already exceed the C int PostgreSQL stores; no need to parse more.
        if not re.fullmatch(r"[0-9]{1,10}", iter_text, re.ASCII):
            raise ValueError("SCRAM verifier iteration count is not a positive decimal integer")
        decoded: list[bytes] = []
        for what, b64 in (("salt", salt_text), ("StoredKey", keys[0]), ("ServerKey", keys[1])):
            try:
                decoded.append(_b64decode_strict(b64))
            except ValueError:
                raise ValueError(f"SCRAM verifier {what} is not valid base64") from None
        salt, stored_key, server_key = decoded
        if len(stored_key) != SCRAM_KEY_LEN or len(server_key) != SCRAM_KEY_LEN:
            raise ValueError(f"SCRAM verifier StoredKey and ServerKey must decode to {SCRAM_KEY_LEN} bytes")
        return cls(iterations=int(iter_text), salt=salt, stored_key=stored_key, server_key=server_key)

    @classmethod
    def from_password(cls, password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> ScramVerifier:
        """Derive a verifier exactly as PostgreSQL's scram_build_secret() would."""
        if salt is None:
            salt = secrets.token_bytes(DEFAULT_SALT_LEN)
        if not isinstance(iterations, int) or not 1 <= iterations <= MAX_VERIFIER_ITERATIONS:
            raise ValueError("SCRAM iteration count out of range")
        if not isinstance(salt, bytes) or not salt:
            raise ValueError("SCRAM salt must be non-empty bytes")
        salted = _salted_password(saslprep(password), salt, iterations)
        client_key, server_key = _client_server_keys(salted)
        return cls(iterations=iterations, salt=salt, stored_key=_h(client_key), server_key=server_key)

    def to_text(self) -> str:
        return (
            f"{self.PREFIX}{self.iterations}:{_b64encode(self.salt)}"
            f"${_b64encode(self.stored_key)}:{_b64encode(self.server_key)}"
        )

    def verify_password(self, password: str | bytes) -> bool:
        """True if *password* produces this verifier (constant-time compare).

        Costs one PBKDF2 run of ``iterations`` rounds."""
        salted = _salted_password(saslprep(password), self.salt, self.iterations)
        client_key, _ = _client_server_keys(salted)
        return hmac.compare_digest(_h(client_key), self.stored_key)


# --------------------------------------------------------------------------- credential

_MD5_TEXT = re.compile(r"md5[0-9a-f]{32}")


@dataclass(frozen=True)
class Credential:
    """What [users.NAME].password in the config holds: plaintext, 'md5' + 32 hex
    (md5(password+username)), or a SCRAM-SHA-256 verifier."""

    user: str
    kind: str  # "plain" | "md5" | "scram"
    plaintext: str | None = field(repr=False)
    md5_hash: str | None = field(repr=False)
    scram: ScramVerifier | None

    def __post_init__(self) -> None:
        # Guard direct construction too, so later code can trust the field combination.
        ok = {
            "plain": self.plaintext is not None and self.md5_hash is not None and self.scram is not None,
            "md5": self.plaintext is None and self.md5_hash is not None and self.scram is None,
            "scram": self.plaintext is None and self.md5_hash is None and self.scram is not None,
        }
        if not ok.get(self.kind, False):
            raise ValueError(f"inconsistent credential fields for kind {self.kind!r}")

    @classmethod
    def parse(cls, user: str, value: str) -> Credential:
        """Classify a configured password value.

        Like PostgreSQL's get_password_type(), 'md5...' and 'SCRAM-SHA-256$...' are
        hashes, everything else is plaintext.  Unlike PostgreSQL, a value carrying one
        of those prefixes but malformed is rejected (ValueError) instead of silently
        becoming a plaintext password nobody would type."""
        if not isinstance(user, str) or not user:
            raise ValueError("credential user name must be a non-empty string")
        if not isinstance(value, str) or not value:
            # PostgreSQL also refuses empty passwords.
            raise ValueError(f"password for user {user!r} must be a non-empty string")
        if value.startswith(ScramVerifier.PREFIX):
            try:
                verifier = ScramVerifier.parse(value)
            except ValueError as exc:
                raise ValueError(f"password for user {user!r}: {exc}") from None
            return cls(user=user, kind="scram", plaintext=None, md5_hash=None, scram=verifier)
        if value.startswith("md5"):
            if _MD5_TEXT.fullmatch(value) is None:
                raise ValueError(
                    f"password for user {user!r} starts with 'md5' but is not 'md5' followed by "
                    "32 lowercase hex digits"
                )
            return cls(user=user, kind="md5", plaintext=None, md5_hash=value, scram=None)
        # Derived once: a fresh random salt per process start, like PgBouncer does for
        # plaintext entries; clients cannot tell it from a stored verifier.
        return cls(
            user=user,
            kind="plain",
            plaintext=value,
            md5_hash=md5_hash(user, value),
            scram=ScramVerifier.from_password(value),
        )


def mock_scram_verifier(user: str, secret: bytes) -> ScramVerifier:
    """Deterministic fake verifier for an unknown user, as PostgreSQL's
    scram_mock_salt(): the same user always gets the same salt, so probing cannot
    tell unknown users from known ones.  Use it with ScramServerExchange(mock=True).

    *secret* is a per-installation random value of at least 16 bytes; without it an
    attacker could recompute the salt and spot the fake."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
        raise ValueError("mock SCRAM secret must be at least 16 bytes")
    secret = bytes(secret)
    name = user.encode("utf-8", "surrogatepass")
    salt = _hmac(secret, name)[:DEFAULT_SALT_LEN]
    # Keys nobody can match without the secret (a SHA-256 preimage), so even a caller
    # that forgets mock=True cannot let anyone in.
    stored_key = _hmac(secret, b"pgtwist mock StoredKey\x00" + name)
    server_key = _hmac(secret, b"pgtwist mock ServerKey\x00" + name)
    return ScramVerifier(iterations=DEFAULT_ITERATIONS, salt=salt, stored_key=stored_key, server_key=server_key)
