"""Extended-protocol relay over shared server connections: renamed statements, injected Parse/Close, replies in order, stale copies."""

from __future__ import annotations

from typing import Final

from pgtwist.pooling.statements import (
    SERVER_NAME_PREFIX,
    Schema,
    Statement,
    bind_body,
    internal_batch,
    parse_body,
    split_bind,
    split_parse,
    split_target,
    target_body,
)
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.framing import frame

# What a request waits for. SYNC covers Query, Sync and FunctionCall: each ends at ReadyForQuery.
SYNC, PARSE, BIND, DESCRIBE, EXECUTE, CLOSE, SYNTH = range(7)
_COMPLETION = {
    PARSE: frozenset((p.PARSE_COMPLETE,)),
    BIND: frozenset((p.BIND_COMPLETE,)),
    DESCRIBE: frozenset((p.ROW_DESCRIPTION, p.NO_DATA)),
    EXECUTE: frozenset((p.COMMAND_COMPLETE, p.EMPTY_QUERY_RESPONSE, p.PORTAL_SUSPENDED)),
    CLOSE: frozenset((p.CLOSE_COMPLETE,)),
}
# Server messages looked into while extended-protocol requests are in flight; with only
# simple queries in flight, ReadyForQuery (and ParameterStatus) is all that matters, and
# CopyInResponse (an extended batch of COPY FROM STDIN sent whole: see Relay.copy_in).
SIMPLE_CAPTURE: Final = frozenset((p.READY_FOR_QUERY, p.PARAMETER_STATUS, p.ERROR_RESPONSE, p.COPY_IN_RESPONSE))
FULL_CAPTURE: Final = SIMPLE_CAPTURE | frozenset(
    (
        p.PARAMETER_DESCRIPTION,
        p.PARSE_COMPLETE,
        p.BIND_COMPLETE,
        p.CLOSE_COMPLETE,
        p.ROW_DESCRIPTION,
        p.NO_DATA,
        p.COMMAND_COMPLETE,
        p.EMPTY_QUERY_RESPONSE,
        p.PORTAL_SUSPENDED,
        p.ERROR_RESPONSE,
    )
)
# While a batch the proxy injected is being answered, everything of its answer is looked at
# (and dropped): RowDescription, DataRow, CommandComplete, notices, errors.
SWALLOW_CAPTURE: Final = FULL_CAPTURE | frozenset((p.DATA_ROW, p.NOTICE_RESPONSE))
# Client messages a shared server connection needs to see.
CLIENT_CAPTURE: Final = frozenset(
    (p.PARSE, p.BIND, p.DESCRIBE, p.CLOSE, p.EXECUTE, p.SYNC, p.QUERY, p.FLUSH, p.FUNCTION_CALL, p.TERMINATE, p.COPY_DONE, p.COPY_FAIL)
)
_COPY_ENDS: Final = frozenset((p.COPY_DONE, p.COPY_FAIL))
_PARSE_COMPLETE: Final = frame(p.PARSE_COMPLETE)
_CLOSE_COMPLETE: Final = frame(p.CLOSE_COMPLETE)
_FLUSH: Final = frame(p.FLUSH)
# PostgreSQL's own error for a statement whose result type changed (asyncpg knows it by its routine).
_RESULT_TYPE_CHANGED = m.error_response_from_fields(
    dict(
        m.error_fields("ERROR", sqlstate.FEATURE_NOT_SUPPORTED, "cached plan must not change result type"),
        R="RevalidateCachedQuery",
    )
)
# A statement name no server connection holds: a Bind of it fails on the server as PostgreSQL's
# 0A000 would (aborting an open transaction), and the proxy words the error as that 0A000.
_NO_STATEMENT: Final = SERVER_NAME_PREFIX + "stale"


def result_shape(body: bytes) -> tuple:
    """What of a RowDescription (b"" for NoData) PostgreSQL compares when it re-plans a statement:
    each column's name, type and type modifier (not its table, which a re-created table changes)."""
    if not body:
        return ()
    count = int.from_bytes(body[:2], "big")
    pos, columns = 2, []
    for _ in range(count):
        end = body.index(b"\x00", pos)
        name = body[pos:end]
        pos = end + 1
        columns.append((name, body[pos + 6 : pos + 10], body[pos + 12 : pos + 16]))
        pos += 18
    return tuple(columns)


def statement_is_stale(fields: dict) -> bool:
    """Whether an error says a prepared statement was made under a schema that has changed since.

    "cached plan must not change result type" is translated with lc_messages, so its routine
    names it too; "cache lookup failed" (a type or relation OID that is gone) is an internal
    elog, never translated.
    """
    code = fields.get("C")
    if code == sqlstate.FEATURE_NOT_SUPPORTED:
        return fields.get("R") == "RevalidateCachedQuery" or fields.get("M") == "cached plan must not change result type"
    return code == sqlstate.INTERNAL_ERROR and fields.get("M", "").startswith("cache lookup failed")


def _describes_first(items: list) -> bool:
    """Whether client messages ask for a description (Describe) before any Execute.

    A client that executes a statement without describing it again decodes the rows by the
    description it got before (asyncpg does): a statement whose result type changed under it
    must then fail as PostgreSQL fails it, so that the client prepares and describes it anew.
    """
    for msg_type, _ in items:
        if msg_type == p.DESCRIBE:
            return True
        if msg_type == p.EXECUTE:
            return False
    return True


class Entry:
    """One request in flight, and what to do with its reply."""

    __slots__ = ("kind", "swallow", "synth", "undo", "done", "reword", "retry", "simple")

    def __init__(self, kind, *, swallow=False, synth=None, undo=None, done=None, reword=None, retry=None, simple=False):
        self.kind = kind
        # A Query or FunctionCall (not a Sync): ends at its ReadyForQuery, but after an error in
        # an extended-protocol message the server skips it unanswered, as all else until Sync.
        self.simple = simple
        self.swallow = swallow  # the proxy injected the request: its reply is not the client's
        self.synth = synth  # SYNTH: bytes (or a callable making them) the proxy answers itself
        self.undo = undo  # called when the request fails or is skipped after an error
        self.done = done  # called with the completion message body on success
        self.reword = reword  # (server name, client name): an error about it names the client's
        # A Bind/Describe of a shared statement: its RetryPoint. A SYNC being retried: the client
        # messages to send again once its ReadyForQuery is in (synth then holds the error).
        self.retry = retry


class RetryPoint:
    """A Bind or Describe of a shared statement: which copy to forget if PostgreSQL calls it stale,
    and from where in the client's batch (*batch*, None when it cannot be) it may be sent again."""

    __slots__ = ("statements", "server_name", "batch", "index")

    def __init__(self, statements, server_name: str, batch: list | None, index: int):
        self.statements = statements
        self.server_name = server_name
        self.batch = batch
        self.index = index


_PLAIN = {kind: Entry(kind) for kind in (SYNC, PARSE, BIND, DESCRIBE, EXECUTE, CLOSE)}
# A prepared statement run again on the session's fast path (Bind [Describe] Execute Sync): one
# ReadyForQuery owed, and Relay.hot says what to do if the statement turns out stale.
HOT_RUN = Entry(SYNC)  # (the session appends it itself on its fast path)
_SIMPLE = Entry(SYNC, simple=True)


class Relay:
    """Translate one client's extended protocol for whichever shared server connection it holds.

    The client's named statements live here (name -> Statement); each server connection
    holds shared statements under proxy-chosen names (``server.statements``). Requests in
    flight are queued so that replies the proxy makes itself come out exactly where
    PostgreSQL would have sent them.
    """

    __slots__ = (
        "statements",
        "queue",
        "extended",
        "skipping",
        "unsynced",
        "tx_status",
        "server_fatal",
        "swallowing",
        "held_ready",
        "schema",
        "scope",
        "batch",
        "executed",
        "hot",
        "again",
        "replaying",
        "held_param",
        "upcoming",
        "at",
        "shapes",
        "holding",
        "doomed",
        "bound",
        "copy_in",
        "copy_ended",
    )

    def __init__(self, schema: Schema | None = None, scope: str = ""):
        self.statements: dict[str, Statement] = {}
        # A list, not a deque: it rarely holds more than a handful, and an empty deque
        # costs ten times the memory of an empty list on every idle client.
        self.queue: list[Entry] = []
        self.extended = 0  # non-SYNC entries in the queue
        self.skipping = False  # a proxy-made error: drop client messages until Sync, as PostgreSQL does
        # An extended-protocol message went to the server and its Sync not yet: the server may be
        # skipping to that Sync after an error (Queries included, unanswered), so the connection
        # is no one else's to use until it comes, even with nothing left to answer.
        self.unsynced = False
        self.tx_status = p.TX_IDLE
        self.server_fatal: dict | None = None  # a FATAL the node sent before it hung up
        self.swallowing = 0  # batches the proxy injected (inject), not answered yet
        self.held_ready: bytes | None = None  # the client's ReadyForQuery, held until the injected batch is done
        self.schema = schema if schema is not None else Schema()  # the database's clock (statements.Schema)
        self.scope = scope  # the client's search_path, part of every shared name it prepares
        # Stale statements (see statement_is_stale): the client messages of the current batch from
        # its first Bind/Describe of a shared statement on (None: none yet), whether an Execute
        # went before in this batch (its effects would be rolled back with the error: no retry),
        # the fast path's batch in flight (items, ServerStatements, server name), a batch to send
        # again now (the session does), whether that is being done, a ParameterDescription held.
        self.batch: list | None = None
        self.executed = False
        self.hot: tuple | None = None
        self.again: list | None = None
        self.replaying = False
        self.held_param: bytes | None = None
        self.upcoming: list | tuple = ()  # the client's read a Bind came in (set by the session), and its place there
        self.at = 0
        # What the client was told its statements return (name -> (Statement, result_shape)),
        # by its own Describe; client messages held while a fresh copy's result is checked
        # against that; names whose copies return something else now (their Binds fail 0A000).
        self.shapes: dict | None = None
        self.holding: list | None = None
        self.doomed: set | None = None
        self.bound: tuple | None = None  # (portal with its NUL, name, Statement) of the last Bind of a named statement
        # The server reads COPY data for an Execute (extended protocol): until the client's
        # CopyDone or CopyFail it ignores Sync (PostgreSQL's CopyGetData, for libpq, which sends
        # one behind every Execute and another after CopyDone): no ReadyForQuery is owed for it.
        self.copy_in = False
        # The client sent CopyDone or CopyFail while no COPY was known to run: a COPY's end sent
        # with its data before CopyInResponse came (or a stray one, which PostgreSQL ignores).
        self.copy_ended = False

    def drop(self, name: str | None = None) -> "Statement | None":
        """The client's statement *name* is gone (Close, DEALLOCATE); None: all of them. What was kept about it goes too."""
        if name is None:
            self.statements.clear()
            self.shapes = self.doomed = None
            return None
        if self.shapes:
            self.shapes.pop(name, None)
        if self.doomed:
            self.doomed.discard(name)
        return self.statements.pop(name, None)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.skipping and not self.unsynced and not self.copy_in

    def expect_ready(self, simple: bool = True) -> None:
        """A plain Query (or, not *simple*, a batch ending in Sync) went to the server as the
        client sent it: one ReadyForQuery is owed."""
        self.queue.append(_SIMPLE if simple else _PLAIN[SYNC])

    def expect_batch(self, items: list, statements, server_name: str) -> None:
        """A prepared statement's Bind [Describe] Execute Sync went to the server on the fast path
        (*items* as the client sent them): one ReadyForQuery owed; sent again if the copy is stale."""
        self.queue.append(HOT_RUN)
        self.hot = (items, statements, server_name)

    def fresh(self, statement: Statement, statements, describes: bool) -> bool:
        """Whether a server connection's copy of *statement* may be used rather than prepared again first.

        It must be newer than the client's own Parse: the client is owed the statement as the
        schema was then. A copy older than the last DDL seen through pgtwist is prepared again
        only when the client *describes* the result before executing it (psycopg, libpq,
        pgbench do): a client that decodes rows by the description it got earlier (asyncpg)
        must meet the copy PostgreSQL knows, which PostgreSQL re-plans itself, or fails with
        0A000 exactly as it would fail the client's own statement, so that the client
        prepares it again (asyncpg does so by itself).
        """
        held = statements.names.get(statement.server_name)
        if held is None or held < statement.parsed_at:
            return False
        return held >= self.schema.ddl_at or not describes

    def _describes_next(self) -> bool:
        """Whether, in what the client sent with the current Bind, a Describe comes before any Execute."""
        upcoming = self.upcoming
        for i in range(self.at + 1, len(upcoming)):
            item = upcoming[i]
            if type(item) is tuple:
                if item[0] == p.DESCRIBE:
                    return True
                if item[0] == p.EXECUTE or item[0] == p.SYNC:
                    return False
        return False

    def capture(self) -> frozenset[int]:
        if self.swallowing:
            return SWALLOW_CAPTURE
        return FULL_CAPTURE if self.extended else SIMPLE_CAPTURE

    def _push(self, entry: Entry) -> None:
        self.queue.append(entry)
        if entry.kind is not SYNC:
            self.extended += 1
        elif entry.swallow:
            self.swallowing += 1

    def _pop(self) -> Entry:
        entry = self.queue.pop(0)
        if entry.kind is not SYNC:
            self.extended -= 1
        elif entry.swallow:
            self.swallowing -= 1
        return entry

    def inject(self, statements: list[str], to_server: list) -> None:
        """Statements of the proxy's own behind what the client sent so far, ended by their own
        Sync; the whole answer (ReadyForQuery included) stays with the proxy, except
        ParameterStatus, which tells the client the settings it now has. An error in it is
        dropped too: it can only repeat why the client's own statement before it failed (an
        aborted transaction). Extended protocol under the proxy's own names (internal_batch):
        the client's unnamed statement and portal are left as they were.

        The client's ReadyForQuery just before it is held back until this answer is in, so
        that, as on a direct connection, the client hears of its settings before it may speak.
        """
        if self.skipping:
            return
        self._push(Entry(SYNC, swallow=True))
        to_server.append(internal_batch(statements))

    # -- client -> server ---------------------------------------------------------------------

    def client_message(self, msg_type: int, body: bytes, server, to_server: list, to_client: list) -> None:
        """Handle one captured client message bound for *server*."""
        if self.holding is not None:
            self.holding.append((msg_type, body))
            return
        if msg_type in _COPY_ENDS:  # (COPY data, as it came: no request of its own)
            if not self.copy_in:
                self.copy_ended = True
            self.copy_in = False
            to_server.append(frame(msg_type, body))
            return
        if msg_type == p.SYNC:
            if self.copy_in:
                to_server.append(frame(msg_type, body))  # read and ignored by the server mid-COPY
                return
            self.unsynced = False
        elif msg_type != p.QUERY and msg_type != p.FUNCTION_CALL:
            self.unsynced = True  # Parse, Bind, Describe, Close, Execute, Flush
        if self.skipping:
            if msg_type != p.SYNC:
                return
            self.skipping = False
        if self.batch is not None:
            self.batch.append((msg_type, body))
        if msg_type == p.PARSE:
            self._parse(body, server, to_server, to_client)
        elif msg_type == p.BIND:
            portal, name, rest = split_bind(body)
            if name:
                statement = self.statements.get(name)
                if statement is not None:
                    if self.doomed and name in self.doomed:
                        self._forward(BIND, msg_type, bind_body(portal, _NO_STATEMENT, rest), to_server, synth=_RESULT_TYPE_CHANGED)
                        return
                    describes = self._describes_next()
                    if self.fresh(statement, server.statements, describes):
                        server.statements.touch(statement.server_name)
                    else:
                        self._prepare_on(server, statement, to_server, swallow=True)
                        if not describes and self._check_shape(name, statement, to_server):
                            self.holding = [(msg_type, body)]
                            return
                    retry = self._retry_point(statement, server, msg_type, body)
                    self._forward(BIND, msg_type, bind_body(portal, statement.server_name, rest), to_server, retry=retry)
                    self.bound = (portal, name, statement)
                    return
                elif self._refuse_unknown(name, to_client):
                    return
            self.bound = None
            self._forward(BIND, msg_type, body, to_server)
        elif msg_type == p.DESCRIBE:
            kind, name = split_target(body, "Describe")
            if kind == ord("S") and name:
                if self.doomed and name in self.doomed:
                    self._forward(DESCRIBE, msg_type, target_body(kind, _NO_STATEMENT), to_server, synth=_RESULT_TYPE_CHANGED)
                    return
                statement = self._server_statement(name, server, to_server, to_client, True)
                if statement is not None:
                    retry = self._retry_point(statement, server, msg_type, body)
                    self._forward(
                        DESCRIBE,
                        msg_type,
                        target_body(kind, statement.server_name),
                        to_server,
                        retry=retry,
                        done=lambda reply, name=name, statement=statement: self._told(name, statement, reply),
                    )
                    return
                elif self._refuse_unknown(name, to_client):
                    return
            elif kind == ord("P") and self.bound is not None and self.bound[0] == body[1:]:
                # A portal of the client's named statement: its description is the statement's.
                _, name, statement = self.bound
                self._forward(
                    DESCRIBE, msg_type, body, to_server, done=lambda reply, name=name, statement=statement: self._told(name, statement, reply)
                )
                return
            self._forward(DESCRIBE, msg_type, body, to_server)
        elif msg_type == p.CLOSE:
            kind, name = split_target(body, "Close")
            if kind == ord("S") and name:
                # The client's name goes; the server keeps the shared statement for others.
                closed = self.drop(name)

                def undo():  # skipped after an error earlier in the batch: the statement stays
                    if closed is not None and name not in self.statements:
                        self.statements[name] = closed

                self._synth(_CLOSE_COMPLETE, to_client, undo)
            else:
                self._forward(CLOSE, msg_type, body, to_server)
        elif msg_type == p.EXECUTE:
            self.executed = True
            self._forward(EXECUTE, msg_type, body, to_server)
        elif msg_type == p.FLUSH:
            to_server.append(frame(msg_type, body))
        elif msg_type == p.SYNC:
            self.batch = self.bound = None
            self.executed = False
            self._forward(SYNC, msg_type, body, to_server)
        else:  # Query, FunctionCall: one ReadyForQuery each, like Sync
            self.batch = self.bound = None
            self.executed = False
            self._push(_SIMPLE)
            to_server.append(frame(msg_type, body))

    def _told(self, name: str, statement: Statement, reply: bytes) -> None:
        """The client got the description of its statement *name* (RowDescription body, b"" for NoData)."""
        if self.shapes is None:
            self.shapes = {}
        self.shapes[name] = (statement, result_shape(reply))

    def _check_shape(self, name: str, statement: Statement, to_server: list) -> bool:
        """A copy was just prepared for a run of *name* that does not describe its result: the client
        decodes by what it was told. True when that is known: the copy's description is asked for
        (Flush: now) and the client's messages wait for it (holding). If it differs, PostgreSQL
        would have failed the client's own statement (fixed result type): its Binds and Describes
        fail with that 0A000, as PostgreSQL's would, until the client prepares it anew."""
        shape = self.shapes.get(name) if self.shapes else None
        if shape is None or shape[0] is not statement or self.replaying:
            return False
        expected = shape[1]

        def check(reply: bytes) -> None:
            if result_shape(reply) != expected:
                if self.doomed is None:
                    self.doomed = set()
                self.doomed.add(name)
            self.again, self.holding = self.holding, None

        self._forward(DESCRIBE, p.DESCRIBE, target_body(ord("S"), statement.server_name), to_server, swallow=True, done=check)
        to_server.append(_FLUSH)
        return True

    def held_requests(self) -> int:
        """How many ReadyForQuery the client messages held back would have earned."""
        if not self.holding:
            return 0
        return sum(1 for msg_type, _ in self.holding if msg_type in (p.SYNC, p.QUERY, p.FUNCTION_CALL))

    def _retry_point(self, statement: Statement, server, msg_type: int, body: bytes) -> RetryPoint:
        """What a Bind/Describe (*body* as the client sent it) of *statement* needs should PostgreSQL call the copy stale."""
        batch = None
        index = 0
        if not self.executed and not self.replaying:
            batch = self.batch
            if batch is None:
                batch = self.batch = [(msg_type, body)]
            index = len(batch) - 1
        return RetryPoint(server.statements, statement.server_name, batch, index)

    def _forward(self, kind: int, msg_type: int, body: bytes, to_server: list, **entry) -> None:
        # Plain requests share one immutable Entry per kind: no allocation per message.
        self._push(Entry(kind, **entry) if entry else _PLAIN[kind])
        to_server.append(frame(msg_type, body))

    def _synth(self, data, to_client: list, undo=None) -> None:
        """A reply the proxy makes; it goes out once every earlier request has been answered.

        *undo* reverts what the proxy recorded for it if an earlier request fails (the server
        then skips the rest of the batch, and PostgreSQL would have skipped this one too).
        """
        if not self.queue:
            to_client.append(data() if callable(data) else data)
        else:
            self._push(Entry(SYNTH, synth=data, undo=undo))

    def synth_reply(self, make, to_client: list) -> None:
        """Answer a whole simple Query ourselves (e.g. DEALLOCATE of a client statement), in order."""
        self._synth(make, to_client)

    def fail(self, code: str, message: str, to_client: list) -> None:
        """A proxy-made ERROR in place of the current extended-protocol message; the rest waits for Sync."""
        self._error(code, message, to_client)

    def _error(self, code: str, message: str, to_client: list) -> None:
        self._synth(m.error_response("ERROR", code, message), to_client)
        self.skipping = True

    def _parse(self, body: bytes, server, to_server: list, to_client: list) -> None:
        name, definition = split_parse(body)
        if not name:
            self._forward(PARSE, p.PARSE, body, to_server)
            return
        if name in self.statements:
            # The server itself refuses it, so that an open transaction aborts as PostgreSQL's
            # would: the same Parse under the existing statement's shared name, which it holds.
            existing = self._server_statement(name, server, to_server, to_client)
            self._forward(
                PARSE, p.PARSE, parse_body(existing.server_name, definition), to_server, reword=(existing.server_name, name)
            )
            return
        statement = Statement.from_definition(definition, self.scope, self.schema.tick())
        self.statements[name] = statement
        if self.doomed:
            self.doomed.discard(name)

        def undo():
            if self.statements.get(name) is statement:
                del self.statements[name]

        # The client's Parse reaches the server, as on its own connection: a copy the server
        # connection holds may predate a schema change (made anywhere), and the client is owed
        # the statement as the schema is now, or PostgreSQL's own error for it (42P01, 25P02...).
        self._prepare_on(server, statement, to_server, swallow=False, client_undo=undo)

    def _server_statement(self, name: str, server, to_server: list, to_client: list, describes: bool = True) -> Statement | None:
        """The client's statement, prepared on *server* first if that server lacks it (see fresh());
        None if the client has none so named."""
        statement = self.statements.get(name)
        if statement is None:
            return None
        if self.fresh(statement, server.statements, describes):
            server.statements.touch(statement.server_name)
        else:
            self._prepare_on(server, statement, to_server, swallow=True)
        return statement

    def _refuse_unknown(self, name: str, to_client: list) -> bool:
        """A name the client never prepared. True when the proxy refuses it itself.

        Normally the message goes to the server under the client's name, which no server
        statement has: the server's own 26000 then aborts the batch and the transaction exactly
        as PostgreSQL's would (a proxy-made error would leave the server's transaction going).
        Only a name that could reach a shared statement is refused here.
        """
        if name.startswith(SERVER_NAME_PREFIX):
            self._error(sqlstate.INVALID_SQL_STATEMENT_NAME, f'prepared statement "{name}" does not exist', to_client)
            return True
        return False

    def stand_in(self, names, to_server: list) -> None:
        """SQL DEALLOCATE of client statements is about to run on the server: give it something to drop there.

        The client's names live only here. A throwaway statement under each name lets the
        server's DEALLOCATE succeed and answer exactly as PostgreSQL's would; Close first, so
        that a stand-in left by a DEALLOCATE bound but never executed cannot fail the Parse.
        """
        if self.skipping:
            return
        for name in names:
            if self.drop(name) is not None:
                self._forward(CLOSE, p.CLOSE, target_body(ord("S"), name), to_server, swallow=True)
                self._forward(PARSE, p.PARSE, parse_body(name, b"SELECT\x00\x00\x00"), to_server, swallow=True)

    def _prepare_on(self, server, statement: Statement, to_server: list, *, swallow: bool, client_undo=None) -> None:
        server_name = statement.server_name
        statements = server.statements
        # A copy the connection may hold goes first: a stale one, or one a Close the server
        # skipped (after an error) left behind.
        close_first = statements.held(server_name)
        for old in statements.add(server_name, self.schema.clock):
            self._forward(CLOSE, p.CLOSE, target_body(ord("S"), old), to_server, swallow=True, undo=lambda old=old: statements.forget(old))
        if close_first:
            self._forward(CLOSE, p.CLOSE, target_body(ord("S"), server_name), to_server, swallow=True)

        def undo():
            if close_first:
                statements.forget(server_name)  # (the Close may have been skipped too)
            else:
                statements.discard(server_name)
            if client_undo is not None:
                client_undo()

        self._forward(PARSE, p.PARSE, parse_body(server_name, statement.definition), to_server, swallow=swallow, undo=undo)

    # -- server -> client ---------------------------------------------------------------------

    def _note_fatal(self, body: bytes) -> bool:
        """Whether an ErrorResponse is a FATAL (or PANIC): the node is ending the connection. Kept for the session."""
        fields = m.decode_fields(body)
        if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
            self.server_fatal = fields
            return True
        return False

    def _proxy_query_next(self) -> bool:
        """Whether the request this ReadyForQuery ends is followed by a batch of the proxy's own (inject)."""
        queue = self.queue
        for i, entry in enumerate(queue):
            if entry.kind is SYNC:
                return i + 1 < len(queue) and queue[i + 1].kind is SYNC and queue[i + 1].swallow
        return False

    def server_message(self, msg_type: int, body: bytes, to_client: list) -> int | None:
        """Handle one captured server message; returns the ReadyForQuery status when one went out."""
        queue = self.queue
        if self.swallowing and queue[0].swallow and queue[0].kind is SYNC and msg_type != p.PARAMETER_STATUS:
            # The answer to a batch the proxy injected (or the rest of a batch to retry): the client never sees it.
            if msg_type == p.READY_FOR_QUERY:
                if queue[0].retry is not None:
                    return self._retry_ready(body, to_client)
                held, self.held_ready = self.held_ready, None
                if held is not None:
                    to_client.append(held)
                self.ready(body[0] if body else p.TX_IDLE, to_client)
                if held is not None:
                    self.tx_status = held[-1]  # (what the client was told)
                    return self.tx_status
            elif msg_type == p.ERROR_RESPONSE:
                self._note_fatal(body)
            return None
        if msg_type == p.READY_FOR_QUERY:
            if self.swallowing and self._proxy_query_next():
                # The proxy's own batch comes next: the client hears of this one after it.
                self.ready(body[0] if body else p.TX_IDLE, to_client)
                self.held_ready = frame(msg_type, body)
                return None
            to_client.append(frame(msg_type, body))
            self.ready(body[0] if body else p.TX_IDLE, to_client)
            return self.tx_status
        if msg_type == p.ERROR_RESPONSE and self._note_fatal(body):
            # The server connection is ending, not the client's session: the session says so
            # itself when the connection drops, and carries on.
            return None
        if msg_type == p.PARAMETER_STATUS or not queue:
            to_client.append(frame(msg_type, body))
            return None
        head = queue[0]
        if msg_type == p.COPY_IN_RESPONSE:
            if head.kind is EXECUTE or (head.kind is SYNC and not head.simple and not head.swallow):
                # The Sync the client sent behind this Execute reaches the server while it reads
                # COPY data, which ignores it: it earns no ReadyForQuery. (A SYNC entry at the
                # head stands for a whole batch the session sent on its fast path, its Sync
                # included.)
                start = 1 if head.kind is EXECUTE else 0
                if head is HOT_RUN:
                    self.hot = None
                for i in range(start, len(queue)):
                    entry = queue[i]
                    if entry.kind is SYNC and not entry.swallow and not entry.simple:
                        del queue[i]  # the Sync behind the Execute (or the fast path's batch, Sync and all)
                        break
                # A client that sent its data, CopyDone and Sync before this came (rather than
                # waiting for it, as libpq does) has its COPY over already: that later Sync is
                # queued and answered. Else the relay is not idle until CopyDone or CopyFail
                # (and a stray CopyDone seen earlier counts only if a Sync is queued behind).
                ended, self.copy_ended = self.copy_ended, False
                self.copy_in = not (ended and any(e.kind is SYNC and not e.swallow and not e.simple for e in queue[start:]))
            to_client.append(frame(msg_type, body))
            return None
        if msg_type == p.ERROR_RESPONSE:
            held, self.held_param = self.held_param, None
            if (head.retry is not None or head is HOT_RUN) and self._stale(body, head):
                return None
            if held is not None:
                to_client.append(held)
            if head.synth is not None and (head.kind is BIND or head.kind is DESCRIBE):
                to_client.append(head.synth)  # (it failed on purpose: see _NO_STATEMENT)
            elif head.reword is not None:
                shared, own = head.reword
                fields = m.decode_fields(body)
                fields["M"] = fields.get("M", "").replace(f'"{shared}"', f'"{own}"')
                to_client.append(m.error_response_from_fields(fields))
            else:
                to_client.append(frame(msg_type, body))
            if head.kind is SYNC:
                return None  # a simple query's error; its ReadyForQuery follows
            # The server now skips everything up to Sync (Queries too, unanswered): so do our
            # own replies and records.
            while queue and (queue[0].kind is not SYNC or queue[0].simple):
                entry = self._pop()
                if entry.undo is not None:
                    entry.undo()
            if self.holding is not None:
                # (A copy prepared for a held run failed: what was held goes on, to be skipped too.)
                self.again, self.holding = self.holding, None
            return None
        if msg_type == p.PARAMETER_DESCRIPTION and head.kind is DESCRIBE and head.swallow:
            return None  # (the proxy's own Describe)
        if msg_type == p.PARAMETER_DESCRIPTION and head.retry is not None and head.kind is DESCRIBE:
            # Held with its RowDescription: should the statement prove stale, the client hears
            # only of the copy prepared again.
            self.held_param = frame(msg_type, body)
            return None
        if head.kind is not SYNC and msg_type in _COMPLETION[head.kind]:
            entry = self._pop()
            if self.held_param is not None:
                to_client.append(self.held_param)
                self.held_param = None
            if not entry.swallow:
                to_client.append(frame(msg_type, body))
            if entry.done is not None:
                entry.done(body)
            self._flush_synth(to_client)
            return None
        to_client.append(frame(msg_type, body))
        return None

    def _stale(self, body: bytes, head: Entry) -> bool:
        """An error in reply to a Bind/Describe of a shared statement (*head*). When it says the
        copy is stale, the copy is forgotten (prepared again on next use); True when, besides,
        the client's batch is to be sent again: nothing of the failed part reached the client,
        no Execute went before it in the batch and the client is outside a transaction block.
        The error is then held; the batch's ReadyForQuery decides (_retry_ready)."""
        if not statement_is_stale(m.decode_fields(body)):
            return False
        queue = self.queue
        if head is HOT_RUN:
            hot, self.hot = self.hot, None
            if hot is None:
                return False  # (part of its answer went out already)
            items, statements, server_name = hot
            statements.forget(server_name)
            if self.tx_status != p.TX_IDLE or not _describes_first(items):
                return False
            self._pop()
        else:
            point = head.retry
            point.statements.forget(point.server_name)
            if point.batch is None or self.tx_status != p.TX_IDLE:
                return False
            end = next((i for i, entry in enumerate(queue) if entry.kind is SYNC), None)
            if end is None or queue[end].swallow:
                return False  # its Sync is not sent yet
            items = point.batch[point.index :]
            if not _describes_first(items):
                return False
            while queue[0].kind is not SYNC:  # the server skips the rest of the batch
                entry = self._pop()
                if entry.undo is not None:
                    entry.undo()
            self._pop()
        queue.insert(0, Entry(SYNC, swallow=True, synth=frame(p.ERROR_RESPONSE, body), retry=items))
        self.swallowing += 1
        return True

    def _retry_ready(self, body: bytes, to_client: list) -> int | None:
        """The ReadyForQuery closing a batch that failed on a stale statement: send it again
        (Relay.again, for the session), unless more is in flight behind it by now, which would
        then be answered first: the client gets PostgreSQL's error after all."""
        entry = self.queue[0]
        status = body[0] if body else p.TX_IDLE
        if len(self.queue) == 1 and status == p.TX_IDLE and self.held_ready is None:
            self.ready(status, to_client)
            self.again = entry.retry
            return None
        to_client.append(entry.synth)
        to_client.append(frame(p.READY_FOR_QUERY, body))
        self.ready(status, to_client)
        return self.tx_status

    def ready(self, status: int, to_client: list) -> None:
        """A ReadyForQuery (already on its way to the client) with transaction *status* ends the
        oldest Sync/Query in flight; replies of ours queued behind it follow into *to_client*."""
        self.tx_status = status
        self.hot = None
        queue = self.queue
        while queue:
            entry = self._pop()
            if entry.kind is SYNC:
                break
            if entry.undo is not None:  # never answered: skipped by the server
                entry.undo()
        if queue:
            self._flush_synth(to_client)

    def _flush_synth(self, to_client: list) -> None:
        queue = self.queue
        while queue and queue[0].kind is SYNTH:
            data = self._pop().synth
            to_client.append(data() if callable(data) else data)

    def forget_server(self) -> None:
        """The server connection went away mid-flight: nothing more will be answered."""
        self.held_ready = None
        self.held_param = None
        self.hot = self.batch = self.again = self.holding = None
        self.executed = False
        while self.queue:
            entry = self._pop()
            if entry.undo is not None:
                entry.undo()
        self.skipping = False
        self.unsynced = False
        self.copy_in = False
        self.copy_ended = False
        self.bound = None
