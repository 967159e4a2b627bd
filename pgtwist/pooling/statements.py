"""Named prepared statements across pooled server connections: client names, shared server names, per-server LRU, schema clock."""

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


# internal_batch's encodings by statements: the same few batches recur (the read-your-writes WAL
# position after every writing transaction, the usual settings read back), and encoding one is
# some forty calls. Short batches only, and emptied when full (the texts name settings and
# values clients chose, so no batch may stay for good).
_BATCHES: dict[tuple[str, ...], bytes] = {}
_BATCHES_LIMIT = 256
_BATCH_CACHED_CHARS = 512


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
    key = tuple(statements)
    data = _BATCHES.get(key)
    if data is None:
        data = _encode_batch(statements)
        if sum(map(len, statements)) <= _BATCH_CACHED_CHARS:
            if len(_BATCHES) >= _BATCHES_LIMIT:
                _BATCHES.clear()
            _BATCHES[key] = data
    return data


def _encode_batch(statements: list[str]) -> bytes:
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


class Schema:
    """One database's clock for prepared statements: what a server-side copy must be newer than.

    PostgreSQL re-plans a statement when what it uses changes, but keeps the statement's
    parameter types and, for the protocol-level statements pgtwist shares, its result type:
    a copy prepared before a schema change fails (0A000 "cached plan must not change result
    type", XX000 "cache lookup failed for type"), where a client that has just prepared the
    statement on its own connection would not. So every client Parse and every DDL seen
    through pgtwist is stamped with the next tick, every server-side copy with the tick it
    was prepared at; a copy older than the client's own Parse or than the last DDL is
    prepared again (on first use, on that connection) instead of used. One per node database,
    kept across reloads, counted up only: the comparisons stay valid whatever happens to pools.
    """

    __slots__ = ("clock", "ddl_at")

    def __init__(self):
        self.clock = 0
        self.ddl_at = 0  # the tick of the last DDL seen through pgtwist

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def ddl(self) -> None:
        self.ddl_at = self.tick()


@dataclass(frozen=True, slots=True)
class Statement:
    """What a client prepared: the Parse body after the name (query text + parameter types), exactly."""

    definition: bytes
    server_name: str
    parsed_at: int = 0  # the Schema tick of the client's Parse: a server copy must be at least this new

    @classmethod
    def from_definition(cls, definition: bytes, scope: str = "", parsed_at: int = 0) -> "Statement":
        # One server-side name per (query text, parameter types, search_path), shared by every
        # client that prepares the same thing: a server connection prepares it once, whoever
        # asks. *scope* is the client's search_path ("" for the server's default): the same text
        # names other tables under another path, and PostgreSQL re-analyses a statement used
        # under a path other than its own, failing it when its result type changes. (The role
        # needs no part in the name: pools are per user, and PostgreSQL itself re-plans a
        # statement whose row security depends on the role when the role changes.)
        key = definition if not scope else scope.encode() + b"\x00" + definition
        return cls(definition, SERVER_NAME_PREFIX + blake2b(key, digest_size=12).hexdigest(), parsed_at)

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
    """Which shared statements one server connection holds (name -> Schema tick it was prepared at),
    least recently used first (bounded)."""

    __slots__ = ("names", "limit", "leftover")

    def __init__(self, limit: int):
        self.names: OrderedDict[str, int] = OrderedDict()
        self.limit = limit
        # Names the server may still hold though not recorded (a stale copy forgotten, a Close the
        # server skipped after an error): closed before they are prepared again.
        self.leftover: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def touch(self, name: str) -> None:
        self.names.move_to_end(name)

    def add(self, name: str, at: int = 0) -> list[str]:
        """Record *name* as prepared at tick *at*; return the least recently used names to close to stay within the limit."""
        self.names[name] = at
        self.names.move_to_end(name)
        evicted = []
        while len(self.names) > self.limit:
            old, _ = self.names.popitem(last=False)
            evicted.append(old)
        return evicted

    def discard(self, name: str) -> None:
        self.names.pop(name, None)

    def forget(self, name: str) -> None:
        """Not to be used any more, though the server may hold it still."""
        self.names.pop(name, None)
        self.leftover.add(name)

    def held(self, name: str) -> bool:
        """Whether the server may hold *name* (recorded or left over); the next Parse of it must Close it first."""
        if name in self.names:
            return True
        if name in self.leftover:
            self.leftover.discard(name)
            return True
        return False

    def clear(self) -> None:
        self.names.clear()
        self.leftover.clear()
