"""DROP DATABASE and its kin through a pooler: PostgreSQL's 55006 refusal, pgtwist's idle connections let go, the statement sent once more.

PostgreSQL refuses DROP DATABASE, ALTER DATABASE ... RENAME TO / SET TABLESPACE and CREATE
DATABASE ... TEMPLATE (55006) while another session is in the database, and a pooler's idle
server connections are such sessions, which a direct client would not have met. pgtwist acts
on the refusal only: PostgreSQL checks that the client may run the statement (owner, CREATEDB)
before it looks for other sessions, so a refusal that answers the client's own statement is
proof of that right, and no client can make pgtwist close connections it could not close by
running the statement itself. A forged 55006 (RAISE in a DO block) answers a statement that
frees nothing, and is passed on as it came.
"""

from __future__ import annotations

from struct import Struct

from pgtwist.routing import analysis
from pgtwist.wire import protocol as p

IN_USE = b"C55006\x00"  # (an ErrorResponse's code field, looked for in its raw body: errors only)
FRAGMENT = b"\x00"  # a client read that did not start a message: never a statement (refused_statement)
_LENGTH = Struct("!I")
# One extended-protocol statement: Parse, Bind, [Describe], Execute, Sync, nothing else.
_ONE_STATEMENT = frozenset((p.PARSE, p.BIND, p.DESCRIBE, p.EXECUTE, p.SYNC))


def refused_statement(read: bytes | None) -> tuple[bytes | None, tuple[str, ...]]:
    """What a client *read* that PostgreSQL answered with 55006 holds: (the read itself when it
    is one simple Query, which may be sent again; the databases its one statement needs free).
    (None, ()) when it is anything else: several statements, a transaction block, other work."""
    if not read:
        return None, ()
    messages = []
    pos = 0
    while pos + 5 <= len(read):
        (length,) = _LENGTH.unpack_from(read, pos + 1)
        end = pos + 1 + length
        if length < 4 or end > len(read):
            return None, ()
        messages.append((read[pos], pos, end))
        pos = end
    if pos != len(read) or not messages:
        return None, ()
    types = [t for t, _, _ in messages]
    if types == [p.QUERY]:
        effects = analysis.query_effects(read[5:])
        return (read, effects.frees) if effects.statements == 1 and effects.frees else (None, ())
    if types.count(p.PARSE) != 1 or types[-1] != p.SYNC or types.count(p.SYNC) != 1 or not set(types) <= _ONE_STATEMENT:
        return None, ()
    _, start, end = messages[types.index(p.PARSE)]
    name_end = read.find(b"\x00", start + 5, end)
    text_end = read.find(b"\x00", name_end + 1, end) if name_end >= 0 else -1
    if text_end < 0:
        return None, ()
    effects = analysis.query_effects(read[name_end + 1 : text_end + 1])
    return (None, effects.frees) if effects.statements == 1 and effects.frees else (None, ())
