"""Tests for pgtwist.auth.credentials: verifiers, SASLprep, Credential parsing, mock verifiers."""

import base64
import hashlib
import hmac

import pytest

from pgtwist.auth import Credential, ScramVerifier, md5_hash, mock_scram_verifier, saslprep

# Verifiers produced by PostgreSQL 15.18 (`SET password_encryption = 'scram-sha-256';
# CREATE ROLE r PASSWORD '...'` in a UTF8 database, then read from pg_authid).  The
# passwords exercise each branch of pg_saslprep, so matching them proves we derive
# the same keys as the server for non-ASCII passwords too.
PG_VERIFIERS = {
    # plain ASCII: the fast path, no normalisation
    "pencil": "SCRAM-SHA-256$4096:ClviuVSe5KwJvy+YLnItRQ==$oZbuo/IxFWYMTTHsHg0J+PgFEbHeGxvxZNzvc2lqQ4I=:PGOSTuBpYmRbSlz2LWsam0G1budq+JK16DdcFzr6OXc=",
    # ASCII control character: still the fast path (SASLprep proper would prohibit it)
    "\x07bell": "SCRAM-SHA-256$4096:DXt84AaOoDkp+jBlzUNOzQ==$jL1CMFgKg0emNOaxbtU3+OAs0TwHcEhNJDeBQPth1mg=:KwwZ6EE/J6aIxFLp1f9+RY8gna0tySe3kudKLv/7zuY=",
    # NFKC: roman numeral nine -> "IX"
    "\u2168": "SCRAM-SHA-256$4096:mxmKVIFkUKwAtvVLAnZ9Ug==$sJUYiUvbwlQ5vbJrma7VPEUgLonSt0sEBpGu1iV0dvQ=:JWzeXYxuFwD/LDWKHgo7vW5U+4MNcOp8UfUb4dKXjrA=",
    # NFKC: ligature fi -> "fi"
    "\ufb01": "SCRAM-SHA-256$4096:N0t/pQ9SLZriveXQtjwKSg==$23TMwapApI+W+MdHHufwMgWaHMk/u5q1tkwLt82S95c=:BiW4yIfMFg+IOEh4cDasyxuNJ0KkAFjrES5E+IDIKDk=",
    # NFKC composes A + combining ring into U+00C5
    "A\u030a": "SCRAM-SHA-256$4096:2OSNulESSSsc04/MiUhRHQ==$P4PqpWh34zrxsmbBuh7vTDq7P+Cl8gxgEXzRGx/89ks=:95YyUa3SsBX9eDZSxz+ssShzDnwTaHrpLbrI27sz9RY=",
    # soft hyphen is mapped to nothing
    "a\u00adb": "SCRAM-SHA-256$4096:1ec+GvgVqzuOWESCPdepmA==$T2OHVAmfVGmrrHUfoY0dWCgCoG2h7Uyq9pZ8azheNZU=:9H1FWQw5OLcT/XlulG9brYjkp7tEZm+rla7x4Axa8iI=",
    # no-break space is mapped to SPACE
    "\u00a0x": "SCRAM-SHA-256$4096:nILd+auvYQkMx0DBHNy7cA==$B+D9s6T8fSdnW6clmkUT6Cnk4uYI3rMhmA8jDXHtK80=:XwYaat3hQUz/eh/wFTR8AXE07BCa9f7YV9KWV4Kn9n8=",
    # LEFT-TO-RIGHT MARK is prohibited (C.8): raw bytes are used
    "\u200eabc": "SCRAM-SHA-256$4096:ALUtwIwNZYCKhpehkffE1A==$tcfgp+ljC3V9fsDnLnMqlOkzNT2en+MUL9SKBtrEnc8=:dZfOpXB5dK5X5pS42JJyTRQQ7vt2nTI5R1ahGboxOR0=",
    # RandALCat mixed with LCat violates the bidi rule: raw bytes
    "\u05d0a": "SCRAM-SHA-256$4096:EyKYlS5LWR3fTXTl/1Ymmw==$o/xDajrOA6ZShIL805skod6SatKpBt79UkHRi+Hrl0g=:n7Z5bDzb5b1DPsStCCvQTy40AhRPqN4EXPeFMkwKi1g=",
    # unassigned in Unicode 3.2 although NFKC maps it to "0.": pg_saslprep checks the
    # input, not the normalised output, so it falls back to raw bytes
    "\U0001f100": "SCRAM-SHA-256$4096:jlAp7qThtSGDBazqqo5iWw==$Gyd3cGQcoFXMODehGvTzbv7OT0uPQgroH8m6K9413hI=:34V0DXA/P0rM19bhpspLjV/z7L+BUvdgYDtbkGp8Ymo=",
    # an emoji (unassigned in 3.2) next to an umlaut: raw bytes
    "p\u00e4ss\U0001f600": "SCRAM-SHA-256$4096:4ifRh5qRucIhsaxVs1q5OQ==$PMiinyt3WolYOvsd2/YaU5eGw0PWUXflpML2bVPrEqM=:vrBp9Q/ldQjXB2iZB++rIVC5gkwCXNacC8AGjcyfamc=",
}


def _hand_verifier(prepared: bytes, salt: bytes, iterations: int) -> str:
    """RFC 5802 key derivation written out independently of the module under test."""
    salted = hashlib.pbkdf2_hmac("sha256", prepared, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


# --------------------------------------------------------------------------- ScramVerifier


@pytest.mark.parametrize("password", list(PG_VERIFIERS))
def test_postgres_verifiers_parse_round_trip_and_match_our_derivation(password):
    text = PG_VERIFIERS[password]
    verifier = ScramVerifier.parse(text)
    assert verifier.to_text() == text
    assert verifier.iterations == 4096 and len(verifier.salt) == 16
    assert ScramVerifier.from_password(password, verifier.salt, verifier.iterations) == verifier
    assert verifier.verify_password(password)
    assert verifier.verify_password(password.encode("utf-8"))
    assert not verifier.verify_password(password + "x")


def test_from_password_matches_hand_derivation_with_fixed_salt():
    salt = bytes(range(16))
    assert ScramVerifier.from_password("pencil", salt, 4096).to_text() == _hand_verifier(b"pencil", salt, 4096)
    assert ScramVerifier.from_password("\u2168", salt, 10).to_text() == _hand_verifier(b"IX", salt, 10)


def test_from_password_random_salt_defaults():
    a = ScramVerifier.from_password("pencil")
    b = ScramVerifier.from_password("pencil")
    assert a.iterations == 4096 and len(a.salt) == 16
    assert a.salt != b.salt
    assert a.verify_password("pencil") and b.verify_password("pencil")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SCRAM-SHA-1$4096:c2FsdA==$AAAA:AAAA",
        "SCRAM-SHA-256$",
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-256$4096$a:b",
        "SCRAM-SHA-256$abc:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$-1:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$99999999999:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2Fsd!==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",  # empty salt
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 42 + "==:" + "A" * 43 + "=",  # 31-byte key
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43,  # bad padding
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=:extra",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=$extra",
        "SCRAM-SHA-256$\uff14096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",  # fullwidth digit
    ],
)
def test_verifier_parse_rejects_malformed(text):
    with pytest.raises(ValueError):
        ScramVerifier.parse(text)


def test_verifier_parse_error_does_not_echo_keys():
    stored = base64.b64encode(b"S" * 32).decode()
    text = f"SCRAM-SHA-256$4096:c2FsdA==${stored}:{stored[:-4]}"  # server key too short
    with pytest.raises(ValueError) as info:
        ScramVerifier.parse(text)
    assert stored not in str(info.value) and stored[:-4] not in str(info.value)


def test_verifier_constructor_validates():
    with pytest.raises(ValueError):
        ScramVerifier(iterations=0, salt=b"s", stored_key=b"k" * 32, server_key=b"k" * 32)
    with pytest.raises(ValueError):
        ScramVerifier(iterations=1, salt=b"", stored_key=b"k" * 32, server_key=b"k" * 32)
    with pytest.raises(ValueError):
        ScramVerifier(iterations=1, salt=b"s", stored_key=b"k" * 31, server_key=b"k" * 32)


def test_verifier_repr_hides_keys():
    verifier = ScramVerifier.parse(PG_VERIFIERS["pencil"])
    text = repr(verifier)
    for secret in (verifier.stored_key, verifier.server_key):
        assert repr(secret) not in text
        assert base64.b64encode(secret).decode() not in text
        assert secret.hex() not in text


# --------------------------------------------------------------------------- SASLprep


@pytest.mark.parametrize(
    "password, expected",
    [
        ("pencil", b"pencil"),
        ("\x07bell", b"\x07bell"),
        ("\u2168", b"IX"),
        ("a\u00adb", b"ab"),
        ("\u00a0x", b" x"),
        ("\u200eabc", "\u200eabc".encode()),
        ("\u05d0a", "\u05d0a".encode()),
        ("\u05d0\u05d1", "\u05d0\u05d1".encode()),  # pure RTL is fine and unchanged
        ("\u00ad", "\u00ad".encode()),  # maps to empty: prohibited, raw fallback
        (b"\xff\xfe", b"\xff\xfe"),  # invalid UTF-8: raw fallback
        ("\u00e9" * 600, ("\u00e9" * 600).encode()),  # > 1024 bytes: raw
    ],
)
def test_saslprep_matches_pg_saslprep(password, expected):
    assert saslprep(password) == expected


# --------------------------------------------------------------------------- Credential


def test_credential_plain_derives_md5_and_scram():
    cred = Credential.parse("alice", "s3cret")
    assert cred.kind == "plain"
    assert cred.plaintext == "s3cret"
    assert cred.md5_hash == md5_hash("alice", "s3cret")
    assert cred.scram is not None and cred.scram.iterations == 4096
    assert cred.scram.verify_password("s3cret")


def test_credential_md5():
    value = "md5" + hashlib.md5(b"s3cretalice").hexdigest()
    cred = Credential.parse("alice", value)
    assert (cred.kind, cred.plaintext, cred.md5_hash, cred.scram) == ("md5", None, value, None)


def test_credential_scram():
    cred = Credential.parse("alice", PG_VERIFIERS["pencil"])
    assert cred.kind == "scram"
    assert cred.plaintext is None and cred.md5_hash is None
    assert cred.scram == ScramVerifier.parse(PG_VERIFIERS["pencil"])


@pytest.mark.parametrize(
    "value",
    [
        "",
        "md5",
        "md5" + "0" * 31,
        "md5" + "0" * 33,
        "md5" + "g" * 32,
        "md5" + "A" * 32,  # PostgreSQL only accepts lowercase hex
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-256$nonsense",
    ],
)
def test_credential_rejects_malformed(value):
    with pytest.raises(ValueError):
        Credential.parse("alice", value)


def test_credential_rejects_empty_user():
    with pytest.raises(ValueError):
        Credential.parse("", "pw")


def test_credential_scram_error_does_not_echo_verifier():
    bad = PG_VERIFIERS["pencil"][:-3]  # damaged server key
    with pytest.raises(ValueError) as info:
        Credential.parse("alice", bad)
    assert bad.split("$")[2] not in str(info.value)


def test_credential_prefix_lookalikes_are_plaintext():
    # Only the exact prefixes mark hashes, as in PostgreSQL's get_password_type().
    for value in ("MD5" + "0" * 32, "scram-sha-256$x", "SCRAM-SHA-256"):
        assert Credential.parse("alice", value).kind == "plain"


def test_credential_constructor_checks_consistency():
    with pytest.raises(ValueError):
        Credential(user="a", kind="md5", plaintext="x", md5_hash=None, scram=None)
    with pytest.raises(ValueError):
        Credential(user="a", kind="bogus", plaintext=None, md5_hash=None, scram=None)


@pytest.mark.parametrize("value", ["correct horse battery", "md5" + hashlib.md5(b"pwalice").hexdigest(), PG_VERIFIERS["pencil"]])
def test_credential_repr_hides_secrets(value):
    cred = Credential.parse("alice", value)
    text = repr(cred)
    assert "alice" in text
    assert value not in text
    for secret in (cred.plaintext, cred.md5_hash):
        if secret is not None:
            assert secret not in text
    if cred.scram is not None:
        for key in (cred.scram.stored_key, cred.scram.server_key):
            assert repr(key) not in text and base64.b64encode(key).decode() not in text


# --------------------------------------------------------------------------- mock verifier


def test_mock_verifier_is_deterministic_per_user_and_secret():
    secret = b"k" * 32
    a1 = mock_scram_verifier("ghost", secret)
    a2 = mock_scram_verifier("ghost", secret)
    b = mock_scram_verifier("other", secret)
    c = mock_scram_verifier("ghost", b"j" * 32)
    assert a1 == a2
    assert a1.salt == hmac.new(secret, b"ghost", hashlib.sha256).digest()[:16]
    assert a1.iterations == 4096
    assert a1.salt != b.salt and a1.salt != c.salt
    # Looks like a real verifier from the outside.
    assert ScramVerifier.parse(a1.to_text()) == a1


def test_mock_verifier_needs_a_real_secret():
    with pytest.raises(ValueError):
        mock_scram_verifier("ghost", b"short")


def test_mock_verifier_accepts_no_password():
    verifier = mock_scram_verifier("ghost", b"k" * 32)
    for guess in ("", "ghost", "password", "k" * 32):
        assert not verifier.verify_password(guess)
