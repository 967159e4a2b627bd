"""Protocol constants: message type bytes, startup codes and the size limits the proxy enforces."""

from typing import Final

# Final, with literal values (the byte's letter beside it): mypyc compiles each use in the
# compiled core (pgtwist/compiled.py) to the number itself, not a lookup in this module.

# Startup-phase request codes (the int32 after the length of an untyped packet).
PROTOCOL_3_0: Final = 3 << 16
PROTOCOL_LATEST_MINOR: Final = 0  # the newest 3.x minor version the proxy speaks to clients
CANCEL_REQUEST_CODE: Final = (1234 << 16) | 5678
SSL_REQUEST_CODE: Final = (1234 << 16) | 5679
GSSENC_REQUEST_CODE: Final = (1234 << 16) | 5680

# PostgreSQL refuses startup packets above 10,000 bytes (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET: Final = 10_000
# During authentication PostgreSQL reads password/SASL messages bounded by PG_MAX_AUTH_TOKEN_LENGTH.
MAX_AUTH_MESSAGE: Final = 65_535
# PostgreSQL's PQ_LARGE_MESSAGE_LIMIT: no protocol message may exceed 1 GB - 1.
MAX_PROTOCOL_MESSAGE: Final = 0x3FFFFFFF

# Frontend (client -> server) message types.
BIND: Final = 66  # "B"
CLOSE: Final = 67  # "C"
COPY_DATA: Final = 100  # "d"
COPY_DONE: Final = 99  # "c"
COPY_FAIL: Final = 102  # "f"
DESCRIBE: Final = 68  # "D"
EXECUTE: Final = 69  # "E"
FLUSH: Final = 72  # "H"
FUNCTION_CALL: Final = 70  # "F"
PARSE: Final = 80  # "P"
PASSWORD: Final = 112  # "p"; PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse
QUERY: Final = 81  # "Q"
SYNC: Final = 83  # "S"
TERMINATE: Final = 88  # "X"

# Backend (server -> client) message types.
AUTHENTICATION: Final = 82  # "R"
BACKEND_KEY_DATA: Final = 75  # "K"
BIND_COMPLETE: Final = 50  # "2"
CLOSE_COMPLETE: Final = 51  # "3"
COMMAND_COMPLETE: Final = 67  # "C"
COPY_IN_RESPONSE: Final = 71  # "G"
COPY_OUT_RESPONSE: Final = 72  # "H"
COPY_BOTH_RESPONSE: Final = 87  # "W"
DATA_ROW: Final = 68  # "D"
EMPTY_QUERY_RESPONSE: Final = 73  # "I"
ERROR_RESPONSE: Final = 69  # "E"
NEGOTIATE_PROTOCOL_VERSION: Final = 118  # "v"
NO_DATA: Final = 110  # "n"
NOTICE_RESPONSE: Final = 78  # "N"
NOTIFICATION_RESPONSE: Final = 65  # "A"
PARAMETER_DESCRIPTION: Final = 116  # "t"
PARAMETER_STATUS: Final = 83  # "S"
PARSE_COMPLETE: Final = 49  # "1"
PORTAL_SUSPENDED: Final = 115  # "s"
READY_FOR_QUERY: Final = 90  # "Z"
ROW_DESCRIPTION: Final = 84  # "T"

# Authentication request codes carried in an Authentication ('R') message.
AUTH_OK: Final = 0
AUTH_KERBEROS_V5: Final = 2
AUTH_CLEARTEXT_PASSWORD: Final = 3
AUTH_MD5_PASSWORD: Final = 5
AUTH_GSS: Final = 7
AUTH_GSS_CONTINUE: Final = 8
AUTH_SSPI: Final = 9
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

# ReadyForQuery transaction status bytes.
TX_IDLE: Final = 73  # "I"
TX_IN_TRANSACTION: Final = 84  # "T"
TX_FAILED: Final = 69  # "E"
