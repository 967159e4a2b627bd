"""Where a client's work runs, and what happens when that node fails: routing, acquiring, retrying, replaying.

Part of ClientSession's state machine (session.py), written as a mixin so that each file holds
one concern: session.py has login, relaying and release; this has getting a server connection
for the client's work and surviving the loss of it.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure

from pgtwist.routing import batch

from pgtwist.session import standin
from pgtwist.cluster import evidence
from pgtwist.pooling.pool import PoolError
from pgtwist.pooling.relay import SYNC
from pgtwist.routing.router import Decision, NoNode
from pgtwist.routing.classify import Classification, classify
from pgtwist.backend.login import ServerLoginError
from pgtwist.pooling.settings import sync_sql
from pgtwist.session.lease import Lease
from pgtwist.session.states import CLOSED, IDLE, LINKED, PREPARING, WAITING
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate

log = Logger()

_TERMINATE = p.TERMINATE
# An extended-protocol batch not yet closed by Sync leaves the server mid-conversation.
UNSYNCED = frozenset((p.PARSE, p.BIND, p.EXECUTE, p.DESCRIBE, p.CLOSE, p.FLUSH))
_RETRY_DELAY = 0.25  # between attempts to place work while nodes come and go
_NOTHING_CLASSIFIED = Classification(read_only=False, reason="session")
# What a session-mode link looks at in the node's answers: ReadyForQuery, ParameterStatus, and
# ErrorResponse, so that a FATAL relayed as it came is known (the client gets no second one).
SESSION_SERVER_CAPTURE = frozenset((p.READY_FOR_QUERY, p.PARAMETER_STATUS, p.ERROR_RESPONSE))
# Of a node's FATAL, what a kept session's ERROR repeats: code, message, detail, hint, context.
_KEPT_FIELDS = frozenset("CMDHW")
# Login refusals that mean the node is away (unreachable, starting up, shutting down), not that
# this client may not log in: the work waits for that node or goes to another.
_NODE_AWAY = frozenset((sqlstate.CONNECTION_FAILURE, sqlstate.CANNOT_CONNECT_NOW, sqlstate.ADMIN_SHUTDOWN, sqlstate.CRASH_SHUTDOWN))


class Placement:
    """ClientSession's getting of server connections, and its failover. Holds no state of its own."""

    __slots__ = ()

    def _acquire(self, decision: Decision | None = None) -> None:
        """Find a node for what the client sent (or for its login) and wait for a server connection
        there; or, given the *decision* already made for that work, go straight to its node."""
        self._enter(WAITING)
        if self._deadline is None:
            self._deadline = self.proxy.clock.seconds() + self.config.failover_wait
        if decision is not None:
            self._routed(decision)
            return
        if self.router is not None and self.proxy.routers.get(self.database.name) is not self.router:
            self._follow_reload()
        router = self.router
        placed = self.transaction_mode and self.logged_in and router.clustered and not self.pinned
        if placed:
            sql, rest, end = batch.first_batch(self.backlog, self.relay.statements)
            unfinished = end == batch.FLUSHED or (end == batch.OPEN and len(self.backlog) >= batch.OPEN_LIMIT)
            open_batch = end == batch.OPEN and not unfinished
        if placed and router.hook is not None:
            # The hook may answer later: what the client sends meanwhile stays in its socket.
            self._pause()
            d = router.decide_with_hook(
                sql,
                in_transaction=None,
                user_rule=self.user_route,
                min_lsn=self.min_lsn,
                identity={"user": self.user, "database": self.database.name, "client": self.id},
                rest=rest,
                unfinished=unfinished,
            )
            d.addCallbacks(self._routed, self._unroutable, callbackArgs=(open_batch,)).addErrback(self._crashed)
            return
        try:
            if placed:
                # The built-in policy answers at once: no Deferred, and no pause and resume of
                # the client (two epoll calls) on this per-transaction path.
                decision = router.decide(
                    sql, in_transaction=None, user_rule=self.user_route, min_lsn=self.min_lsn, rest=rest, unfinished=unfinished
                )
            elif not self.logged_in and self.transaction_mode and router.clustered and router.primary() is None:
                decision = router.login_decision()
                open_batch = False
            else:
                decision = self._primary_decision()  # everything goes to the primary
                open_batch = False
        except NoNode as e:
            self._unroutable(Failure(e))
            return
        self._routed(decision, open_batch)

    def _follow_reload(self) -> None:
        """A reload rebuilt this database's router (its nodes changed): place work with the new one.

        The old router's health monitor has stopped, so its view of the nodes is frozen; and
        its nodes may be gone. (A removed database keeps what it had: its sessions may finish.)
        """
        database = self.proxy.config.databases.get(self.database.name)
        if database is None:
            return
        self.database = database
        self.router = self.proxy.router_for(database)
        self._pool = None  # (the cached pool and primary decision were the old router's)
        self._primary = None

    def _pause(self) -> None:
        """Stop reading the client while its work waits: what it sends meanwhile stays in its socket."""
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self) -> None:
        # Only if we paused it: on the per-transaction path every pause/resume is two epoll calls.
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _primary_decision(self) -> Decision:
        node = self.router.primary()
        if node is None:
            raise NoNode("no primary")
        decision = self._primary
        if decision is None or decision.node is not node:
            decision = self._primary = Decision(node, "primary", "session needs the primary", _NOTHING_CLASSIFIED)
        return decision

    def _placed_on(self, server, items: list, kept) -> bool:
        """In a cluster, a client keeping *server* between transactions sent *items*: place its next
        transaction anew, exactly as if it held no connection (one decision of the same policy).

        True when that lands on the kept connection's node: the placement is the link's from now
        on. Otherwise the connection goes back to its pool and the work to where it was placed
        (False). (Only the built-in policy, which answers at once, gets here: see _maybe_release.)
        """
        sql, rest, end = batch.first_batch(items, self.relay.statements)
        if sql is None:
            # Nothing to place (a Sync, a Terminate), or a statement whose text is not known
            # (the unnamed one, parsed on this very connection): it stays where it is, and
            # goes on as the *kept* lease's work did.
            self.lease.read_link = kept.read_link
            self.lease.used = kept.used
            self._watch_link(self.decision, known=False)
            return True
        unfinished = end == batch.FLUSHED or (end == batch.OPEN and len(items) >= batch.OPEN_LIMIT)
        try:
            decision = self.router.decide(
                sql, in_transaction=None, user_rule=self.user_route, min_lsn=self.min_lsn, rest=rest, unfinished=unfinished
            )
        except NoNode:
            decision = None
        if decision is not None and end == batch.OPEN and not unfinished and not decision.on_primary:
            # The start of an extended batch that would go to a replica: the rest of it (one
            # implicit transaction) may write. It is placed once its end is here.
            self._give_back(server)
            self.backlog.extend(items)
            return False
        if decision is not None and decision.node == server.node:
            self.decision = decision
            self.proxy.counters.routed(decision.reason)
            # What a new link starts with (as in _prepared): the replica read and what may be held behind it.
            self.lease.read_link = decision.want == "replica" and decision.classification.tx is None and not decision.on_primary
            self._watch_link(decision)
            return True
        self._give_back(server)
        self.backlog.extend(items)
        self._acquire(decision)  # (None: no node now; _acquire asks again and waits for one)
        return False

    def _routed(self, decision: Decision, open_batch: bool = False) -> None:
        if self.state is CLOSED:
            return
        if open_batch and not decision.on_primary:
            # An extended-protocol batch whose Sync has not come, placed on a replica: the rest
            # of it runs in the same implicit transaction and may write. Place it whole, once
            # its end (or a Flush) is here; the client is read meanwhile (see batch.OPEN_LIMIT).
            self._enter(IDLE)
            self._deadline = None
            self._resume()
            return
        self.decision = decision
        self.proxy.counters.routed(decision.reason)
        pool = self._pool
        if pool is None or pool.node is not decision.node or pool.retired:
            # (Most transactions go where the last one went: skip the lookup then.)
            pool = self._pool = self.proxy.pool_for(self.database, self.user, decision.node)
        server = pool.take_idle()
        if server is not None:
            self._got_server(server)
            return
        # Waiting in the pool's queue: it calls server_ready / server_unavailable, no Deferred.
        # The client is not paused here (two epoll calls per wait): whatever it sends meanwhile
        # is kept in the backlog and pauses it then (_client_data).
        self._waiting = pool
        pool.wait_for(self)

    def server_ready(self, server) -> None:
        """The pool hands this waiting client a server connection."""
        try:
            self._got_server(server)
        except Exception:
            self._crashed(Failure())

    def server_unavailable(self, failure) -> None:
        """The pool could not serve this waiting client (wait timeout, the node refused, ...)."""
        try:
            self._no_server(failure)
        except Exception:
            self._crashed(Failure())

    def _unroutable(self, failure) -> None:
        failure.trap(NoNode)
        self._retry_or_fail(m.error_fields("ERROR", sqlstate.CONNECTION_FAILURE, f'no node can serve database "{self.database.name}" now: {failure.value}'))

    def _retry_or_fail(self, fields: dict) -> None:
        """No server this time: try again (another node, or the same once it is back) until failover_wait runs out."""
        if self.state is CLOSED:
            return
        now = self.proxy.clock.seconds()
        retriable = self.router.clustered or (self.logged_in and self.transaction_mode)
        if retriable and self._deadline is not None and now < self._deadline:
            self._pause()  # (waiting for a node: what the client sends meanwhile stays in its socket)
            self.proxy.clock.callLater(_RETRY_DELAY, self._retry)
            return
        self._deadline = None
        if not self.logged_in or not self.transaction_mode:
            self.fatal_fields(dict(fields, S="FATAL", V="FATAL"))
            return
        # A logged-in client keeps its session: its waiting work fails like a statement would.
        backlog, self.backlog = self.backlog, []
        self._enter(IDLE)
        self._resume()
        self._answer_locally(backlog, fields)

    def _retry(self) -> None:
        if self.state is WAITING:
            self._acquire()

    def _no_server(self, failure) -> None:
        self._waiting = None
        if self.state is CLOSED:
            return
        e = failure.value
        if isinstance(e, PoolError):
            self._deadline = None
            self._retry_or_fail(m.error_fields("FATAL", e.sqlstate, e.message, e.detail))
        elif isinstance(e, ServerLoginError):
            if self.decision is not None:
                self.router.server_ended(self.decision.node, e.fields, "login failed")
            if e.fields.get("C") not in _NODE_AWAY:
                self._deadline = None  # a refusal, not an outage: say so now
            self._retry_or_fail(e.fields)
        else:
            log.failure("client {client}: no server", failure, client=self.id)
            self.fatal(sqlstate.CONNECTION_FAILURE, f"could not get a server connection: {e}")

    def _got_server(self, server) -> None:
        self._waiting = None
        if self.state is CLOSED:
            server.pool.release(server, reusable=True, reset=not self.transaction_mode)
            return
        self.server = server
        self._enter(PREPARING)
        statements = None if self.settings == server.settings else sync_sql(self.settings, server.settings, server.parameters)
        if statements is None and not self.logged_in and server.parameters_stale:
            statements = []  # an empty batch: its ReadyForQuery brings what changed (in_hot_standby)
        if statements is None:
            self._prepared([])
        else:
            server.run_for_client([statements]).addCallbacks(self._prepared, self._prepare_failed).addErrback(self._crashed)

    def _prepare_failed(self, failure) -> None:
        server, self.server = self.server, None
        if self.state is CLOSED or server is None:
            return
        self.router.server_ended(server.node, server.fatal)
        self._enter(WAITING)
        self._retry_or_fail(
            m.error_fields("FATAL", sqlstate.CONNECTION_FAILURE, f"lost the connection to node {server.node} while preparing the session")
        )

    def _prepared(self, errors: list[dict]) -> None:
        server = self.server
        if self.state is CLOSED:
            self.server = None
            server.pool.release(server, reusable=True, reset=not self.transaction_mode)
            return
        if errors:
            self.server = None
            server.settings = {}  # the failed statement rolled back; what it held is unknown
            server.tainted = True
            server.pool.release(server, reusable=False)
            if not self.logged_in:
                # As PostgreSQL does for a bad startup parameter: the login fails with the server's reason.
                self.fatal_fields(dict(errors[0], S="FATAL", V="FATAL"))
            else:
                self.fatal(sqlstate.INTERNAL_ERROR, "could not restore this session's settings on a server connection", errors[0].get("M"))
            return
        if server.settings != self.settings:
            server.settings = dict(self.settings)
        if not self.logged_in:
            parameters = dict(server.parameters)
            if self.transaction_mode and self.decision is not None and self.decision.want == "replica":
                # A login while there is no primary (router.login_decision): the client is told
                # what a login through pgtwist reports with a primary, a read-write endpoint
                # (its writes wait for the primary), not that it reached a standby; libpq's
                # target_session_attrs=read-write would otherwise pass pgtwist over.
                if "in_hot_standby" in parameters:
                    parameters["in_hot_standby"] = "off"
            elif self.transaction_mode:
                server.pool.remember_login(self._login_key(), parameters)
            else:
                # Session pooling: this server connection is the client's for good, so the client
                # is told its process id (with a secret of ours; a CancelRequest with it reaches
                # this connection as any other does).
                pid = server.backend_key[0] if server.backend_key is not None else None
                self.process_id, self.secret_key = self.proxy.register_cancel_key(self, pid)
            self._logged_in(parameters)
        self._enter(LINKED)
        self.ready_count = 0
        self._deadline = None
        decision = self.decision
        self.lease = Lease(
            read_link=bool(
            self.transaction_mode
            and decision is not None
            and decision.want == "replica"
            and decision.classification.tx is None
            and not decision.on_primary  # (a read that fell back to the primary: writes behind it may follow it)
            and self.relay.tx_status == p.TX_IDLE
            )
        )
        self._watch_link(decision)
        server.link(self, self.transport, self.relay.capture() if self.relay else SESSION_SERVER_CAPTURE)
        self._resume()
        backlog, self.backlog = self.backlog, []
        if backlog:
            if not (self.transaction_mode and self._plain_backlog(backlog, server)):
                self._client_items(backlog)
        elif self.transaction_mode:
            self._maybe_release()

    # -- losing it --------------------------------------------------------------------------

    def server_lost(self, server, reason) -> None:
        """The node closed our server connection while this client was linked to it.

        What the node said before it hung up (its FATAL, if any) decides both what it means for
        the node's health (cluster/evidence.py: a client's protocol error or one terminated
        backend never takes a node down) and what the client hears: the node's own SQLSTATE and
        message, once. Transaction pooling keeps the session (its state lives in pgtwist) unless
        on_server_loss = "close_client"; session mode and pinned sessions cannot carry it and
        end with the node's FATAL alone.
        """
        if self.server is not server or self.state is CLOSED:
            return
        self.server = None
        lease, self.lease = self.lease, None
        lent = lease is not None and lease.lent
        relay = self.relay
        said = server.fatal
        if relay is not None:
            said = said or relay.server_fatal
            relay.server_fatal = None
        log.info(
            "client {client}: server {server} on node {node} ended: {code} {message}",
            client=self.id,
            server=server.id,
            node=server.node,
            code=said.get("C") if said else sqlstate.CONNECTION_FAILURE,
            message=said.get("M") if said else "connection lost",
        )
        self.router.server_ended(server.node, said)
        if self.transaction_mode and self.state is LINKED and not self.pinned:
            if said is not None and said.get("C") == sqlstate.PROTOCOL_VIOLATION:
                keep = False  # the node could not follow what this client sent: neither can we
            elif self.proxy.config.on_server_loss == "close_client":
                # PgBouncer's way: a client whose server connection dies goes with it. (A client
                # merely keeping the connection between transactions does not hold it, as there.)
                keep = lent and relay.idle and relay.tx_status == p.TX_IDLE
            else:
                keep = True
            if keep:
                self._link_lost(server, lease, said)
                return
        if relay is not None:
            relay.forget_server()
        if not server.at_message_boundary:
            # Half a message already went out: there is no way to speak protocol to this client again.
            self._enter(CLOSED)
            self.transport.loseConnection()
        elif said is not None:
            # The node's own FATAL, alone. In session mode it went to the client as it came.
            self._close_with(said, told=relay is None)
        else:
            self.fatal(
                sqlstate.CONNECTION_FAILURE,
                f"lost the connection to node {server.node}",
                "The server connection closed unexpectedly; the session cannot continue.",
            )

    def query_timed_out(self, limit: float) -> None:
        """query_timeout: the linked node has owed this client an answer for more than *limit* seconds.

        The server connection is closed (after a CancelRequest, so that a node that can still hear
        stops the work; a hung one would never answer the cancel) and the client gets ERROR 57014
        naming query_timeout. In transaction pooling the session goes on, as after a lost node
        (25P02 until ROLLBACK when a transaction was open); in session pooling its server session
        was the client's state, so the client is closed with FATAL 57014. The node's health is not
        touched: a slow statement says nothing about the node (the probes judge it), and nothing
        is replayed: the statement may have had its effects.
        """
        server = self.server
        if server is None or self.state is not LINKED:
            return
        self._asked_at = None
        lease, self.server, self.lease = self.lease, None, None
        message = f"canceling statement due to query_timeout ({limit:g} s): node {server.node} did not answer in time"
        log.warn("client {client}: {why} (server {server})", client=self.id, why=message, server=server.id)
        self.proxy.cancel_server(server)
        server.abandon()
        if self.transaction_mode and not self.pinned:
            self.proxy.counters.error(sqlstate.QUERY_CANCELED)  # (fatal() counts its own)
            self._link_lost(server, lease, None, timed_out=message)
            return
        if self.relay is not None:
            self.relay.forget_server()
        if server.at_message_boundary:
            self.fatal(
                sqlstate.QUERY_CANCELED,
                message,
                "The server connection was closed, and this session's state on the node with it.",
            )
        else:
            self._enter(CLOSED)
            self.transport.loseConnection()

    def _close_with(self, said: dict, told: bool) -> None:
        """Close the client with the node's FATAL *said*; *told*: the client has it already."""
        if not told:
            self.fatal_fields(dict(said, S="FATAL", V="FATAL"))
            return
        log.info("client {client} closed: {code} {message}", client=self.id, code=said.get("C"), message=said.get("M"))
        self.proxy.counters.error(said.get("C"))
        self._enter(CLOSED)
        self._cancel_idle_tx_timer()
        self.transport.loseConnection()

    def _link_lost(self, server, lease, said: dict | None, timed_out: str | None = None) -> None:
        """Transaction pooling: the server connection died under this client's work (the node
        went away, or it ended this one connection: pg_terminate_backend(), a timeout), or did
        not answer within query_timeout (*timed_out* says so). The session survives it; *said*
        is the node's FATAL, if it sent one."""
        relay = self.relay
        # The client's requests still owed a ReadyForQuery (not the proxy's own injected ones).
        # (A batch held back to be retried is the client's too.)
        owed = sum(1 for e in relay.queue if e.kind == SYNC and (not e.swallow or e.retry is not None)) + relay.held_requests()
        if relay.held_ready is not None:
            # Its statement ran, but the proxy's batch after it (restoring startup settings) did
            # not: report it failed, as its effects on the client's settings are not kept either.
            owed += 1
        replay = (
            timed_out is None  # (what ran too long would run too long elsewhere, and may have written)
            and not evidence.deliberate(said)  # (a backend the node ended on purpose stays ended)
            and not lease.replied
            and not server.replied
            and relay.tx_status == p.TX_IDLE
            and self._only_reads(lease.sent)
        )
        relay.forget_server()
        if replay:
            # An autocommit read that got no byte back yet: run it again elsewhere, transparently.
            self.backlog = lease.sent + self.backlog
            if self.backlog:
                self._acquire()
            else:
                self._enter(IDLE)
                self._resume()
            return
        if not server.at_message_boundary:
            # Half a message already went out: there is no way to speak protocol to this client again.
            self._enter(CLOSED)
            self.transport.loseConnection()
            return
        in_transaction = relay.tx_status != p.TX_IDLE or (self.decision is not None and self.decision.classification.tx)
        status = p.TX_FAILED if in_transaction else p.TX_IDLE
        self.orphaned = bool(in_transaction)
        relay.tx_status = status
        if timed_out is not None:
            error = m.error_response(
                "ERROR",
                sqlstate.QUERY_CANCELED,
                timed_out,
                "Its server connection was closed; the statement may or may not have taken effect, and nothing was retried."
                + (" The transaction is aborted: ROLLBACK to continue." if in_transaction else ""),
            )
        else:
            error = m.error_response_from_fields(self._lost_fields(server, said, bool(in_transaction)))
        out = (error + m.ready_for_query(status)) * owed
        if self.scanner.last_type in UNSYNCED:
            # The client is in the middle of a batch whose Sync has not come (a driver that
            # prepares with Parse, Describe, Flush waits for an answer before it sends one): as
            # PostgreSQL does after an error, the error goes out now and the rest of the batch,
            # up to its Sync, is skipped; that Sync gets its ReadyForQuery alone.
            out += error
            if in_transaction:
                self._orphan_told = True
            else:
                relay.skipping = True
        elif in_transaction and not owed:
            # Idle in its transaction: the client hears about it from its next statement.
            self._orphan_error = error
        if out:
            self.transport.write(out)
        self._enter(IDLE)
        self._resume()
        if self.backlog and not self.orphaned:
            self._acquire()  # a write held back behind the lost read still wants the primary

    @staticmethod
    def _lost_fields(server, said: dict | None, in_transaction: bool) -> dict:
        """The ERROR a kept session gets for work its lost server connection took with it: the
        node's own SQLSTATE and message when it said why (57P01, 25P03...), else 08006."""
        aborted = " The transaction is aborted: ROLLBACK to continue." if in_transaction else ""
        if said is None:
            return m.error_fields(
                "ERROR",
                sqlstate.CONNECTION_FAILURE,
                f"lost the connection to node {server.node}",
                "The statement did not complete; nothing was retried because it could have had effects." + aborted,
            )
        detail = (
            f"pgtwist kept this session; only its server connection (node {server.node}) ended."
            " The statement did not complete and was not run again." + aborted
        )
        fields = {"S": "ERROR", "V": "ERROR", "C": sqlstate.CONNECTION_FAILURE, "M": f"lost the connection to node {server.node}"}
        fields.update((k, v) for k, v in said.items() if k in _KEPT_FIELDS)
        fields["D"] = f"{said['D']}\n{detail}" if said.get("D") else detail
        return fields

    def _statement_texts(self, items: list):
        return standin.statement_texts(items, self.relay.statements)

    def _only_reads(self, items: list) -> bool:
        """True when every statement in *items* only reads, outside any transaction: safe to run twice."""
        seen = False
        for sql in self._statement_texts(items):
            c = self.router.classify(sql)
            if not c.read_only or c.tx is not None:
                return False
            seen = True
        return seen

    def _answer_locally(self, items: list, fields: dict) -> None:
        """Answer client messages no server will see, as PostgreSQL answers a failed statement."""
        reply, terminated = standin.failed_work(items, fields, p.TX_FAILED if self.orphaned else p.TX_IDLE)
        self.transport.write(reply)
        if terminated:
            self._terminate()

    def _answer_orphaned(self, items: list) -> None:
        """After its node died mid-transaction, the client's statements fail until it ends the transaction."""
        out = []
        # An extended batch whose Sync has not come yet waits in the backlog for the rest.
        batch: list = self.backlog
        self.backlog = []
        for i, item in enumerate(items):
            if not self.orphaned:
                # ROLLBACK ended it: what the client sent behind it runs on a server as usual.
                self.backlog = items[i:]
                break
            if type(item) is not tuple:
                continue
            msg_type = item[0]
            if msg_type == _TERMINATE:
                self.transport.write(b"".join(out))
                self._terminate()
                return
            if msg_type == p.QUERY or msg_type == p.SYNC:
                batch.append(item)
                out.append(self._orphaned_reply(batch))
                batch = []
            elif msg_type == p.FLUSH:
                # A driver that prepares with Parse, Describe, Flush (asyncpg) waits for an answer
                # before its Sync: as PostgreSQL does, the error goes out now and the rest of the
                # batch, up to its Sync (answered with ReadyForQuery alone), is skipped.
                batch.append(item)
                if not self._orphan_told and not standin.ends_dead_transaction(
                    classify(sql) for sql in self._statement_texts(batch)
                ):
                    error, self._orphan_error = self._orphan_error, None
                    out.append(standin.aborted_error(error))
                    self._orphan_told = True
            else:
                batch.append(item)
        else:
            self.backlog = batch
        self.transport.write(b"".join(out))
        if self.backlog and not self.orphaned:
            self._acquire()

    def _orphaned_reply(self, items: list) -> bytes:
        if self._orphan_told:
            self._orphan_told = False  # (its error went out at a Flush; the batch was skipped since)
            return m.ready_for_query(p.TX_FAILED)
        if standin.ends_dead_transaction(classify(sql) for sql in self._statement_texts(items)):
            self.orphaned = False
            self._orphan_error = None
            self.relay.tx_status = p.TX_IDLE
            return standin.rolled_back(items)
        error, self._orphan_error = self._orphan_error, None
        return standin.still_aborted(error)
