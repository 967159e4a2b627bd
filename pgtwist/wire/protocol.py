"""Protocol constants: message type bytes, startup codes and the size limits the proxy enforces."""

# Startup-phase request codes (the int32 after the length of an untyped packet).
PROTOCOL_3_0 = 3 << 16
PROTOCOL_LATEST_MINOR = 0  # the newest 3.x minor version the proxy speaks to clients
CANCEL_REQUEST_CODE = (1234 << 16) | 5678
SSL_REQUEST_CODE = (1234 << 16) | 5679
GSSENC_REQUEST_CODE = (1234 << 16) | 5680

# PostgreSQL refuses startup packets above 10,000 bytes (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10_000
# During authentication PostgreSQL reads password/SASL messages bounded by PG_MAX_AUTH_TOKEN_LENGTH.
MAX_AUTH_MESSAGE = 65_535
# PostgreSQL's PQ_LARGE_MESSAGE_LIMIT: no protocol message may exceed 1 GB - 1.
MAX_PROTOCOL_MESSAGE = 0x3FFFFFFF

# Frontend (client -> server) message types.
BIND = ord("B")
CLOSE = ord("C")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
DESCRIBE = ord("D")
EXECUTE = ord("E")
FLUSH = ord("H")
FUNCTION_CALL = ord("F")
PARSE = ord("P")
PASSWORD = ord("p")  # PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse
QUERY = ord("Q")
SYNC = ord("S")
TERMINATE = ord("X")

# Backend (server -> client) message types.
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
COMMAND_COMPLETE = ord("C")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
COPY_BOTH_RESPONSE = ord("W")
DATA_ROW = ord("D")
EMPTY_QUERY_RESPONSE = ord("I")
ERROR_RESPONSE = ord("E")
NEGOTIATE_PROTOCOL_VERSION = ord("v")
NO_DATA = ord("n")
NOTICE_RESPONSE = ord("N")
NOTIFICATION_RESPONSE = ord("A")
PARAMETER_DESCRIPTION = ord("t")
PARAMETER_STATUS = ord("S")
PARSE_COMPLETE = ord("1")
PORTAL_SUSPENDED = ord("s")
READY_FOR_QUERY = ord("Z")
ROW_DESCRIPTION = ord("T")

# Authentication request codes carried in an Authentication ('R') message.
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# ReadyForQuery transaction status bytes.
TX_IDLE = ord("I")
TX_IN_TRANSACTION = ord("T")
TX_FAILED = ord("E")
