"""Where one database's next transaction goes: classification, rules, hook and cluster state, joined."""

from __future__ import annotations

import importlib
import inspect as pyinspect
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from pgtwist.routing.classify import Classification, classify
from pgtwist.routing.policy import NodeState, choose, route

log = Logger()

_PRIMARY_ONLY = Classification(read_only=False, reason="no statement to classify")


@dataclass(frozen=True)
class Decision:
    node: object  # config Address
    want: str  # "primary" | "replica"
    reason: str
    classification: Classification

    @property
    def read_only(self) -> bool:
        return self.want == "replica" or self.classification.read_only


class NoNode(Exception):
    """No node can take this work now (e.g. no primary during a failover)."""


def load_hook(spec: str):
    """'package.module:function' -> the callable (reloaded, so SIGHUP picks up a new version)."""
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
        # Login ParameterStatus sets by startup settings (transaction pooling: no server needed).
        self.login_parameters: dict[tuple, dict[str, str]] = {}

    @property
    def clustered(self) -> bool:
        return self.monitor is not None

    def states(self) -> list[NodeState]:
        if self.monitor is None:
            node = self.database.nodes[0]
            return [NodeState(name=str(node), role="primary", up=True)]
        return list(self.monitor.states.values())

    def classify(self, sql: str | None) -> Classification:
        if sql is None:
            return _PRIMARY_ONLY
        return classify(sql, self.config.read_only_functions)

    def decide(self, sql: str | None, *, in_transaction: str | None, user_rule: str | None, min_lsn: int = 0) -> Decision:
        """Pick a node for work starting with *sql*; raises NoNode when none can take it now."""
        classification = self.classify(sql)
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
            min_lsn=min_lsn if self.config.read_your_writes else 0,
            max_lag_bytes=self.config.max_replica_lag or None,
            max_lag_seconds=self.config.max_replica_delay or None,
            rr=self._rr,
        )
        if node is None:
            raise NoNode(why)
        return Decision(self.by_name[node.name], want, f"{reason}; {why}" if why else reason, classification)

    def decide_with_hook(self, sql, *, in_transaction, user_rule, min_lsn, identity: dict) -> defer.Deferred:
        """Like decide(), asking the configured hook first; a failing hook falls back to the built-in policy."""
        if self.hook is None or self.monitor is None:
            return defer.maybeDeferred(self.decide, sql, in_transaction=in_transaction, user_rule=user_rule, min_lsn=min_lsn)
        classification = self.classify(sql)

        def call():
            result = self.hook(classification, identity)
            if pyinspect.isawaitable(result):
                return defer.ensureDeferred(result)
            return result

        def placed(answer):
            if answer in (None, "auto"):
                return self.decide(sql, in_transaction=in_transaction, user_rule=user_rule, min_lsn=min_lsn)
            if answer in ("primary", "replica"):
                return self._place(answer, f"hook: {answer}", classification, min_lsn)
            node = self.by_name.get(str(answer))
            if node is None:
                raise ValueError(f"routing hook returned unknown node {answer!r}")
            return Decision(node, "node", "hook: node", classification)

        def failed(failure):
            if failure.check(NoNode):
                return failure
            log.failure("routing hook failed; using the built-in policy", failure)
            return self.decide(sql, in_transaction=in_transaction, user_rule=user_rule, min_lsn=min_lsn)

        d = defer.maybeDeferred(call)
        d.addCallback(placed)
        d.addErrback(failed)
        return d

    def primary(self):
        """The node writes go to now, or None."""
        if self.monitor is None:
            return self.database.nodes[0]
        for state in self.states():
            if state.role == "primary" and state.up and not state.fenced:
                return self.by_name[state.name]
        return None

    def node_failed(self, node, reason: str) -> None:
        if self.monitor is not None:
            self.monitor.mark_down(str(node), reason)
