"""Placement: where a client's work runs and getting a server connection there (routing, waiting, retrying), and what losing one means.

A collaborator the ClientSession owns (``session.placement``), not part of it: it keeps its own
state (the failover_wait deadline, the pool waited in, the last pool and primary decision used),
reads the session's public attributes, and changes the session only through its methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from twisted.logger import Logger
from twisted.python.failure import Failure

from pgtwist.backend.login import ServerLoginError
from pgtwist.cluster import evidence
from pgtwist.pooling.errors import PoolError
from pgtwist.routing import batch
from pgtwist.routing.analysis import Classification
from pgtwist.routing.router import Decision, NoNode
from pgtwist.session import standin
from pgtwist.session.states import CLOSED, WAITING
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate

if TYPE_CHECKING:
    from pgtwist.pooling.pool import Pool
    from pgtwist.session.client import ClientSession

log = Logger(namespace=__name__)  # (named: compiled, the module has no frame Logger could read it from)

# An extended-protocol batch not yet closed by Sync leaves the server mid-conversation.
UNSYNCED: Final = frozenset((p.PARSE, p.BIND, p.EXECUTE, p.DESCRIBE, p.CLOSE, p.FLUSH))
_RETRY_DELAY: Final = 0.25  # between attempts to place work while nodes come and go
_NOTHING_CLASSIFIED: Final = Classification(read_only=False, reason="session")
# The Decision "everything to the primary" for each node: immutable, so one serves every session
# on that node (one was made per login). Keyed by the node object, whose identity a Decision
# carries (each database has Addresses of its own, equal to another's for the same host:port).
# An entry keeps its node alive, so the id is not reused while it lives; a reload makes new
# nodes, so the table is emptied should it ever outgrow any configuration.
_PRIMARY_DECISIONS: dict = {}
_PRIMARY_DECISIONS_LIMIT: Final = 256
# What a session-mode link looks at in the node's answers: ReadyForQuery, ParameterStatus,
# ErrorResponse, so that a FATAL relayed as it came is known (the client gets no second one),
# and CopyInResponse (the Syncs PostgreSQL will ignore: ClientSession._syncs_ignored_by_copy).
SESSION_SERVER_CAPTURE: Final = frozenset((p.READY_FOR_QUERY, p.PARAMETER_STATUS, p.ERROR_RESPONSE, p.COPY_IN_RESPONSE))
# Of a node's FATAL, what a kept session's ERROR repeats: code, message, detail, hint, context.
_KEPT_FIELDS: Final = frozenset("CMDHW")
# Login refusals that mean the node is away (unreachable, starting up, shutting down), not that
# this client may not log in: the work waits for that node or goes to another.
_NODE_AWAY: Final = frozenset((sqlstate.CONNECTION_FAILURE, sqlstate.CANNOT_CONNECT_NOW, sqlstate.ADMIN_SHUTDOWN, sqlstate.CRASH_SHUTDOWN))


class _Verdict:
    """A decide_kept() answer that is not a Decision."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# decide_kept(): nothing in the work to place by (a Sync, the unnamed statement): it stays.
UNPLACED = _Verdict("UNPLACED")
# decide_kept(): the start of an extended batch bound for a replica: placed once its end is here.
AWAIT_END = _Verdict("AWAIT_END")


class Placement:
    """Getting a server connection for one client's work, and surviving the loss of it.

    What the session calls:

    - ``place(decision=None)``: find a node for the session's backlog (or its login) and a
      server connection there; given the *decision* already made, go straight to its node.
      It ends in ``session.link_server(server)``, ``session.defer_work()`` (an open batch
      bound for a replica waits for its end), ``session.fail_waiting_work(fields)`` or
      ``session.fatal_fields(...)``; meanwhile it may ``pause_reading()`` the client.
    - ``server_ready(server)`` / ``server_unavailable(failure)``: the pool's answers to a
      waiting session (the pool calls the session, which passes them on).
    - ``cancel()``: the client left while waiting. ``closed()``: the client's connection is
      gone: the placement lets go of the session. ``settled()``: its server connection is
      linked, the failover_wait deadline is over. ``retry_or_fail(fields)``: that connection
      was lost while being prepared. ``forget()``: a reload changed the session's router.
    - ``decide_kept(items)``: the session kept its connection between transactions and sent
      *items*: where they belong (a Decision, None for nowhere now, UNPLACED or AWAIT_END).
    - ``keeps_session(said, lent)``, ``replayable(server, lease, said, timed_out)``,
      ``lost_fields(...)``: what a lost server connection means for the session.

    Its one write to the session is its output, ``session.decision`` (where the work was
    placed), read by the session and its counters on every ReadyForQuery.
    """

    __slots__ = ("session", "proxy", "_deadline", "_waiting", "_pool", "_primary", "_retrying")

    def __init__(self, session: ClientSession) -> None:
        self.session: ClientSession | None = session  # its ClientSession; None once it closed (closed())
        self.proxy = session.proxy
        self._deadline: float | None = None  # until when waiting work may still be retried
        self._waiting: Pool | None = None  # the pool the session waits in for a server connection
        self._pool: Pool | None = None  # the pool the last transaction used
        self._primary: Decision | None = None  # the Decision for the primary, kept while the primary stays
        self._retrying: Any = None  # the pending retry (failover_wait), so that give_up can call it off

    # -- placing ----------------------------------------------------------------------------

    def place(self, decision: Decision | None = None) -> None:
        s = self.session
        s.start_waiting()
        if self._deadline is None:
            # (Read now, not taken from when the client asked: that may be long before this
            # placement, a read replayed after it ran, or a request after one answered by
            # pgtwist itself, which leaves _asked_at set.)
            self._deadline = self.proxy.clock.seconds() + s.config.failover_wait
        if decision is not None:
            self.routed(decision)
            return
        if s.router is not None and s.router.replaced:
            s.follow_reload()
        router = s.router
        if not (s.transaction_mode and s.logged_in and router.clustered and not s.pinned):
            self._place_unclustered(router)
            return
        sql, rest, end = batch.first_batch(s.backlog, s.relay.statements)
        unfinished = end == batch.FLUSHED or (end == batch.OPEN and len(s.backlog) >= batch.OPEN_LIMIT)
        open_batch = end == batch.OPEN and not unfinished
        if router.hook is not None:
            # The hook may answer later: what the client sends meanwhile stays in its socket.
            s.pause_reading()
            d = router.decide_with_hook(
                sql,
                in_transaction=None,
                user_rule=s.user_route,
                min_lsn=s.min_lsn,
                identity={"user": s.user, "database": s.database.name, "client": s.id},
                rest=rest,
                unfinished=unfinished,
            )
            d.addCallbacks(self.routed, self._unroutable, callbackArgs=(open_batch,)).addErrback(s.crashed)
            return
        try:
            # The built-in policy answers at once: no Deferred, and no pause and resume of
            # the client (two epoll calls) on this per-transaction path.
            decision = router.decide(sql, in_transaction=None, user_rule=s.user_route, min_lsn=s.min_lsn, rest=rest, unfinished=unfinished)
        except NoNode as e:
            self._unroutable(Failure(e))
            return
        self.routed(decision, open_batch)

    def _place_unclustered(self, router) -> None:
        """Work not placed statement by statement: a login, session pooling, a pinned session."""
        s = self.session
        try:
            if not s.logged_in and s.transaction_mode and router.clustered and router.primary() is None:
                decision = router.login_decision()
            else:
                decision = self._primary_decision()  # everything goes to the primary
        except NoNode as e:
            self._unroutable(Failure(e))
            return
        self.routed(decision)

    def _primary_decision(self) -> Decision:
        node = self.session.router.primary()
        if node is None:
            raise NoNode("no primary")
        decision = self._primary
        if decision is None or decision.node is not node:
            decision = _PRIMARY_DECISIONS.get(id(node))
            if decision is None or decision.node is not node:
                if len(_PRIMARY_DECISIONS) >= _PRIMARY_DECISIONS_LIMIT:
                    _PRIMARY_DECISIONS.clear()
                decision = _PRIMARY_DECISIONS[id(node)] = Decision(node, "primary", "session needs the primary", _NOTHING_CLASSIFIED)
            self._primary = decision
        return decision

    def routed(self, decision: Decision, open_batch: bool = False) -> None:
        s = self.session
        if s is None or s.state is CLOSED:
            return
        if open_batch and not decision.on_primary:
            # An extended-protocol batch whose Sync has not come, placed on a replica: the rest
            # of it runs in the same implicit transaction and may write. Place it whole, once
            # its end (or a Flush) is here; the client is read meanwhile (see batch.OPEN_LIMIT).
            self._deadline = None
            s.defer_work()
            return
        s.decision = decision
        s.counters.routed(decision.reason)
        pool = self._pool
        if pool is None or pool.node is not decision.node or pool.retired:
            # (Most transactions go where the last one went: skip the lookup then.)
            pool = self._pool = self.proxy.pool_for(s.database, s.user, decision.node)
        server = pool.take_idle()
        if server is not None:
            s.link_server(server)
            return
        # Waiting in the pool's queue: it calls server_ready / server_unavailable, or hands a
        # connection over in place (ClientSession.take_over), no Deferred. The client is not
        # paused here (two epoll calls per wait): whatever it sends meanwhile is kept in the
        # backlog and pauses it then (ClientSession._client_data).
        self._waiting = pool
        pool.wait_for(s)

    def decide_kept(self, items: list):
        """In a cluster, a client keeping its server connection between transactions sent *items*:
        place its next transaction anew, exactly as if it held no connection (one decision of
        the same policy). A Decision (None: no node now), or UNPLACED (nothing to place by: it
        stays where it is), or AWAIT_END (the start of an extended batch that would go to a
        replica: the rest of it, one implicit transaction, may write; placed once its end is
        here). (Only the built-in policy, which answers at once, gets here: _maybe_release.)"""
        s = self.session
        sql, rest, end = batch.first_batch(items, s.relay.statements)
        if sql is None:
            # A Sync, a Terminate, or a statement whose text is not known (the unnamed one,
            # parsed on this very connection).
            return UNPLACED
        unfinished = end == batch.FLUSHED or (end == batch.OPEN and len(items) >= batch.OPEN_LIMIT)
        try:
            decision = s.router.decide(sql, in_transaction=None, user_rule=s.user_route, min_lsn=s.min_lsn, rest=rest, unfinished=unfinished)
        except NoNode:
            return None
        if end == batch.OPEN and not unfinished and not decision.on_primary:
            return AWAIT_END
        return decision

    def forget(self) -> None:
        """The session's router changed (a reload): the pool and primary decision kept were the old router's."""
        self._pool = None
        self._primary = None

    def settled(self) -> None:
        """The work has its server connection: a later failure starts a new failover_wait.
        (Also when the pool handed it over in place, with no server_ready: ClientSession.take_over.)"""
        self._deadline = None
        self._waiting = None

    def cancel(self) -> None:
        """The client left while waiting in a pool's queue."""
        pool, self._waiting = self._waiting, None
        if pool is not None:
            pool.cancel_wait(self.session)

    def closed(self) -> None:
        """The client's connection is gone (ClientSession.connection_lost, its last step, after
        give_up): the session is let go. The two hold each other; with that link cut, a closed
        session's objects are freed the moment the last reference goes, not left for the cyclic
        collector (which would keep them, and walk them, until its next pass: a short-lived
        client's every logout, and under churn most of the garbage made). What may still call
        in later (a routing hook's answer) finds no session and does nothing."""
        self.session = None

    def give_up(self) -> None:
        """The waiting work was cancelled (ClientSession.cancel_waiting): out of the pool's queue,
        and no retry after failover_wait's pause (the client's next statement may be placed
        before it was due: two chains of retries would queue the session twice)."""
        self.cancel()
        self._deadline = None
        retrying, self._retrying = self._retrying, None
        if retrying is not None and retrying.active():
            retrying.cancel()

    # -- the pool's answers, and retrying ------------------------------------------------------

    def server_ready(self, server) -> None:
        """The pool hands the waiting session a server connection."""
        self._waiting = None
        self.session.link_server(server)

    def server_unavailable(self, failure) -> None:
        """The pool could not serve the waiting session (wait timeout, the node refused, ...)."""
        self._waiting = None
        s = self.session
        if s is None or s.state is CLOSED:
            return
        e = failure.value
        if isinstance(e, PoolError):
            self._deadline = None
            self.retry_or_fail(e.fields)
        elif isinstance(e, ServerLoginError):
            if s.decision is not None:
                s.router.server_ended(s.decision.node, e.fields, "login failed")
            if e.fields.get("C") not in _NODE_AWAY:
                self._deadline = None  # a refusal, not an outage: say so now
            self.retry_or_fail(e.fields)
        else:
            log.failure("client {client}: no server", failure, client=s.id)
            s.fatal(sqlstate.CONNECTION_FAILURE, f"could not get a server connection: {e}")

    def _unroutable(self, failure) -> None:
        failure.trap(NoNode)
        if self.session is None:
            return  # (a routing hook's answer after the client left)
        self.retry_or_fail(
            m.error_fields("ERROR", sqlstate.CONNECTION_FAILURE, f'no node can serve database "{self.session.database.name}" now: {failure.value}')
        )

    def retry_or_fail(self, fields: dict) -> None:
        """No server this time: try again (another node, or the same once it is back) until failover_wait runs out."""
        s = self.session
        if s is None or s.state is CLOSED:
            return
        now = self.proxy.clock.seconds()
        retriable = s.router.clustered or (s.logged_in and s.transaction_mode)
        if retriable and self._deadline is not None and now < self._deadline:
            s.pause_reading()  # (waiting for a node: what the client sends meanwhile stays in its socket)
            self._retrying = self.proxy.clock.callLater(_RETRY_DELAY, self._retry)
            return
        self._deadline = None
        if not s.logged_in or not s.transaction_mode:
            s.fatal_fields(dict(fields, S="FATAL", V="FATAL"))
            return
        s.fail_waiting_work(fields)  # a logged-in client keeps its session: its work fails like a statement would

    def _retry(self) -> None:
        self._retrying = None
        if self.session is not None and self.session.state is WAITING:
            self.place()

    # -- losing a server connection -------------------------------------------------------------

    def keeps_session(self, said: dict | None, lent: bool) -> bool:
        """Transaction pooling, not pinned: the session survives its server connection's loss.
        *said*: the node's FATAL, if any; *lent*: the session merely kept it between transactions."""
        if said is not None and said.get("C") == sqlstate.PROTOCOL_VIOLATION:
            return False  # the node could not follow what this client sent: neither can we
        if self.proxy.config.on_server_loss == "close_client":
            # PgBouncer's way: a client whose server connection dies goes with it. (A client
            # merely keeping the connection between transactions does not hold it, as there.)
            relay = self.session.relay
            return lent and relay.idle and relay.tx_status == p.TX_IDLE
        return True

    def replayable(self, server, lease, said: dict | None, timed_out: str | None) -> bool:
        """The lost lending's work is an autocommit read that got no byte back yet: it may run again elsewhere."""
        return (
            timed_out is None  # (what ran too long would run too long elsewhere, and may have written)
            and not evidence.deliberate(said)  # (a backend the node ended on purpose stays ended)
            and not lease.replied
            and not server.replied
            and self.session.relay.tx_status == p.TX_IDLE
            and self._only_reads(lease.sent)
        )

    def _only_reads(self, items: list) -> bool:
        """True when every statement in *items* only reads, outside any transaction: safe to run twice."""
        s = self.session
        seen = False
        for sql in standin.statement_texts(items, s.relay.statements):
            c = s.router.classify(sql)
            if not c.read_only or c.tx is not None:
                return False
            seen = True
        return seen

    @staticmethod
    def lost_fields(server, said: dict | None, in_transaction: bool) -> dict:
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
