"""What a logged-in client may send: the frontend message types, their size limits, and the layout of each.

PostgreSQL answers an unknown message type with FATAL and hangs up without a word on a
length beyond its limit; either, forwarded, would end a server connection on the client's
behalf. So the framer refuses both itself (it sees every header anyway), and the messages
the proxy buffers to look into (``check``) must be well formed before they go anywhere.
Every refusal is a ProtocolViolation (08P01) whose message says what was wrong.
"""

from struct import Struct

from pgtwist.wire import protocol as p
from pgtwist.wire.errors import ProtocolViolation

_I16 = Struct("!H")
_i32 = Struct("!i")

# After login (postgres.c SocketBackend): anything else is "invalid frontend message type".
# CopyData/CopyDone/CopyFail are allowed at any time: outside COPY the server ignores them.
TYPES = frozenset(
    (
        p.BIND,
        p.CLOSE,
        p.COPY_DATA,
        p.COPY_DONE,
        p.COPY_FAIL,
        p.DESCRIBE,
        p.EXECUTE,
        p.FLUSH,
        p.FUNCTION_CALL,
        p.PARSE,
        p.QUERY,
        p.SYNC,
        p.TERMINATE,
    )
)
# PostgreSQL's PQ_SMALL_MESSAGE_LIMIT: these types may not announce a length above it (the
# length field, itself included); the server would drop the connection without an error.
SMALL_LIMIT = 10_000
SMALL_TYPES = frozenset((p.CLOSE, p.DESCRIBE, p.EXECUTE, p.FLUSH, p.SYNC, p.TERMINATE, p.COPY_DONE, p.COPY_FAIL))

# Extended-protocol messages: after one, the server owes nothing until Sync if one fails.
EXTENDED_TYPES = frozenset((p.PARSE, p.BIND, p.DESCRIBE, p.CLOSE, p.EXECUTE, p.FLUSH))

NAMES = {
    p.BIND: "Bind",
    p.CLOSE: "Close",
    p.DESCRIBE: "Describe",
    p.EXECUTE: "Execute",
    p.FLUSH: "Flush",
    p.FUNCTION_CALL: "FunctionCall",
    p.PARSE: "Parse",
    p.QUERY: "Query",
    p.SYNC: "Sync",
}


def type_name(msg_type: int) -> str:
    """A message type for an error text: its name, or the byte as PostgreSQL prints it."""
    name = NAMES.get(msg_type)
    if name is not None:
        return name
    return repr(chr(msg_type)) if 32 < msg_type < 127 else str(msg_type)


def unknown_type(msg_type: int) -> ProtocolViolation:
    # PostgreSQL's own words, plus the byte as a character when it is printable.
    shown = f" ({chr(msg_type)!r})" if 32 < msg_type < 127 else ""
    return ProtocolViolation(f"invalid frontend message type {msg_type}{shown}")


def too_long(msg_type: int, length: int) -> ProtocolViolation:
    return ProtocolViolation(f"invalid message length {length} for a {type_name(msg_type)} message (limit {SMALL_LIMIT})")


def _fail(what: str, why: str):
    raise ProtocolViolation(f"invalid {what} message: {why}")


def _values(body: bytes, pos: int, count: int, what: str) -> int:
    """Walk *count* length-prefixed values (-1: NULL) from *pos*; return where they end."""
    n = len(body)
    unpack_from = _i32.unpack_from
    for i in range(count):
        if pos + 4 > n:
            _fail(what, f"truncated at parameter {i + 1} of {count}")
        (length,) = unpack_from(body, pos)
        pos += 4
        if length == -1:
            continue
        if length < 0:
            _fail(what, f"parameter {i + 1} has length {length}")
        pos += length
        if pos > n:
            _fail(what, f"parameter {i + 1} of {count} runs past the end of the message")
    return pos


def _formats(body: bytes, pos: int, what: str, kind: str) -> tuple[int, int]:
    """An int16 count of format codes and the codes: (count, end)."""
    if pos + 2 > len(body):
        _fail(what, f"truncated before the {kind} format count")
    (count,) = _I16.unpack_from(body, pos)
    end = pos + 2 + 2 * count
    if end > len(body):
        _fail(what, f"{count} {kind} format codes announced, {(len(body) - pos - 2) // 2} present")
    return count, end


def check_query(body: bytes) -> None:
    end = body.find(b"\x00")
    if end < 0:
        _fail("Query", "the query string has no terminating NUL")
    if end != len(body) - 1:
        _fail("Query", f"{len(body) - end - 1} bytes after the query string's NUL")


def parse_ok(body: bytes, _H=_I16.unpack_from) -> bool:
    """Whether a Parse's body is well formed (check_parse says what is wrong when it is not)."""
    pos = body.find(b"\x00", body.find(b"\x00") + 1) + 1
    return pos > 1 and pos + 2 <= len(body) and pos + 2 + 4 * _H(body, pos)[0] == len(body)


def check_parse(body: bytes) -> None:
    if not parse_ok(body):
        _explain_parse(body)


def _explain_parse(body: bytes) -> None:
    """A Parse parse_ok refused: raise, saying what is wrong with it."""
    name_end = body.find(b"\x00")
    if name_end < 0:
        _fail("Parse", "the statement name has no terminating NUL")
    text_end = body.find(b"\x00", name_end + 1)
    if text_end < 0:
        _fail("Parse", "the query string has no terminating NUL")
    pos = text_end + 1
    if pos + 2 > len(body):
        _fail("Parse", "truncated before the parameter type count")
    (count,) = _I16.unpack_from(body, pos)
    if pos + 2 + 4 * count != len(body):
        _fail("Parse", f"{count} parameter types announced, {len(body) - pos - 2} bytes follow")


def bind_ok(body: bytes, _H=_I16.unpack_from, _i=_i32.unpack_from) -> bool:
    """Whether a Bind's body is well formed (check_bind says what is wrong when it is not)."""
    # (On the hot path of every query with parameters: one pass with few calls.)
    n = len(body)
    pos = body.find(b"\x00", body.find(b"\x00") + 1) + 1
    if pos and pos + 4 <= n:
        formats = _H(body, pos)[0]
        pos += 2 + 2 * formats
        if pos + 2 <= n:
            count = _H(body, pos)[0]
            pos += 2
            if formats <= 1 or formats == count:
                for _ in range(count):
                    if pos + 4 > n:
                        return False
                    length = _i(body, pos)[0]
                    if length < -1:
                        return False
                    pos += 4 if length < 0 else 4 + length
                return pos + 2 <= n and pos + 2 + 2 * _H(body, pos)[0] == n
    return False


def check_bind(body: bytes) -> None:
    if not bind_ok(body):
        _explain_bind(body)


def _explain_bind(body: bytes) -> None:
    """A Bind check_bind refused: raise, saying what is wrong with it."""
    portal_end = body.find(b"\x00")
    if portal_end < 0:
        _fail("Bind", "the portal name has no terminating NUL")
    name_end = body.find(b"\x00", portal_end + 1)
    if name_end < 0:
        _fail("Bind", "the statement name has no terminating NUL")
    formats, pos = _formats(body, name_end + 1, "Bind", "parameter")
    if pos + 2 > len(body):
        _fail("Bind", "truncated before the parameter count")
    (count,) = _I16.unpack_from(body, pos)
    if formats > 1 and formats != count:
        _fail("Bind", f"{formats} parameter formats but {count} parameters")
    pos = _values(body, pos + 2, count, "Bind")
    _, pos = _formats(body, pos, "Bind", "result")
    _fail("Bind", f"{len(body) - pos} bytes after the result format codes")


def _check_target(body: bytes, what: str) -> None:
    if not body:
        _fail(what, "empty")
    kind = body[0]
    if kind != 0x53 and kind != 0x50:  # 'S', 'P'
        shown = f" ({chr(kind)!r})" if 32 < kind < 127 else ""
        _fail(what, f"unknown target type {kind}{shown}: expected 'S' or 'P'")
    end = body.find(b"\x00", 1)
    if end < 0:
        _fail(what, "the name has no terminating NUL")
    if end != len(body) - 1:
        _fail(what, f"{len(body) - end - 1} bytes after the name")


def check_describe(body: bytes) -> None:
    _check_target(body, "Describe")


def check_close(body: bytes) -> None:
    _check_target(body, "Close")


def check_execute(body: bytes) -> None:
    end = body.find(b"\x00")
    if end < 0:
        _fail("Execute", "the portal name has no terminating NUL")
    if end + 5 != len(body):
        _fail("Execute", "the row limit is not an int32 ending the message")


def _check_empty(what: str):
    def check(body: bytes) -> None:
        if body:
            _fail(what, f"{len(body)} unexpected bytes in the body")

    return check


def check_function_call(body: bytes) -> None:
    if len(body) < 4:
        _fail("FunctionCall", "truncated before the function OID")
    formats, pos = _formats(body, 4, "FunctionCall", "argument")
    if pos + 2 > len(body):
        _fail("FunctionCall", "truncated before the argument count")
    (count,) = _I16.unpack_from(body, pos)
    if formats > 1 and formats != count:
        _fail("FunctionCall", f"{formats} argument formats but {count} arguments")
    pos = _values(body, pos + 2, count, "FunctionCall")
    if pos + 2 != len(body):
        _fail("FunctionCall", "the result format code is not an int16 ending the message")


# The layout checks, by type; a type not here has nothing the proxy reads (Terminate, COPY).
CHECKS = {
    p.QUERY: check_query,
    p.PARSE: check_parse,
    p.BIND: check_bind,
    p.DESCRIBE: check_describe,
    p.CLOSE: check_close,
    p.EXECUTE: check_execute,
    p.SYNC: _check_empty("Sync"),
    p.FLUSH: _check_empty("Flush"),
    p.FUNCTION_CALL: check_function_call,
}


def check(msg_type: int, body: bytes) -> None:
    """Refuse (ProtocolViolation) a frontend message of a type or layout PostgreSQL would not take."""
    if msg_type not in TYPES:
        raise unknown_type(msg_type)
    if len(body) + 4 > SMALL_LIMIT and msg_type in SMALL_TYPES:
        raise too_long(msg_type, len(body) + 4)
    layout = CHECKS.get(msg_type)
    if layout is not None:
        layout(body)
