"""The proxy's one error type: a SQLSTATE, message, detail, hint and severity that encode as an ErrorResponse."""

from struct import Struct

from pgtwist.wire import sqlstate

_INT32 = Struct("!I")
_ERROR_RESPONSE = ord("E")

# Field type bytes of ErrorResponse/NoticeResponse (protocol docs, "Error and Notice Message Fields").
FIELD_SEVERITY = "S"
FIELD_SEVERITY_NONLOCALIZED = "V"
FIELD_SQLSTATE = "C"
FIELD_MESSAGE = "M"
FIELD_DETAIL = "D"
FIELD_HINT = "H"


def error_fields(severity: str, code: str, message: str, detail: str | None = None, hint: str | None = None) -> dict:
    fields = {FIELD_SEVERITY: severity, FIELD_SEVERITY_NONLOCALIZED: severity, FIELD_SQLSTATE: code, FIELD_MESSAGE: message}
    if detail:
        fields[FIELD_DETAIL] = detail
    if hint:
        fields[FIELD_HINT] = hint
    return fields


def encode_fields(fields: dict[str, str]) -> bytes:
    """The body of an ErrorResponse/NoticeResponse carrying *fields*."""
    # Values may come from a node's own ErrorResponse: drop NULs rather than fail on them.
    return b"".join(k[:1].encode() + v.replace("\x00", "").encode() + b"\x00" for k, v in fields.items() if k and v is not None) + b"\x00"


class PgError(Exception):
    """An error the client is told as PostgreSQL would tell it: SQLSTATE, message, detail, hint, severity.

    Every error the proxy makes for a client is one of these (or a subclass naming where it
    arose, so ``except`` sites keep their meaning). One a node sent keeps the node's own fields
    whole (``from_fields``), so that the client sees them byte for byte.
    """

    sqlstate: str = sqlstate.INTERNAL_ERROR
    severity: str = "ERROR"

    def __init__(self, code: str | None, message: str, detail: str | None = None, hint: str | None = None, *, severity: str | None = None):
        super().__init__(message)
        if code is not None:
            self.sqlstate = code
        self.message = message
        self.detail = detail
        self.hint = hint
        if severity is not None:
            self.severity = severity
        self._fields: dict[str, str] | None = None

    @classmethod
    def from_fields(cls, fields: dict[str, str]):
        """The error a node sent (its ErrorResponse fields), kept whole for the client."""
        e = cls(
            fields.get(FIELD_SQLSTATE) or sqlstate.INTERNAL_ERROR,
            fields.get(FIELD_MESSAGE, "login to node failed"),
            fields.get(FIELD_DETAIL),
            fields.get(FIELD_HINT),
            severity=fields.get(FIELD_SEVERITY_NONLOCALIZED, fields.get(FIELD_SEVERITY)),
        )
        e._fields = fields
        return e

    @property
    def fields(self) -> dict[str, str]:
        """ErrorResponse fields for this error (a node's own, when it came from one)."""
        if self._fields is not None:
            return self._fields
        return error_fields(self.severity, self.sqlstate, self.message, self.detail, self.hint)

    def encode(self, severity: str | None = None) -> bytes:
        """This error as an ErrorResponse message; *severity* overrides the error's own."""
        fields = self.fields
        if severity is not None and severity != fields.get(FIELD_SEVERITY):
            fields = dict(fields, **{FIELD_SEVERITY: severity, FIELD_SEVERITY_NONLOCALIZED: severity})
        body = encode_fields(fields)
        return bytes((_ERROR_RESPONSE,)) + _INT32.pack(len(body) + 4) + body


class WireError(PgError):
    """Bytes that break the protocol; the connection that sent them is closed (FATAL).

    The class names the SQLSTATE, so the message comes first: ``ProtocolViolation("why")``.
    """

    sqlstate = sqlstate.PROTOCOL_VIOLATION
    severity = "FATAL"

    def __init__(self, message: str, code: str | None = None, *, silent: bool = False):
        super().__init__(code, message)
        # PostgreSQL's COMMERROR: logged, never answered. For bytes that are not the protocol
        # at all (a first packet of impossible length), whose sender may not read an answer.
        self.silent = silent


class ProtocolViolation(WireError):
    """A malformed or out-of-place message (PROTOCOL_VIOLATION)."""


class MessageTooLarge(ProtocolViolation):
    """A length beyond the configured bound (PROTOCOL_VIOLATION, as PostgreSQL's 'invalid message length')."""


class UnsupportedProtocol(WireError):
    """A startup packet with a protocol major version we do not speak (FEATURE_NOT_SUPPORTED)."""

    sqlstate = sqlstate.FEATURE_NOT_SUPPORTED
