"""Where a client's work runs, and what happens when that node fails: routing, acquiring, retrying, replaying.

Part of ClientSession's state machine (session.py), written as a mixin so that each file holds
one concern: session.py has login, relaying and release; this has getting a server connection
for the client's work and surviving the loss of it.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure

from pgtwist import standin
from pgtwist.pool import PoolError
from pgtwist.relay import SYNC
from pgtwist.router import Decision, NoNode
from pgtwist.routing.classify import Classification, classify
from pgtwist.server_login import ServerLoginError
from pgtwist.settings import sync_sql
from pgtwist.states import CLOSED, IDLE, LINKED, PREPARING, WAITING
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate

log = Logger()

_TERMINATE = p.TERMINATE
_LOGIN_CACHE_LIMIT = 1000
_RETRY_DELAY = 0.25  # between attempts to place work while nodes come and go
_NOTHING_CLASSIFIED = Classification(read_only=False, reason="session")
# Login refusals that mean the node is away (unreachable, starting up, shutting down), not that
# this client may not log in: the work waits for that node or goes to another.
_NODE_AWAY = frozenset((sqlstate.CONNECTION_FAILURE, sqlstate.CANNOT_CONNECT_NOW, sqlstate.ADMIN_SHUTDOWN, "57P02"))


class Placement:
    """ClientSession's getting of server connections, and its failover. Holds no state of its own."""

    __slots__ = ()

    def _acquire(self, decision: Decision | None = None) -> None:
        """Find a node for what the client sent (or for its login) and wait for a server connection
        there; or, given the *decision* already made for that work, go straight to its node."""
        self.state = WAITING
        if self._deadline is None:
            self._deadline = self.proxy.clock.seconds() + self.config.failover_wait
        if decision is not None:
            self._routed(decision)
            return
        if self.router is not None and self.proxy.routers.get(self.database.name) is not self.router:
            self._follow_reload()
        router = self.router
        placed = self.transaction_mode and self.logged_in and router.clustered and not self.pinned
        if placed and router.hook is not None:
            # The hook may answer later: what the client sends meanwhile stays in its socket.
            self._pause()
            d = router.decide_with_hook(
                self._first_sql(),
                in_transaction=None,
                user_rule=self.user_route,
                min_lsn=self.min_lsn,
                identity={"user": self.user, "database": self.database.name, "client": self.id},
            )
            d.addCallbacks(self._routed, self._unroutable).addErrback(self._crashed)
            return
        try:
            if placed:
                # The built-in policy answers at once: no Deferred, and no pause and resume of
                # the client (two epoll calls) on this per-transaction path.
                decision = router.decide(self._first_sql(), in_transaction=None, user_rule=self.user_route, min_lsn=self.min_lsn)
            else:
                decision = self._primary_decision()  # everything goes to the primary
        except NoNode as e:
            self._unroutable(Failure(e))
            return
        self._routed(decision)

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

    def _first_sql(self, items: list | None = None) -> str | None:
        """The statement text that starts the waiting work (or *items*), for routing."""
        for item in self.backlog if items is None else items:
            if type(item) is tuple and item[0] in standin.STATEMENT_TYPES:
                return standin.statement_text(item[0], item[1], self.relay.statements)
        return None

    def _placed_on(self, server, items: list) -> bool:
        """In a cluster, a client keeping *server* between transactions sent *items*: place its next
        transaction anew, exactly as if it held no connection (one decision of the same policy).

        True when that lands on the kept connection's node: the placement is the link's from now
        on. Otherwise the connection goes back to its pool and the work to where it was placed
        (False). (Only the built-in policy, which answers at once, gets here: see _maybe_release.)
        """
        sql = self._first_sql(items)
        if sql is None:
            return True  # nothing to place (a Sync, a Terminate): it stays where it is
        try:
            decision = self.router.decide(sql, in_transaction=None, user_rule=self.user_route, min_lsn=self.min_lsn)
        except NoNode:
            decision = None
        if decision is not None and decision.node == server.node:
            self.decision = decision
            self.proxy.counters.routed(decision.reason)
            # What a new link starts with (as in _prepared): the replica read and what may be held behind it.
            self._link_used = False
            self._holding = False
            self._read_link = decision.want == "replica" and decision.classification.tx is None
            return True
        self._give_back(server)
        self.backlog.extend(items)
        self._acquire(decision)  # (None: no node now; _acquire asks again and waits for one)
        return False

    def _routed(self, decision: Decision) -> None:
        if self.state is CLOSED:
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
        self._pause()
        self._waiting = pool.acquire()
        self._waiting.addCallbacks(self._got_server, self._no_server).addErrback(self._crashed)

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
        self.state = IDLE
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
            if e.fields.get("C") in _NODE_AWAY and self.decision is not None:
                self.router.node_failed(self.decision.node, e.fields.get("M", ""))
            else:
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
        self.state = PREPARING
        query = None if self.settings == server.settings else sync_sql(self.settings, server.settings, server.parameters)
        if query is None:
            self._prepared([])
        else:
            server.run_internal([query]).addCallbacks(self._prepared, self._prepare_failed).addErrback(self._crashed)

    def _prepare_failed(self, failure) -> None:
        server, self.server = self.server, None
        if self.state is CLOSED or server is None:
            return
        self.router.node_failed(server.node, "connection lost")
        self.state = WAITING
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
            if self.transaction_mode and len(self.router.login_parameters) < _LOGIN_CACHE_LIMIT:
                self.router.login_parameters[self._login_key()] = parameters
            self._logged_in(parameters)
        self.state = LINKED
        self.ready_count = 0
        self._deadline = None
        self._link_sent = []
        self._link_replied = False
        self._link_used = False
        decision = self.decision
        self._holding = False
        self._read_link = bool(
            self.transaction_mode
            and decision is not None
            and decision.want == "replica"
            and decision.classification.tx is None
            and self.relay.tx_status == p.TX_IDLE
        )
        server.link(self, self.transport, self.relay.capture() if self.relay else None)
        self._resume()
        backlog, self.backlog = self.backlog, []
        if backlog:
            self._client_items(backlog)
        elif self.transaction_mode:
            self._maybe_release()

    # -- losing it --------------------------------------------------------------------------

    def server_lost(self, server, reason) -> None:
        """The node closed our server connection while this client was linked to it."""
        if self.server is not server or self.state is CLOSED:
            return
        self.server = None
        self._lent = False
        self.router.node_failed(server.node, "connection lost")
        if self.transaction_mode and self.state is LINKED and not self.pinned:
            self._link_lost(server)
            return
        if self.relay is not None:
            self.relay.forget_server()
        if server.at_message_boundary:
            self.fatal(
                sqlstate.CONNECTION_FAILURE,
                f"lost the connection to node {server.node}",
                "The server connection closed unexpectedly; the session cannot continue.",
            )
        else:
            self.state = CLOSED
            self.transport.loseConnection()

    def _link_lost(self, server) -> None:
        """Transaction pooling: the node died under this client's work. The session survives it."""
        relay = self.relay
        # The client's requests still owed a ReadyForQuery (not the proxy's own injected ones).
        # (A batch held back to be retried is the client's too.)
        owed = sum(1 for e in relay.queue if e.kind == SYNC and (not e.swallow or e.retry is not None)) + relay.held_requests()
        if relay.held_ready is not None:
            # Its statement ran, but the proxy's Query after it (restoring startup settings) did
            # not: report it failed, as its effects on the client's settings are not kept either.
            owed += 1
        replay = (
            not self._link_replied
            and not server.replied
            and relay.tx_status == p.TX_IDLE
            and self._only_reads(self._link_sent)
        )
        relay.forget_server()
        relay.server_fatal = None if replay else relay.server_fatal
        if replay:
            # An autocommit read that got no byte back yet: run it again elsewhere, transparently.
            self.backlog = self._link_sent + self.backlog
            self._link_sent = []
            if self.backlog:
                self._acquire()
            else:
                self.state = IDLE
                self._resume()
            return
        if not server.at_message_boundary:
            # Half a message already went out: there is no way to speak protocol to this client again.
            self.state = CLOSED
            self.transport.loseConnection()
            return
        in_transaction = relay.tx_status != p.TX_IDLE or (self.decision is not None and self.decision.classification.tx)
        status = p.TX_FAILED if in_transaction else p.TX_IDLE
        self.orphaned = bool(in_transaction)
        relay.tx_status = status
        said = relay.server_fatal
        relay.server_fatal = None
        error = m.error_response(
            "ERROR",
            sqlstate.CONNECTION_FAILURE,
            f"lost the connection to node {server.node}" + (f": {said.get('M')}" if said and said.get("M") else ""),
            "The statement did not complete; nothing was retried because it could have had effects."
            + (" The transaction is aborted: ROLLBACK to continue." if in_transaction else ""),
        )
        if owed:
            self.transport.write((error + m.ready_for_query(status)) * owed)
        elif in_transaction:
            # Idle in its transaction: the client hears about it from its next statement.
            self._orphan_error = error
        self.state = IDLE
        self._holding = self._read_link = False
        self._resume()
        if self.backlog and not self.orphaned:
            self._acquire()  # a write held back behind the lost read still wants the primary

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
            else:
                batch.append(item)
        else:
            self.backlog = batch
        self.transport.write(b"".join(out))
        if self.backlog and not self.orphaned:
            self._acquire()

    def _orphaned_reply(self, items: list) -> bytes:
        if standin.ends_dead_transaction(classify(sql) for sql in self._statement_texts(items)):
            self.orphaned = False
            self._orphan_error = None
            self.relay.tx_status = p.TX_IDLE
            return standin.rolled_back(items)
        error, self._orphan_error = self._orphan_error, None
        return standin.still_aborted(error)
