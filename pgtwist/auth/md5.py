"""PostgreSQL md5 password hashing and the md5 / cleartext password checks."""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # runtime import would be circular: credentials derives md5 hashes with us
    from pgtwist.auth.credentials import Credential

__all__ = ["md5_hash", "md5_salted_response", "md5_verify", "cleartext_verify"]

# PostgreSQL only recognises lowercase hex (MD5_PASSWD_CHARSET), so do we.
_MD5_TEXT = re.compile(r"md5[0-9a-f]{32}")


def _md5_hash_bytes(user: bytes, password: bytes) -> bytes:
    # PostgreSQL salts the stored hash with the role name: md5(password || rolname).
    return b"md5" + hashlib.md5(password + user).hexdigest().encode("ascii")


def md5_hash(user: str, password: str) -> str:
    """Return ``'md5' + hex(md5(password + user))``, what pg_authid stores for md5 roles."""
    return _md5_hash_bytes(user.encode("utf-8"), password.encode("utf-8")).decode("ascii")


def md5_salted_response(md5_hash_text: str, salt: bytes) -> bytes:
    """Return what a client sends in PasswordMessage for AuthenticationMD5Password
    (without the trailing NUL): ``b'md5' + hex(md5(hex_part_of_hash + salt))``."""
    if not isinstance(md5_hash_text, str) or _MD5_TEXT.fullmatch(md5_hash_text) is None:
        raise ValueError("md5 hash must be 'md5' followed by 32 lowercase hex digits")
    if not isinstance(salt, (bytes, bytearray)) or len(salt) != 4:
        raise ValueError("md5 salt must be exactly 4 bytes")
    return b"md5" + hashlib.md5(md5_hash_text[3:].encode("ascii") + bytes(salt)).hexdigest().encode("ascii")


def _strip_nul(data: bytes) -> bytes:
    # PasswordMessage carries a C string; callers may hand us the terminator or not.
    return data[:-1] if data.endswith(b"\x00") else data


def md5_verify(credential: Credential, salt: bytes, response: bytes) -> bool:
    """Check an md5 PasswordMessage against a credential, in constant time.

    A SCRAM-only credential always fails: like PostgreSQL we cannot derive the
    md5 hash from a SCRAM verifier."""
    if credential.md5_hash is None:
        return False
    if not isinstance(response, (bytes, bytearray)) or not isinstance(salt, (bytes, bytearray)) or len(salt) != 4:
        return False
    expected = md5_salted_response(credential.md5_hash, bytes(salt))
    return hmac.compare_digest(expected, _strip_nul(bytes(response)))


def cleartext_verify(credential: Credential, password: bytes) -> bool:
    """Check a cleartext PasswordMessage against any kind of credential, in constant time."""
    if not isinstance(password, (bytes, bytearray)):
        return False
    password = _strip_nul(bytes(password))
    # PostgreSQL refuses empty passwords outright ("empty password returned by client").
    if not password:
        return False
    if credential.kind == "plain" and credential.plaintext is not None:
        return hmac.compare_digest(credential.plaintext.encode("utf-8"), password)
    if credential.kind == "md5" and credential.md5_hash is not None:
        expected = credential.md5_hash.encode("ascii")
        return hmac.compare_digest(expected, _md5_hash_bytes(credential.user.encode("utf-8"), password))
    if credential.kind == "scram" and credential.scram is not None:
        return credential.scram.verify_password(password)
    return False
