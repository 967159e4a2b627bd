"""Named prepared statements across pooled server connections: client names, shared server names, per-server LRU."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from hashlib import blake2b

from pgtwist.wire import messages as m
from pgtwist.wire.errors import ProtocolViolation

SERVER_NAME_PREFIX = "pgtwist_"
# The statement and portal of SQL the proxy runs on a client's server connection (settings
# synced and read back, the read-your-writes WAL position, startup settings restored after RESET).
INTERNAL_NAME = SERVER_NAME_PREFIX + "internal"


def internal_batch(statements: list[str]) -> bytes:
    """The proxy's own *statements*, in one implicit transaction ended by one Sync (one ReadyForQuery),
    leaving the client's unnamed prepared statement and unnamed portal alone.

    A simple Query would not: PostgreSQL drops the unnamed statement (and portal) whenever a
    Query arrives, so a client that parsed one, then ran something whose effects pgtwist reads
    back, would find it gone where a direct connection keeps it. Extended protocol under a name
    of the proxy's own does not touch them. What an earlier batch may have left under that name
    (an error skips the rest of a batch up to its Sync) is closed first; closing a name that does
    not exist is no error, and Close works in an aborted transaction too. Each statement must be
    one statement (Parse takes no lists); its rows come back as text DataRows.
    """
    out = [m.close("P", INTERNAL_NAME), m.close("S", INTERNAL_NAME)]
    for sql in statements:
        out += [
            m.parse(INTERNAL_NAME, sql),
            m.bind(INTERNAL_NAME, INTERNAL_NAME),
            m.execute(INTERNAL_NAME),
            m.close("P", INTERNAL_NAME),
            m.close("S", INTERNAL_NAME),
        ]
    out.append(m.sync())
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class Statement:
    """What a client prepared: the Parse body after the name (query text + parameter types), exactly."""

    definition: bytes
    server_name: str

    @classmethod
    def from_definition(cls, definition: bytes) -> "Statement":
        # One server-side name per (query text, parameter types), shared by every client that
        # prepares the same thing: a server connection prepares it once, whoever asks.
        return cls(definition, SERVER_NAME_PREFIX + blake2b(definition, digest_size=12).hexdigest())

    @property
    def query(self) -> str:
        return self.definition[: self.definition.index(b"\x00")].decode("utf-8", "replace")


def _cstring_end(body: bytes, start: int, what: str) -> int:
    end = body.find(b"\x00", start)
    if end < 0:
        raise ProtocolViolation(f"invalid {what} message: unterminated string")
    return end


def split_parse(body: bytes) -> tuple[str, bytes]:
    """Parse body -> (statement name, definition)."""
    end = _cstring_end(body, 0, "Parse")
    return body[:end].decode("utf-8", "replace"), body[end + 1 :]


def parse_body(name: str, definition: bytes) -> bytes:
    return name.encode() + b"\x00" + definition


def split_bind(body: bytes) -> tuple[bytes, str, bytes]:
    """Bind body -> (portal name with its NUL, statement name, the rest)."""
    p_end = _cstring_end(body, 0, "Bind")
    s_end = _cstring_end(body, p_end + 1, "Bind")
    return body[: p_end + 1], body[p_end + 1 : s_end].decode("utf-8", "replace"), body[s_end + 1 :]


def bind_body(portal: bytes, statement: str, rest: bytes) -> bytes:
    return portal + statement.encode() + b"\x00" + rest


def split_target(body: bytes, what: str) -> tuple[int, str]:
    """Describe/Close body -> (kind byte 'S' or 'P', name)."""
    if len(body) < 2:
        raise ProtocolViolation(f"invalid {what} message")
    end = _cstring_end(body, 1, what)
    kind = body[0]
    if kind not in (ord("S"), ord("P")):
        raise ProtocolViolation(f"invalid {what} message subtype {kind}")
    return kind, body[1:end].decode("utf-8", "replace")


def target_body(kind: int, name: str) -> bytes:
    return bytes((kind,)) + name.encode() + b"\x00"


class ServerStatements:
    """Which shared statements one server connection holds, least recently used first (bounded)."""

    __slots__ = ("names", "limit")

    def __init__(self, limit: int):
        self.names: OrderedDict[str, None] = OrderedDict()
        self.limit = limit

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def touch(self, name: str) -> None:
        self.names.move_to_end(name)

    def add(self, name: str) -> list[str]:
        """Record *name*; return the least recently used names to close to stay within the limit."""
        self.names[name] = None
        self.names.move_to_end(name)
        evicted = []
        while len(self.names) > self.limit:
            old, _ = self.names.popitem(last=False)
            evicted.append(old)
        return evicted

    def discard(self, name: str) -> None:
        self.names.pop(name, None)

    def clear(self) -> None:
        self.names.clear()
