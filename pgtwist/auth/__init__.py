"""Pure (no I/O) PostgreSQL authentication: credentials, SCRAM-SHA-256 and md5."""

from pgtwist.auth.credentials import (
    AuthError,
    AuthFailed,
    AuthProtocolError,
    Credential,
    ScramVerifier,
    mock_scram_verifier,
    saslprep,
)
from pgtwist.auth.md5 import cleartext_verify, md5_hash, md5_salted_response, md5_verify
from pgtwist.auth.scram import (
    MAX_CLIENT_ITERATIONS,
    MAX_MESSAGE_BYTES,
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    ScramClientExchange,
    ScramServerExchange,
)

__all__ = [
    "AuthError",
    "AuthFailed",
    "AuthProtocolError",
    "Credential",
    "ScramVerifier",
    "mock_scram_verifier",
    "saslprep",
    "cleartext_verify",
    "md5_hash",
    "md5_salted_response",
    "md5_verify",
    "MAX_CLIENT_ITERATIONS",
    "MAX_MESSAGE_BYTES",
    "SCRAM_SHA_256",
    "SCRAM_SHA_256_PLUS",
    "ScramClientExchange",
    "ScramServerExchange",
]
