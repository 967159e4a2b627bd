"""ClusterMonitor against a real primary + 2 replicas: roles, lag, a replica crash, failover and fencing.

The tests share one private cluster and run in order (the last one promotes a replica).
Blocking LocalCluster calls run in a thread so the monitor keeps probing meanwhile.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater

from pgtwist.auth import Credential
from pgtwist.backend.login import ServerLogin
from pgtwist.cluster.health import ClusterMonitor
from pgtwist.routing.policy import choose
from pgtwist.tools.localcluster import LocalCluster

pytestmark = pytest.mark.integration

INTERVAL = 0.3
TIMEOUT = 1.0
BACKOFF_MAX = 1.0


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster.create(replicas=2) as c:
        yield c


class Watch:
    """A running monitor over *cluster* plus the on_change events it reported."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.events: list[tuple[str, str]] = []
        credential = Credential.parse(cluster.superuser, cluster.superuser_password)
        self.monitor = ClusterMonitor(
            reactor,
            cluster.nodes,
            lambda node: ServerLogin(cluster.superuser, "postgres", credential, node_name=str(node)),
            interval=INTERVAL,
            timeout=TIMEOUT,
            backoff_max=BACKOFF_MAX,
            on_change=lambda state, what: self.events.append((state.name, what)),
        )

    def state(self, node):
        return self.monitor.states[str(node)]

    @defer.inlineCallbacks
    def until(self, predicate, timeout: float, what: str):
        """Wait (bounded) until predicate() holds; return how long it took."""
        start = reactor.seconds()
        while not predicate():
            if reactor.seconds() - start > timeout:
                states = "\n".join(repr(s) for s in self.monitor.states.values())
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; states:\n{states}")
            yield deferLater(reactor, 0.05, lambda: None)
        return reactor.seconds() - start

    def blocking(self, fn, *args, **kw) -> defer.Deferred:
        return threads.deferToThread(fn, *args, **kw)


@defer.inlineCallbacks
def with_monitor(cluster, body):
    """Run body(watch) with a started monitor whose nodes are all up; always stop it."""
    w = Watch(cluster)
    w.monitor.start()
    try:
        yield w.until(lambda: all(s.up for s in w.monitor.states.values()), 20, "every node up")
        yield body(w)
    finally:
        yield w.monitor.stop()


@pytest_twisted.inlineCallbacks
def test_roles_detected(cluster):
    primary, r1, r2 = cluster.nodes

    @defer.inlineCallbacks
    def body(w):
        states = yield w.monitor.probe_now()
        assert states is w.monitor.states
        assert w.state(primary).role == "primary"
        assert w.state(r1).role == "replica" and w.state(r2).role == "replica"
        assert w.state(primary).timeline == 1
        assert w.state(r1).timeline == 1 and w.state(r2).timeline == 1  # the superuser sees received_tli
        assert w.state(primary).lsn > 0 and w.state(r1).lsn > 0
        assert not any(s.fenced for s in w.monitor.states.values())
        assert sorted(what for _, what in w.events) == ["up", "up", "up"]
        node, why = choose(list(w.monitor.states.values()), want="replica", max_lag_bytes=None, max_lag_seconds=None)
        assert node.name in (str(r1), str(r2)) and why == "replica"
        assert w.monitor.most_caught_up_replica().name in (str(r1), str(r2))

    yield with_monitor(cluster, body)


@pytest_twisted.inlineCallbacks
def test_lag_reported_after_writes(cluster):
    primary, r1, r2 = cluster.nodes

    @defer.inlineCallbacks
    def body(w):
        yield w.blocking(cluster.psql, primary, "CREATE TABLE IF NOT EXISTS lagtest (a int)")
        yield w.blocking(cluster.wait_replicas_caught_up, 30)
        # Hold replay on replica1 so the lag is certain, then write.
        yield w.blocking(cluster.psql, r1, "SELECT pg_wal_replay_pause()")
        try:
            yield w.blocking(cluster.psql, primary, "INSERT INTO lagtest SELECT generate_series(1, 20000)")
            yield w.until(
                lambda: (w.state(r1).lag_bytes or 0) > 0 and (w.state(r1).lag_seconds or 0) > 0,
                10,
                "replica1 to report lag in bytes and seconds",
            )
            assert w.state(r1).receive_lsn > w.state(r1).lsn  # received, not replayed
        finally:
            yield w.blocking(cluster.psql, r1, "SELECT pg_wal_replay_resume()")
        yield w.blocking(cluster.wait_replicas_caught_up, 30)
        yield w.until(
            lambda: all(w.state(n).lag_bytes == 0 and w.state(n).lag_seconds == 0.0 for n in (r1, r2)),
            10,
            "replicas caught up to report no lag",
        )
        node, _ = choose(list(w.monitor.states.values()), want="replica", max_lag_bytes=0, max_lag_seconds=0.0)
        assert node.role == "replica"

    yield with_monitor(cluster, body)


@pytest_twisted.inlineCallbacks
def test_replica_crash_down_then_back(cluster):
    primary, r1, r2 = cluster.nodes

    @defer.inlineCallbacks
    def body(w):
        w.events.clear()
        yield w.blocking(cluster.stop, r2, "immediate")
        took = yield w.until(lambda: not w.state(r2).up, 2 * INTERVAL + TIMEOUT + 0.5, "replica2 down")
        assert took <= 2 * INTERVAL + TIMEOUT + 0.5
        assert w.events == [(str(r2), "down")]
        assert w.state(r2).last_error
        assert w.state(primary).up and w.state(r1).up
        node, why = choose(list(w.monitor.states.values()), want="replica", max_lag_bytes=None, max_lag_seconds=None)
        assert node.name == str(r1)
        yield w.blocking(cluster.start, r2)
        yield w.until(lambda: w.state(r2).up, BACKOFF_MAX + TIMEOUT + 5, "replica2 back up")
        assert w.state(r2).role == "replica"
        assert w.events == [(str(r2), "down"), (str(r2), "up")]

    yield with_monitor(cluster, body)


@pytest_twisted.inlineCallbacks
def test_mark_down_then_recovers(cluster):
    primary, r1, r2 = cluster.nodes

    @defer.inlineCallbacks
    def body(w):
        w.events.clear()
        w.monitor.mark_down(str(r1), "connection reset by peer")
        assert not w.state(r1).up
        yield w.until(lambda: w.state(r1).up, 5, "replica1 back after a false alarm")
        assert w.events == [(str(r1), "down"), (str(r1), "up")]

    yield with_monitor(cluster, body)


@pytest_twisted.inlineCallbacks
def test_failover_then_old_primary_fenced(cluster):
    primary, r1, r2 = cluster.nodes

    @defer.inlineCallbacks
    def body(w):
        w.events.clear()
        yield w.blocking(cluster.stop, primary, "immediate")
        yield w.until(lambda: not w.state(primary).up, 2 * INTERVAL + TIMEOUT + 0.5, "primary down")
        assert (str(primary), "down") in w.events
        node, why = choose(list(w.monitor.states.values()), want="primary", max_lag_bytes=None, max_lag_seconds=None)
        assert node is None and why == "no primary"
        # Reads still go to the replicas (their lag is unknown without a primary, not held against them).
        node, _ = choose(list(w.monitor.states.values()), want="replica", max_lag_bytes=1, max_lag_seconds=1.0)
        assert node is not None and node.role == "replica"

        best = w.monitor.most_caught_up_replica()
        assert best is not None
        target = next(n for n in (r1, r2) if str(n) == best.name)
        state = yield w.monitor.promote(str(target))
        assert state.role == "primary" and state.up
        assert state.timeline == 2
        assert (str(target), "promoted") in w.events
        node, _ = choose(list(w.monitor.states.values()), want="primary", max_lag_bytes=None, max_lag_seconds=None)
        assert node.name == str(target)

        # The old primary restarts on its old timeline, still believing it is the primary: fenced.
        yield w.blocking(cluster.start, primary)
        yield w.until(lambda: w.state(primary).up and w.state(primary).fenced, 10, "old primary up and fenced")
        assert w.state(primary).role == "primary" and w.state(primary).timeline == 1
        assert (str(primary), "fenced") in w.events
        assert not w.state(target).fenced
        node, _ = choose(list(w.monitor.states.values()), want="primary", max_lag_bytes=None, max_lag_seconds=None)
        assert node.name == str(target)
        # Several rounds later it stays fenced.
        yield deferLater(reactor, 3 * INTERVAL, lambda: None)
        assert w.state(primary).fenced and not w.state(target).fenced

    yield with_monitor(cluster, body)
