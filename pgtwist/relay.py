"""Extended-protocol relay over shared server connections: renamed statements, injected Parse/Close, replies in order."""

from __future__ import annotations

from pgtwist.statements import (
    SERVER_NAME_PREFIX,
    Statement,
    bind_body,
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
# simple queries in flight, ReadyForQuery (and ParameterStatus) is all that matters.
SIMPLE_CAPTURE = frozenset((p.READY_FOR_QUERY, p.PARAMETER_STATUS, p.ERROR_RESPONSE))
FULL_CAPTURE = SIMPLE_CAPTURE | frozenset(
    (
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
# While a Query the proxy injected is being answered, everything of its answer is looked at
# (and dropped): RowDescription, DataRow, CommandComplete, notices, errors.
SWALLOW_CAPTURE = FULL_CAPTURE | frozenset((p.DATA_ROW, p.NOTICE_RESPONSE))
# Client messages a shared server connection needs to see.
CLIENT_CAPTURE = frozenset(
    (p.PARSE, p.BIND, p.DESCRIBE, p.CLOSE, p.EXECUTE, p.SYNC, p.QUERY, p.FLUSH, p.FUNCTION_CALL, p.TERMINATE)
)
_PARSE_COMPLETE = frame(p.PARSE_COMPLETE)
_CLOSE_COMPLETE = frame(p.CLOSE_COMPLETE)


class Entry:
    """One request in flight, and what to do with its reply."""

    __slots__ = ("kind", "swallow", "synth", "undo", "done", "reword", "simple")

    def __init__(self, kind, *, swallow=False, synth=None, undo=None, done=None, reword=None, simple=False):
        self.kind = kind
        # A Query or FunctionCall (not a Sync): ends at its ReadyForQuery, but after an error in
        # an extended-protocol message the server skips it unanswered, as all else until Sync.
        self.simple = simple
        self.swallow = swallow  # the proxy injected the request: its reply is not the client's
        self.synth = synth  # SYNTH: bytes (or a callable making them) the proxy answers itself
        self.undo = undo  # called when the request fails or is skipped after an error
        self.done = done  # called with the completion message body on success
        self.reword = reword  # (server name, client name): an error about it names the client's


_PLAIN = {kind: Entry(kind) for kind in (SYNC, PARSE, BIND, DESCRIBE, EXECUTE, CLOSE)}
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
    )

    def __init__(self):
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
        self.swallowing = 0  # Queries the proxy injected, not answered yet
        self.held_ready: bytes | None = None  # the client's ReadyForQuery, held until the injected Query is done

    @property
    def idle(self) -> bool:
        return not self.queue and not self.skipping and not self.unsynced

    def expect_ready(self, simple: bool = True) -> None:
        """A plain Query (or, not *simple*, a batch ending in Sync) went to the server as the
        client sent it: one ReadyForQuery is owed."""
        self.queue.append(_SIMPLE if simple else _PLAIN[SYNC])

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

    def inject_query(self, sql: str, to_server: list) -> None:
        """A Query of the proxy's own behind what the client sent so far; its whole answer
        (ReadyForQuery included) stays with the proxy, except ParameterStatus, which tells the
        client the settings it now has. An error in it is dropped too: it can only repeat why
        the client's own statement before it failed (an aborted transaction).

        The client's ReadyForQuery just before it is held back until this answer is in, so
        that, as on a direct connection, the client hears of its settings before it may speak.
        """
        if self.skipping:
            return
        self._push(Entry(SYNC, swallow=True, simple=True))
        to_server.append(m.query(sql))

    # -- client -> server ---------------------------------------------------------------------

    def client_message(self, msg_type: int, body: bytes, server, to_server: list, to_client: list) -> None:
        """Handle one captured client message bound for *server*."""
        if msg_type == p.SYNC:
            self.unsynced = False
        elif msg_type != p.QUERY and msg_type != p.FUNCTION_CALL:
            self.unsynced = True  # Parse, Bind, Describe, Close, Execute, Flush
        if self.skipping:
            if msg_type != p.SYNC:
                return
            self.skipping = False
        if msg_type == p.PARSE:
            self._parse(body, server, to_server, to_client)
        elif msg_type == p.BIND:
            portal, name, rest = split_bind(body)
            if name:
                statement = self._server_statement(name, server, to_server, to_client)
                if statement is not None:
                    body = bind_body(portal, statement.server_name, rest)
                elif self._refuse_unknown(name, to_client):
                    return
            self._forward(BIND, msg_type, body, to_server)
        elif msg_type == p.DESCRIBE:
            kind, name = split_target(body, "Describe")
            if kind == ord("S") and name:
                statement = self._server_statement(name, server, to_server, to_client)
                if statement is not None:
                    body = target_body(kind, statement.server_name)
                elif self._refuse_unknown(name, to_client):
                    return
            self._forward(DESCRIBE, msg_type, body, to_server)
        elif msg_type == p.CLOSE:
            kind, name = split_target(body, "Close")
            if kind == ord("S") and name:
                # The client's name goes; the server keeps the shared statement for others.
                closed = self.statements.pop(name, None)

                def undo():  # skipped after an error earlier in the batch: the statement stays
                    if closed is not None and name not in self.statements:
                        self.statements[name] = closed

                self._synth(_CLOSE_COMPLETE, to_client, undo)
            else:
                self._forward(CLOSE, msg_type, body, to_server)
        elif msg_type == p.EXECUTE:
            self._forward(EXECUTE, msg_type, body, to_server)
        elif msg_type == p.FLUSH:
            to_server.append(frame(msg_type, body))
        elif msg_type == p.SYNC:
            self._forward(SYNC, msg_type, body, to_server)
        else:  # Query, FunctionCall: one ReadyForQuery each, like Sync
            self._push(_SIMPLE)
            to_server.append(frame(msg_type, body))

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
        statement = Statement.from_definition(definition)
        self.statements[name] = statement

        def undo():
            if self.statements.get(name) is statement:
                del self.statements[name]

        if statement.server_name in server.statements:
            server.statements.touch(statement.server_name)
            self._synth(_PARSE_COMPLETE, to_client, undo)
        else:
            self._prepare_on(server, statement, to_server, swallow=False, client_undo=undo)

    def _server_statement(self, name: str, server, to_server: list, to_client: list) -> Statement | None:
        """The client's statement, prepared on *server* first if that server lacks it; None if the client has none so named."""
        statement = self.statements.get(name)
        if statement is None:
            return None
        if statement.server_name in server.statements:
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
            if self.statements.pop(name, None) is not None:
                self._forward(CLOSE, p.CLOSE, target_body(ord("S"), name), to_server, swallow=True)
                self._forward(PARSE, p.PARSE, parse_body(name, b"SELECT\x00\x00\x00"), to_server, swallow=True)

    def _prepare_on(self, server, statement: Statement, to_server: list, *, swallow: bool, client_undo=None) -> None:
        server_name = statement.server_name
        for old in server.statements.add(server_name):
            self._forward(CLOSE, p.CLOSE, target_body(ord("S"), old), to_server, swallow=True)

        def undo():
            server.statements.discard(server_name)
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
        """Whether the request this ReadyForQuery ends is followed by a Query of the proxy's own."""
        queue = self.queue
        for i, entry in enumerate(queue):
            if entry.kind is SYNC:
                return i + 1 < len(queue) and queue[i + 1].kind is SYNC and queue[i + 1].swallow
        return False

    def server_message(self, msg_type: int, body: bytes, to_client: list) -> int | None:
        """Handle one captured server message; returns the ReadyForQuery status when one went out."""
        queue = self.queue
        if self.swallowing and queue[0].swallow and queue[0].kind is SYNC and msg_type != p.PARAMETER_STATUS:
            # The answer to a Query the proxy injected: the client never sees it.
            if msg_type == p.READY_FOR_QUERY:
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
                # The proxy's own Query comes next: the client hears of this one after it.
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
        if msg_type == p.ERROR_RESPONSE:
            if head.reword is not None:
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
            return None
        if head.kind is not SYNC and msg_type in _COMPLETION[head.kind]:
            entry = self._pop()
            if not entry.swallow:
                to_client.append(frame(msg_type, body))
            if entry.done is not None:
                entry.done(body)
            self._flush_synth(to_client)
            return None
        to_client.append(frame(msg_type, body))
        return None

    def ready(self, status: int, to_client: list) -> None:
        """A ReadyForQuery (already on its way to the client) with transaction *status* ends the
        oldest Sync/Query in flight; replies of ours queued behind it follow into *to_client*."""
        self.tx_status = status
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
        while self.queue:
            entry = self._pop()
            if entry.undo is not None:
                entry.undo()
        self.skipping = False
        self.unsynced = False
