"""Message framing for both directions: startup packets, buffered typed messages, and the pass-through scanner."""

from struct import Struct
from typing import Final

from pgtwist.wire import frontend as _frontend
from pgtwist.wire import protocol as _p
from pgtwist.wire.errors import MessageTooLarge, ProtocolViolation
from pgtwist.wire.protocol import READY_FOR_QUERY as _READY_FOR_QUERY

_INT32: Final = Struct("!I")
_READY_LENGTH: Final = _INT32.pack(5)  # a ReadyForQuery's length field
_ANY_TYPE: Final = frozenset(range(256))
_SMALL_LIMIT: Final = _frontend.SMALL_LIMIT
# The fixed messages that end a run (MessageScanner._run): a Describe of the
# unnamed portal or statement, the head of an Execute of the unnamed portal, and Sync.
_DESCRIBES: Final = frozenset((bytes((_p.DESCRIBE,)) + _INT32.pack(6) + b"P\x00", bytes((_p.DESCRIBE,)) + _INT32.pack(6) + b"S\x00"))
_EXECUTE_UNNAMED: Final = bytes((_p.EXECUTE,)) + _INT32.pack(9) + b"\x00"
_SYNC_MESSAGE: Final = bytes((_p.SYNC,)) + _INT32.pack(4)
_NO_TYPES: Final[frozenset[int]] = frozenset()
_SYNC_ONLY: Final = frozenset((_p.SYNC,))
_RUN_TYPES: Final = frozenset((_p.PARSE, _p.BIND, _p.DESCRIBE, _p.EXECUTE, _p.SYNC))
_PARSE, _BIND, _DESCRIBE, _EXECUTE, _SYNC = _p.PARSE, _p.BIND, _p.DESCRIBE, _p.EXECUTE, _p.SYNC


def _length_at(data: bytes, pos: int) -> int:
    """The int32 length field at *pos* (unsigned, network order). Compiled, four native byte
    reads and shifts; Struct.unpack_from would box *pos*, parse its arguments and build a tuple
    (about ten times the instructions), several times per transaction on the hot path."""
    return (data[pos] << 24) | (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]


def frame(msg_type: int, body: bytes = b"") -> bytes:
    """Encode a typed message: 1 type byte, int32 length (itself included), body."""
    return bytes((msg_type,)) + _INT32.pack(len(body) + 4) + body


def pop_startup_packet(buf: bytearray, max_length: int) -> bytes | None:
    """Remove one untyped startup-phase packet from *buf*; return its body (code included), or None if incomplete.

    Startup packets have no type byte: int32 length, then an int32 code, then the payload.
    A length out of bounds is *silent* (as PostgreSQL, which only logs it): such bytes
    mostly come from something that does not speak the protocol (a typed message first,
    as node-postgres's Terminate, or an HTTP request).
    """
    if len(buf) < 4:
        return None
    (length,) = _INT32.unpack_from(buf, 0)
    if length < 8:
        raise ProtocolViolation(f"invalid length of startup packet: {length}", silent=True)
    if length > max_length:
        raise MessageTooLarge(f"invalid length of startup packet: {length}", silent=True)
    if len(buf) < length:
        return None
    body = bytes(buf[4:length])
    del buf[:length]
    return body


def pop_message(buf: bytearray, max_length: int) -> tuple[int, bytes] | None:
    """Remove one complete typed message from *buf*, or return None if it has not all arrived."""
    if len(buf) < 5:
        return None
    msg_type = buf[0]
    (length,) = _INT32.unpack_from(buf, 1)
    if length < 4:
        raise ProtocolViolation(f"invalid message length {length} for message type {chr(msg_type)!r}")
    if length > max_length:
        raise MessageTooLarge(f"invalid message length {length} (limit {max_length})")
    if len(buf) < length + 1:
        return None
    body = bytes(buf[5 : length + 1])
    del buf[: length + 1]
    return msg_type, body


def pop_messages(buf: bytearray, max_length: int) -> list[tuple[int, bytes]]:
    """Remove every complete typed message from *buf*; incomplete bytes stay for the next read."""
    out = []
    pos = 0
    n = len(buf)
    while n - pos >= 5:
        msg_type = buf[pos]
        (length,) = _INT32.unpack_from(buf, pos + 1)
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(msg_type)!r}")
        if length > max_length:
            raise MessageTooLarge(f"invalid message length {length} (limit {max_length})")
        end = pos + 1 + length
        if end > n:
            break
        out.append((msg_type, bytes(buf[pos + 5 : end])))
        pos = end
    if pos:
        del buf[:pos]
    return out


class MessageScanner:
    """Walks typed messages across reads, passing untouched bytes through as slices of the read.

    Only message types in *capture* are buffered whole and handed out as ``(type, body)``
    tuples; everything else comes out as ``bytes`` runs to forward verbatim, possibly
    ending inside a message (the rest follows in a later read). This is the hot path: a
    read with nothing captured comes back as ``[data]`` without a copy, even when it ends
    inside a header (a passed-through header is forwarded at once and only remembered).

    A bad length raises ProtocolViolation (MessageTooLarge above *max_length*); the scanner
    is then broken: ``at_boundary`` stays False and every later ``feed`` raises again.

    *frontend*: the stream is a logged-in client's, headed for a server. Then an unknown
    type or a length beyond PostgreSQL's limit for its type raises too (wire.frontend),
    every captured message's layout is checked before it is handed out, and a header split
    across reads is held back until it is whole and checked: nothing of a message the
    server would refuse fatally goes out. It costs a set probe per header (and per
    captured message the layout check, which parses what its user parses anyway).
    """

    __slots__ = (
        "capture",
        "max_length",
        "_skip",
        "_head",
        "_head_held",
        "_cap_type",
        "_cap_body",
        "_cap_need",
        "_broken",
        "watch",
        "watched",
        "last_type",
        "allowed",
        "small",
        "checks",
        "_hold",
        "opens",
        "closes",
        "unsynced",
        "runs",
        "run_head",
        "run_size",
    )

    def __init__(
        self,
        capture: frozenset[int] | set[int],
        max_length: int,
        watch: frozenset[int] | set[int] = _NO_TYPES,
        *,
        frontend: bool = False,
    ):
        # (Shared, not copied, when already frozen: one scanner per client and per server
        # connection, and a frozenset is 216 bytes; mypyc's frozenset() copies even a frozenset.)
        self.capture = capture if type(capture) is frozenset else frozenset(capture)
        self.max_length = max_length
        if frontend:
            self.allowed = _frontend.TYPES
            self.small = _frontend.SMALL_TYPES
            self.checks = _frontend.CHECKS
            # Whether an extended-protocol message went by since the last Sync: the server may
            # then be skipping to that Sync (after an error), deaf to anything else.
            self.opens = _frontend.EXTENDED_TYPES
            self.closes = _SYNC_ONLY
        else:
            self.allowed = _ANY_TYPE
            self.small = _NO_TYPES
            self.checks = {}
            self.opens = self.closes = _NO_TYPES
        self.unsynced = False
        # Whether a read may be a run, walked by _run: a client's stream whose
        # every message of a run is captured and none counted.
        self.runs = frontend and not watch and _RUN_TYPES <= self.capture
        # The first item and the number of items of the last run _run walked: a list of that
        # many items that starts with that very tuple is that run, its layout known.
        self.run_head: tuple | None = None
        self.run_size = 0
        self._hold = frontend  # a split header waits until it can be checked whole
        # Types merely counted as their headers go by (e.g. Query and Sync, to know how many
        # ReadyForQuery a server still owes), and the type of the last header seen.
        self.watch = watch if type(watch) is frozenset else frozenset(watch)
        self.watched = 0
        self.last_type = 0
        self._skip = 0  # bytes of a passed-through message still to come
        self._head = b""  # the start of a header split across reads
        self._head_held = False  # True: _head is a captured message's, held back; False: already forwarded
        self._cap_type = 0
        self._cap_body: bytearray | None = None
        self._cap_need = 0
        self._broken = False

    @property
    def at_boundary(self) -> bool:
        """True when everything fed so far ended exactly at a message boundary."""
        return not self._skip and not self._head and self._cap_body is None and not self._broken

    def whole_reply(self, data: bytes) -> int:
        """The status byte if *data* is, from a boundary, whole messages of which only the last is
        captured and that one a ReadyForQuery ending the read; else -1, and nothing is consumed.

        A server's answer to a short query mostly arrives so: this walks the headers without
        building anything, and the caller forwards *data* as it came.
        """
        n = len(data)
        if self._skip or self._head or self._broken or self._cap_body is not None or self.watch:
            return -1
        if n < 6 or data[n - 6] != _READY_FOR_QUERY or data[n - 5 : n - 1] != _READY_LENGTH:
            return -1  # (a read in the middle of a long answer: declined without a walk)
        capture = self.capture
        max_length = self.max_length
        if _READY_FOR_QUERY not in capture or max_length < 5:
            return -1
        # The headers before that ReadyForQuery, each read whole (type and length at once), must
        # chain to exactly where it begins, none of them captured or of a bad length.
        last = n - 6
        pos = 0
        while pos < last:
            msg_type = data[pos]
            length = _length_at(data, pos + 1)
            if msg_type in capture or length < 4 or length > max_length:
                return -1  # (feed() then judges a bad length)
            pos += 1 + length
        if pos != last:
            return -1
        self.last_type = _READY_FOR_QUERY
        return data[n - 1]

    def _bad_length(self, msg_type: int, length: int):
        self._broken = True
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(msg_type)!r}")
        raise MessageTooLarge(f"invalid message length {length} (limit {self.max_length})")

    def _refuse(self, msg_type: int, length: int):
        """A header the frontend rules refuse (unknown type, or too long for its type)."""
        self._broken = True
        if msg_type not in self.allowed:
            raise _frontend.unknown_type(msg_type)
        raise _frontend.too_long(msg_type, length)

    def _check(self, msg_type: int, body: bytes) -> None:
        check = self.checks.get(msg_type)
        if check is not None:
            try:
                check(body)
            except ProtocolViolation:
                self._broken = True
                raise

    def _run(self, data: bytes, n: int, msg_type: int, length: int) -> list | None:
        """The items of *data* when it is, from a boundary, exactly [Parse,] Bind, [Describe,]
        Execute, Sync, each well formed, the Describe and Execute of the unnamed portal (or the
        Describe of the unnamed statement); else None, and nothing is consumed (feed's general
        walk then judges it). *msg_type*, *length*: the first message's type and length field.

        How drivers send a query with parameters (psycopg, node-postgres and pgbench -M extended:
        Parse of the unnamed statement first) and run a prepared statement again (libpq, asyncpg,
        pgjdbc: Bind of its name): one pass with the fixed messages compared whole, in place of
        four or five rounds of the general walk's tests and layout checks.
        """
        max_length = self.max_length
        if msg_type == _PARSE:
            pos = 1 + length
            if length > max_length or pos + 5 > n:
                return None
            parse = data[5:pos]
            if data[pos] != _BIND or not _frontend.parse_ok(parse):
                return None
            length = _length_at(data, pos + 1)
            items = [(_PARSE, parse)]
        else:
            pos = 0
            items = []
        end = pos + 1 + length
        if length > max_length or end + 15 > n:
            return None
        bind = data[pos + 5 : end]
        if not _frontend.bind_ok(bind):
            return None
        items.append((_BIND, bind))
        if data[end] == _DESCRIBE:
            describe = data[end : end + 7]
            if describe not in _DESCRIBES:
                return None
            items.append((_DESCRIBE, describe[5:]))
            end += 7
        if n != end + 15 or data[end : end + 6] != _EXECUTE_UNNAMED or data[end + 10 :] != _SYNC_MESSAGE:
            return None
        items.append((_EXECUTE, data[end + 5 : end + 10]))
        items.append((_SYNC, b""))
        self.last_type = _SYNC
        self.unsynced = False
        self.run_head = items[0]
        self.run_size = len(items)
        return items

    def feed(self, data: bytes) -> list:
        n = len(data)
        if not (self._skip or self._head or self._broken or self._cap_body is not None) and n >= 5:
            # The commonest read of all: one whole message, from a boundary (a client's Query).
            length = _length_at(data, 1)
            msg_type = data[0]
            if (
                length + 1 == n
                and 4 <= length <= self.max_length
                and msg_type in self.allowed
                and (length <= _SMALL_LIMIT or msg_type not in self.small)
            ):
                self.last_type = msg_type
                if msg_type in self.watch:
                    self.watched += 1
                if msg_type in self.opens:
                    self.unsynced = True
                elif msg_type in self.closes:
                    self.unsynced = False
                if msg_type in self.capture:
                    body = data[5:]
                    check = self.checks.get(msg_type)
                    if check is not None:
                        try:
                            check(body)
                        except ProtocolViolation:
                            self._broken = True
                            raise
                    return [(msg_type, body)]
                return [data]
            if (msg_type == _BIND or msg_type == _PARSE) and self.runs:
                items = self._run(data, n, msg_type, length)
                if items is not None:
                    return items
        if self._broken:
            raise ProtocolViolation("invalid message stream: an earlier message was refused")
        out: list = []
        pos = start = 0
        max_length = self.max_length
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return [data]
            pos = self._skip
            self._skip = 0
        elif self._cap_body is not None:
            need = self._cap_need - len(self._cap_body)
            if need > n:
                self._cap_body += data
                return out
            self._cap_body += data[:need]
            body = bytes(self._cap_body)
            self._cap_body = None
            if self.checks:
                self._check(self._cap_type, body)
            out.append((self._cap_type, body))
            if need == n:
                return out
            pos = start = need
        elif self._head:
            head = self._head
            if self._head_held:
                # A captured message's header: nothing of it went out yet, rescan it with this read.
                data = head + data
                n = len(data)
                self._head = b""
            else:
                # A passed-through header: its first bytes were forwarded already.
                need = 5 - len(head)
                if n < need:
                    self._head = head + data
                    return [data]
                header = head + data[:need]
                length = _length_at(header, 1)
                if length < 4 or length > max_length:
                    self._bad_length(header[0], length)
                self.last_type = header[0]
                if header[0] in self.watch:
                    self.watched += 1
                self._head = b""
                pos = need + length - 4
                if pos > n:
                    self._skip = pos - n
                    return [data]
        capture = self.capture
        watch = self.watch
        allowed = self.allowed
        small = self.small
        checks = self.checks
        opens = self.opens
        closes = self.closes
        while pos < n:
            if n - pos < 5:
                if data[pos] not in allowed:
                    self._refuse(data[pos], 0)
                self._head = data[pos:]
                if self._hold or data[pos] in capture:
                    self._head_held = True
                    if start < pos:
                        out.append(data[start:pos])
                    return out
                self._head_held = False
                break
            msg_type = data[pos]
            length = _length_at(data, pos + 1)
            if length < 4 or length > max_length:
                self._bad_length(msg_type, length)
            if msg_type not in allowed or (length > _SMALL_LIMIT and msg_type in small):
                self._refuse(msg_type, length)
            self.last_type = msg_type
            if msg_type in watch:
                self.watched += 1
            if msg_type in opens:
                self.unsynced = True
            elif msg_type in closes:
                self.unsynced = False
            end = pos + 1 + length
            if msg_type in capture:
                if start < pos:
                    out.append(data[start:pos])
                if end <= n:
                    body = bytes(data[pos + 5 : end])
                    check = checks.get(msg_type)
                    if check is not None:
                        try:
                            check(body)
                        except ProtocolViolation:
                            self._broken = True
                            raise
                    out.append((msg_type, body))
                    pos = start = end
                    continue
                self._cap_type = msg_type
                self._cap_need = length - 4
                self._cap_body = bytearray(data[pos + 5 :])
                return out
            if end > n:
                self._skip = end - n
                break
            pos = end
        if start == 0:
            out.append(data)
        elif start < n:
            out.append(data[start:])
        return out
