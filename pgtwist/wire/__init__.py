"""Sans-IO PostgreSQL wire protocol: framing, messages, SQLSTATEs and limits (no Twisted here)."""

from pgtwist.wire import messages, protocol, sqlstate
from pgtwist.wire.errors import MessageTooLarge, ProtocolViolation, UnsupportedProtocol, WireError
from pgtwist.wire.framing import MessageScanner, frame, pop_message, pop_messages, pop_startup_packet

__all__ = [
    "MessageScanner",
    "MessageTooLarge",
    "ProtocolViolation",
    "UnsupportedProtocol",
    "WireError",
    "frame",
    "messages",
    "pop_message",
    "pop_messages",
    "pop_startup_packet",
    "protocol",
    "sqlstate",
]
