"""Exceptions the sans-IO codec raises: each carries the SQLSTATE the client should see."""

from pgtwist.wire import sqlstate


class WireError(Exception):
    """Bytes that break the protocol; the connection that sent them is closed."""

    sqlstate = sqlstate.PROTOCOL_VIOLATION

    def __init__(self, message: str, code: str | None = None, *, silent: bool = False):
        super().__init__(message)
        if code is not None:
            self.sqlstate = code
        # PostgreSQL's COMMERROR: logged, never answered. For bytes that are not the protocol
        # at all (a first packet of impossible length), whose sender may not read an answer.
        self.silent = silent


class ProtocolViolation(WireError):
    """A malformed or out-of-place message (08P01)."""


class MessageTooLarge(ProtocolViolation):
    """A length beyond the configured bound (08P01, as PostgreSQL's 'invalid message length')."""


class UnsupportedProtocol(WireError):
    """A startup packet with a protocol major version we do not speak (0A000)."""

    sqlstate = sqlstate.FEATURE_NOT_SUPPORTED
