"""Tests for pgtwist.auth.md5: md5 hashing, salted responses and password checks."""

import hashlib

import pytest

from pgtwist.auth import Credential, cleartext_verify, md5_hash, md5_salted_response, md5_verify

# Produced by PostgreSQL 15.18: SET password_encryption = 'md5'; CREATE ROLE postgres2 PASSWORD 'secret'.
PG_MD5_POSTGRES2 = "md5a99489f2ba8d41137689bf5947f835e0"
# Produced by PostgreSQL 15.18 for password "\u2168" (NFKC -> "IX").
PG_SCRAM_ROMAN = "SCRAM-SHA-256$4096:mxmKVIFkUKwAtvVLAnZ9Ug==$sJUYiUvbwlQ5vbJrma7VPEUgLonSt0sEBpGu1iV0dvQ=:JWzeXYxuFwD/LDWKHgo7vW5U+4MNcOp8UfUb4dKXjrA="
SALT = b"\x01\x02\x03\x04"


def test_md5_hash_matches_postgres():
    assert md5_hash("postgres", "secret") == "md5" + hashlib.md5(b"secretpostgres").hexdigest()
    assert md5_hash("postgres2", "secret") == PG_MD5_POSTGRES2


def test_md5_salted_response_is_what_libpq_sends():
    inner = hashlib.md5(b"secretpostgres").hexdigest()
    expected = b"md5" + hashlib.md5(inner.encode() + SALT).hexdigest().encode()
    assert md5_salted_response(md5_hash("postgres", "secret"), SALT) == expected


@pytest.mark.parametrize("hash_text, salt", [("md5" + "0" * 31, SALT), ("x" * 35, SALT), ("md5" + "0" * 32, b"abc")])
def test_md5_salted_response_rejects_bad_input(hash_text, salt):
    with pytest.raises(ValueError):
        md5_salted_response(hash_text, salt)


@pytest.mark.parametrize("value", ["secret", "md5" + hashlib.md5(b"secretpostgres").hexdigest()])
def test_md5_verify_round_trip(value):
    cred = Credential.parse("postgres", value)
    response = md5_salted_response(md5_hash("postgres", "secret"), SALT)
    assert md5_verify(cred, SALT, response)
    assert md5_verify(cred, SALT, response + b"\x00")  # as received, NUL included
    assert not md5_verify(cred, b"\x04\x03\x02\x01", response)
    assert not md5_verify(cred, SALT, md5_salted_response(md5_hash("postgres", "wrong"), SALT))
    assert not md5_verify(cred, SALT, md5_salted_response(md5_hash("other", "secret"), SALT))
    for junk in (b"", b"\x00", b"md5", response[:-1], response + b"x", b"\xff" * 100):
        assert not md5_verify(cred, SALT, junk)


def test_md5_verify_scram_credential_always_fails():
    cred = Credential.parse("postgres", PG_SCRAM_ROMAN)
    assert not md5_verify(cred, SALT, md5_salted_response(md5_hash("postgres", "\u2168"), SALT))


def test_cleartext_verify_plain():
    cred = Credential.parse("postgres", "secret")
    assert cleartext_verify(cred, b"secret")
    assert cleartext_verify(cred, b"secret\x00")
    assert not cleartext_verify(cred, b"Secret")
    assert not cleartext_verify(cred, b"secret ")
    assert not cleartext_verify(cred, b"")
    assert not cleartext_verify(cred, b"\x00")


def test_cleartext_verify_md5():
    cred = Credential.parse("postgres2", PG_MD5_POSTGRES2)
    assert cleartext_verify(cred, b"secret")
    assert cleartext_verify(cred, b"secret\x00")
    assert not cleartext_verify(cred, b"secre")
    assert not cleartext_verify(cred, PG_MD5_POSTGRES2.encode())  # the hash is not the password


def test_cleartext_verify_scram():
    cred = Credential.parse("postgres", PG_SCRAM_ROMAN)
    assert cleartext_verify(cred, "\u2168".encode())
    assert cleartext_verify(cred, b"IX")  # same bytes after SASLprep, as PostgreSQL sees it
    assert not cleartext_verify(cred, b"IX ")
    assert not cleartext_verify(cred, b"\xff\xfe")
    assert not cleartext_verify(cred, b"")


def test_cleartext_verify_non_utf8_plaintext_bytes():
    cred = Credential.parse("postgres", "p\u00e4ss")
    assert cleartext_verify(cred, "p\u00e4ss".encode("utf-8"))
    assert not cleartext_verify(cred, "p\u00e4ss".encode("latin-1"))
