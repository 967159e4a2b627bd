"""Replies the proxy gives in place of a server: work no node will run, and a transaction whose node died."""

from __future__ import annotations

from pgtwist.pooling.statements import split_bind, split_parse
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.framing import frame

# Messages of an extended-protocol batch (what PostgreSQL skips after an error, up to Sync).
EXTENDED = frozenset((p.PARSE, p.BIND, p.DESCRIBE, p.EXECUTE, p.CLOSE, p.FLUSH, p.FUNCTION_CALL))
_ENDS_DEAD_TRANSACTION = ("rollback", "commit")
# What a server answers to each message of a batch that only ends a transaction.
_ROLLBACK_REPLIES = {p.PARSE: frame(p.PARSE_COMPLETE), p.BIND: frame(p.BIND_COMPLETE), p.DESCRIBE: frame(p.NO_DATA)}


STATEMENT_TYPES = frozenset((p.QUERY, p.PARSE, p.BIND))


def statement_text(msg_type: int, body: bytes, statements: dict) -> str | None:
    """The SQL a Query, Parse or Bind (of a named statement in *statements*) starts; None if unknown."""
    if msg_type == p.QUERY:
        return m.decode_query(body)
    if msg_type == p.PARSE:
        return split_parse(body)[1].split(b"\x00", 1)[0].decode("utf-8", "replace")
    name = split_bind(body)[1]
    statement = statements.get(name) if name else None
    return statement.query if statement is not None else None


def statement_texts(items: list, statements: dict):
    """The SQL each statement in *items* starts with (Query, Parse, Bind of a named statement)."""
    for item in items:
        if type(item) is tuple and item[0] in STATEMENT_TYPES:
            text = statement_text(item[0], item[1], statements)
            if text is not None:
                yield text


def failed_work(items: list, fields: dict, status: int) -> tuple[bytes, bool]:
    """Answer *items* as PostgreSQL answers failed statements: an ERROR per Query, one per batch.

    Returns the reply and whether a Terminate came among them (the reply then covers what
    came before it).
    """
    error = m.error_response_from_fields(dict(fields, S="ERROR", V="ERROR"))
    ready = m.ready_for_query(status)
    out = []
    failed = False
    for item in items:
        if type(item) is not tuple:
            continue
        msg_type = item[0]
        if msg_type == p.QUERY or msg_type == p.FUNCTION_CALL:
            out += [error, ready]
        elif msg_type == p.SYNC:
            if not failed:
                out.append(error)
            out.append(ready)
            failed = False
        elif msg_type == p.TERMINATE:
            return b"".join(out), True
        elif msg_type in EXTENDED and not failed:
            out.append(error)
            failed = True
    return b"".join(out), False


def ends_dead_transaction(classifications) -> bool:
    # COMMIT of a failed transaction rolls back too (and PostgreSQL says ROLLBACK for it).
    return any(c.tx in _ENDS_DEAD_TRANSACTION for c in classifications)


def rolled_back(items: list) -> bytes:
    """The replies to a Query or batch that ended a dead transaction: it is rolled back."""
    out = []
    for msg_type, _ in items:
        if msg_type in _ROLLBACK_REPLIES:
            out.append(_ROLLBACK_REPLIES[msg_type])
        elif msg_type in (p.EXECUTE, p.QUERY):
            out.append(m.command_complete("ROLLBACK"))
    out.append(m.ready_for_query(p.TX_IDLE))
    return b"".join(out)


def still_aborted(error: bytes | None = None) -> bytes:
    """A statement in a dead transaction: *error* (the node's death, told once) or 25P02."""
    return aborted_error(error) + m.ready_for_query(p.TX_FAILED)


def aborted_error(error: bytes | None = None) -> bytes:
    """The ErrorResponse of still_aborted() alone: what a Flush brings out before the Sync comes."""
    if error is None:
        error = m.error_response(
            "ERROR",
            sqlstate.IN_FAILED_SQL_TRANSACTION,
            "current transaction is aborted, commands ignored until end of transaction block",
        )
    return error
