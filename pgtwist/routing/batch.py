"""What a client's next unit of work holds, for placing it: the statements of its first batch, and whether that batch has ended."""

from __future__ import annotations

from pgtwist.session.standin import statement_text
from pgtwist.wire import protocol as p

# How the first batch of what a client sent ends, so far.
WHOLE = 0  # a Query, or an extended-protocol batch up to its Sync: everything in it is known
OPEN = 1  # an extended-protocol batch whose end has not arrived yet: more of it may follow
FLUSHED = 2  # ... that ran a statement (Execute) and asked for its results (Flush) before ending it
DESCRIBED = 3  # ... that asked for descriptions only (Parse, Describe, Flush: asyncpg's prepare);
# the client waits for them before it sends the rest, so it is placed by what it holds

# Past this many messages an open batch is placed with what is known (on the primary; see
# placement): waiting for its end must not hold an unbounded pipeline in memory.
OPEN_LIMIT = 256

_STATEMENTS = frozenset((p.PARSE, p.BIND))


def first_batch(items: list, statements: dict) -> tuple[str | None, tuple[str, ...], int]:
    """The statement that starts *items*, the other statements of the same batch, and how it ends.

    A simple Query is a batch of its own (its statements are all in its text). An extended-
    protocol batch runs up to its Sync as one implicit transaction, so it is placed as a whole:
    a write anywhere in it must take it to the primary. Statements are the texts of Parse and of
    Bind of a named statement in *statements* (a Bind of the unnamed statement runs what a Parse
    of the same batch gave, or, with no Parse, is unknown; the first statement stays None then,
    which places the work on the primary).
    """
    first: str | None = None
    rest: list[str] = []
    extended = False
    unnamed = False  # a Parse of the unnamed statement came
    unknown = False  # a Bind of an unnamed statement parsed elsewhere: what it runs is not known
    executed = False
    for item in items:
        if type(item) is not tuple:
            continue
        msg_type = item[0]
        if msg_type == p.QUERY:
            if not extended:
                return statement_text(msg_type, item[1], statements), (), WHOLE
            return _found(first, rest, unknown, WHOLE)  # (a Query ends an extended batch as a Sync does)
        if msg_type == p.SYNC:
            return _found(first, rest, unknown, WHOLE)
        if msg_type == p.FLUSH:
            return _found(first, rest, unknown, FLUSHED if executed else DESCRIBED)
        if msg_type == p.EXECUTE:
            executed = True
        if msg_type == p.FUNCTION_CALL and not extended:
            return None, (), WHOLE  # a fast-path call: the primary (it may call anything)
        extended = True
        if msg_type in _STATEMENTS:
            body = item[1]
            text = statement_text(msg_type, body, statements)
            if msg_type == p.PARSE:
                unnamed = unnamed or body[:1] == b"\x00"
            elif text is None:
                if not unnamed:  # a Bind of the unnamed statement not parsed in this batch?
                    name_at = body.find(b"\x00") + 1  # (after the portal name)
                    unknown = unknown or body[name_at : name_at + 1] == b"\x00"
                continue
            if first is None:
                first = text
            elif text != first and (not rest or text != rest[-1]):
                rest.append(text)
    return _found(first, rest, unknown, OPEN if extended else WHOLE)


def _found(first: str | None, rest: list[str], unknown: bool, end: int) -> tuple[str | None, tuple[str, ...], int]:
    return (None, (), end) if unknown else (first, tuple(rest), end)
