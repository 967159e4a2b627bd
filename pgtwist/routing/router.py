"""Where one database's next transaction goes: classification, rules, hook and cluster state, joined."""

from __future__ import annotations

import importlib
import inspect as pyinspect
from dataclasses import dataclass, replace

from twisted.internet import defer
from twisted.logger import Logger

from pgtwist.cluster import evidence
from pgtwist.routing.analysis import Classification, classify
from pgtwist.routing.policy import PRIMARY, REPLICA, UNREPLAYED, NodeState, choose, read_exclusions, route

log = Logger()

_PRIMARY_ONLY = Classification(read_only=False, reason="no statement to classify")
_LOGIN = Classification(read_only=True, reason="login")


@dataclass(frozen=True)
class Decision:
    node: object  # config Address
    want: str  # "primary" | "replica"
    reason: str
    classification: Classification
    # The node was the primary when chosen (a read may land there too: no replica caught up,
    # replicas lagging, a hook naming it). Writes can only have happened where this is True.
    on_primary: bool = True

    @property
    def read_only(self) -> bool:
        return self.want == "replica" or self.classification.read_only


class NoNode(Exception):
    """No node can take this work now (e.g. no primary during a failover)."""


def load_hook(spec: str):
    """'package.module:function' -> the callable (reloaded, so SIGHUP picks up a new version).
    The service calls it once per configuration load or reload, and gives every router the result."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    module = importlib.reload(module)
    return getattr(module, attr)


class DatabaseRouter:
    """Routing for one [databases.NAME]: pure policy over the monitor's view of the nodes.

    A database with one node needs no monitor: everything goes there. With more, the
    ClusterMonitor keeps roles, health and lag current; reads go to replicas, writes and
    anything uncertain to the primary.
    """

    def __init__(self, database, config, monitor=None, hook=None):
        self.database = database
        self.config = config
        self.monitor = monitor
        self.hook = hook
        self._rr = 0
        self.by_name = {str(node): node for node in database.nodes}
        # Whether a health monitor places work node by node: an attribute, not a property, as
        # it is asked several times per transaction (the monitor is given once, here).
        self.clustered = monitor is not None
        # Set by a reload that put another router (or none) in this one's place: its sessions
        # then follow_reload at their next placement. (A flag read per placement, where looking
        # this router up in proxy.routers again was four attribute reads and a call.)
        self.replaced = False
        # The WAL position of the last DDL committed through pgtwist in this database: no session
        # reads from a replica that has not replayed it (ddl_committed); none at all while the
        # position of one is being read back (ddl_pending).
        self.schema_lsn = 0
        self.ddl_pending = 0
        # Promotions seen (new_primary), and where the last one's timeline began (the promoted
        # node's WAL position as primary): a read-back begun before it is bounded by that.
        self.promotions = 0
        self.switched_at = 0
        # Under workers = N (a workers.WorkerLink): the other workers' routers of this database
        # hold and bound their reads for this one's DDL too (notices.DdlWaits). told: the waits
        # they hold for this worker's DDL, token -> (session, lease) until a read-back or probes
        # claim it (then None), renewed each janitor tick until settled.
        self.elsewhere = None
        self.told: dict[int, object] = {}

    def states(self) -> list[NodeState]:
        if self.monitor is None:
            node = self.database.nodes[0]
            return [NodeState(name=str(node), role="primary", up=True)]
        return list(self.monitor.states.values())

    def read_exclusions(self) -> dict[str, str | None]:
        """Why each node gets no reads now (policy.EXCLUSIONS), None for those that may serve them."""
        return read_exclusions(
            self.states(), self.config.max_replica_lag or None, self.config.max_replica_delay or None
        )

    def classify(self, sql: str | None, rest: tuple[str, ...] = (), unfinished: bool = False) -> Classification:
        """*sql*'s classification; with *rest* (the statements after it in the same extended-protocol
        batch, one implicit transaction) a write among them makes the whole batch a write, and
        *unfinished* (it must be placed before its end: the client asked for results, or it grew
        too long to wait for) makes it one too: what comes next in it is not known and may write."""
        if sql is None:
            return _PRIMARY_ONLY
        c = self._classify(sql)
        if not c.read_only:
            return c
        for text in rest:
            other = self._classify(text)
            if not other.read_only:
                return replace(c, read_only=False, reason=f"batch with {other.reason}")
        if unfinished:
            return replace(c, read_only=False, reason="batch placed before its end")
        return c

    def _classify(self, sql: str) -> Classification:
        if self.monitor is None:
            return classify(sql, self.config.read_only_functions)
        # What the monitor last read from pg_proc (never fetched here: no waiting on a client's way).
        return classify(sql, self.config.read_only_functions, self.monitor.functions.is_volatile)

    def schema_changed(self) -> None:
        """DDL went through pgtwist and committed: the monitor reads function volatility again soon."""
        if self.monitor is not None:
            self.monitor.functions_changed()

    def ddl_sent(self, session, lease) -> int | None:
        """*session*'s DDL has committed and the answer is about to go to its client
        (ClientSession._answering): under workers = N the other workers hold their replica reads
        from now, before the application's next connection, on another worker, can read. Returns
        the wait's token (None: nobody to tell), which the read-back settles (ddl_reading_back),
        or probes (ddl_by_probe), or ddl_untold when neither comes."""
        elsewhere = self.elsewhere
        if elsewhere is None or not self.clustered or not self.config.read_your_writes:
            return None
        token = elsewhere.ddl_hold(self.database.name)
        self.told[token] = (session, lease)
        return token

    def ddl_untold(self, token: int) -> None:
        """The wait *token* ends with no position: its transaction ended with nothing read back."""
        if token in self.told:
            del self.told[token]
            self.elsewhere.ddl_settle(self.database.name, token, None)

    def renew_told(self) -> None:
        """Janitor: the other workers' holds for this worker's DDL go on until its read-back
        settles them. One its session never handed to a read-back ends: the client or its
        server connection gone, or the session between transactions (which hands it over in the
        turn its transaction ends: this is a backstop)."""
        name = self.database.name
        for token, owner in list(self.told.items()):
            if owner is not None:
                session, lease = owner
                if session.state in ("closed", "idle") or session.lease is not lease or lease.lent:
                    self.ddl_untold(token)
                    continue
            self.elsewhere.ddl_hold_again(name, token)

    def ddl_reading_back(self, shared: bool = True, token: int | None = None):
        """DDL went through pgtwist and committed; where its commit ends on the primary is being
        read back. Until then no session reads from a replica: its client has its answer, and
        the application's other connections may already act on it. Returns the one call that
        ends the wait, settle(position), which only its first call does (None: not known).

        *shared*: the other workers are told too, of the wait (*token*, the one ddl_sent told
        them of; else one now) and of the position with the settle (False for the wait another
        worker told this one of)."""
        self.ddl_pending += 1
        settled = False
        promotions = self.promotions
        elsewhere = self.elsewhere if shared else None
        name = self.database.name
        if elsewhere is not None:
            if self.told.get(token) is None:  # (none told of, or one another read-back claimed)
                token = elsewhere.ddl_hold(name)
            self.told[token] = None  # (its own now: renewed until settled, whatever its session does)

        def settle(position: int | None) -> None:
            nonlocal settled
            if not settled:
                settled = True
                self.ddl_pending -= 1
                if self.promotions != promotions and position is not None:
                    # Read (or told) from the old primary: at most where the new timeline began
                    # (new_primary), which the new primary's replicas reach.
                    position = min(position, self.switched_at)
                self.ddl_committed(position)
                if elsewhere is not None and self.told.pop(token, False) is not False:
                    elsewhere.ddl_settle(name, token, position)

        return settle

    def ddl_by_probe(self, token: int | None = None) -> None:
        """DDL committed on a connection no read-back runs on (a session pinned to it: a migration
        tool holding a session advisory lock): the primary's position from a probe that began
        after the commit bounds the replicas' reads instead. Until it comes, reads go to the
        primary. (A probe already under way may have begun before the commit: the next one
        did not.)"""
        monitor = self.monitor
        primary = self.primary()
        if monitor is None or primary is None or not self.config.read_your_writes:
            if token is not None:
                self.ddl_untold(token)
            return
        settle = self.ddl_reading_back(token=token)
        name = str(primary)
        d = monitor.probe_now(name)
        d.addBoth(lambda _: monitor.probe_now(name))
        d.addCallbacks(lambda state: settle(getattr(state, "lsn", 0) or None), lambda _: settle(None))

    def ddl_committed(self, position: int | None) -> None:
        """DDL committed at WAL *position* (None: not known): from now on no session reads from a
        replica that has not replayed that far. Read-your-writes covers the client that ran it;
        its other clients (the application's other connections, which go on once a migration
        has run) would meet the schema before it, "relation does not exist" for a table just
        created, until the replica caught up."""
        if position is not None and position > self.schema_lsn:
            self.schema_lsn = position

    def new_primary(self, position: int = 0) -> None:
        """A replica was promoted; its timeline begins at or before *position* (its WAL position
        as the new primary, 0 when not known). WAL positions go on counting across timelines, so
        a DDL position up to there is one the new primary's replicas replay to (a bound kept, or
        they would read from before the DDL); one beyond it was lost with the old primary (kept,
        it would hold every read on the primary until the new one wrote that far): at most
        *position*, now and for a read-back under way (ddl_reading_back)."""
        self.schema_lsn = min(self.schema_lsn, position)
        self.switched_at = position
        self.promotions += 1

    def decide(
        self,
        sql: str | None,
        *,
        in_transaction: str | None,
        user_rule: str | None,
        min_lsn: int = 0,
        rest: tuple[str, ...] = (),
        unfinished: bool = False,
    ) -> Decision:
        """Pick a node for work starting with *sql* (*rest* and *unfinished*: see classify);
        raises NoNode when none can take it now."""
        classification = self.classify(sql, rest, unfinished)
        if self.monitor is None:
            return Decision(self.database.nodes[0], "primary", "single node", classification)
        want, reason = route(
            classification, in_transaction=in_transaction, user_rule=user_rule, db_rule=self.database.route
        )
        return self._place(want, reason, classification, min_lsn)

    def _place(self, want: str, reason: str, classification: Classification, min_lsn: int) -> Decision:
        self._rr += 1
        node, why = choose(
            self.states(),
            want=want,
            min_lsn=(UNREPLAYED if self.ddl_pending else max(min_lsn, self.schema_lsn)) if self.config.read_your_writes else 0,
            max_lag_bytes=self.config.max_replica_lag or None,
            max_lag_seconds=self.config.max_replica_delay or None,
            rr=self._rr,
        )
        if node is None:
            raise NoNode(why)
        return Decision(
            self.by_name[node.name], want, f"{reason}; {why}" if why else reason, classification, node.role == PRIMARY
        )

    def decide_with_hook(
        self, sql, *, in_transaction, user_rule, min_lsn, identity: dict, rest: tuple[str, ...] = (), unfinished: bool = False
    ) -> defer.Deferred:
        """Like decide(), asking the configured hook first; a failing hook falls back to the built-in policy."""
        more = {"rest": rest, "unfinished": unfinished}
        if self.hook is None or self.monitor is None:
            return defer.maybeDeferred(self.decide, sql, in_transaction=in_transaction, user_rule=user_rule, min_lsn=min_lsn, **more)
        classification = self.classify(sql, rest, unfinished)

        def call():
            result = self.hook(classification, identity)
            if pyinspect.isawaitable(result):
                return defer.ensureDeferred(result)
            return result

        def placed(answer):
            if answer in (None, "auto"):
                return self.decide(sql, in_transaction=in_transaction, user_rule=user_rule, min_lsn=min_lsn, **more)
            if answer in ("primary", "replica"):
                return self._place(answer, f"hook: {answer}", classification, min_lsn)
            node = self.by_name.get(str(answer))
            if node is None:
                raise ValueError(f"routing hook returned unknown node {answer!r}")
            state = self.monitor.states.get(str(answer))
            # (A node whose role is not known yet counts as the primary: writes may happen there.)
            return Decision(node, "node", "hook: node", classification, state is None or state.role != REPLICA)

        def failed(failure):
            if failure.check(NoNode):
                return failure
            log.failure("routing hook failed; using the built-in policy", failure)
            return self.decide(sql, in_transaction=in_transaction, user_rule=user_rule, min_lsn=min_lsn, **more)

        d = defer.maybeDeferred(call)
        d.addCallback(placed)
        d.addErrback(failed)
        return d

    def login_decision(self) -> Decision:
        """Where a transaction-pooled login learns what to report while there is no primary (a
        failover under way): a replica that may serve reads, since such a client can still read.
        Raises NoNode when there is none either."""
        return self._place("replica", "login while there is no primary", _LOGIN, 0)

    def primary(self):
        """The node writes go to now, or None."""
        if self.monitor is None:
            return self.database.nodes[0]
        for state in self.states():
            if state.role == "primary" and state.up and not state.fenced:
                return self.by_name[state.name]
        return None

    def server_ended(self, node, fields: dict | None, what: str = "connection lost") -> None:
        """A server connection to *node* ended, the node having said *fields* (its FATAL or
        login refusal; None: not a word). Only evidence about the node changes its health."""
        if self.monitor is None:
            return
        verdict = evidence.connection_ended(fields)
        if verdict is evidence.NOT_THE_NODE:
            return
        said = f"{what}: {fields.get('C')} {fields.get('M', '')}" if fields is not None else what
        if verdict is evidence.DOWN:
            self.monitor.mark_down(str(node), said)
        else:
            self.monitor.verify(str(node), said)
