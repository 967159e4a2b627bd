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


@pytest_twisted.async_yield_fixture
async def watch(cluster):
    """A started monitor over *cluster* whose nodes are all up; stopped after the test."""
    w = Watch(cluster)
    w.monitor.start()
    try:
        await w.until(lambda: all(s.up for s in w.monitor.states.values()), 20, "every node up")
        yield w
    finally:
        await w.monitor.stop()


@pytest_twisted.inlineCallbacks
def test_roles_detected(cluster, watch):
    primary, r1, r2 = cluster.nodes

    states = yield watch.monitor.probe_now()
    assert states is watch.monitor.states
    assert watch.state(primary).role == "primary"
    assert watch.state(r1).role == "replica" and watch.state(r2).role == "replica"
    assert watch.state(primary).timeline == 1
    assert watch.state(r1).timeline == 1 and watch.state(r2).timeline == 1  # the superuser sees received_tli
    assert watch.state(primary).lsn > 0 and watch.state(r1).lsn > 0
    assert not any(s.fenced for s in watch.monitor.states.values())
    assert sorted(what for _, what in watch.events) == ["up", "up", "up"]
    node, why = choose(list(watch.monitor.states.values()), want="replica", max_lag_bytes=None, max_lag_seconds=None)
    assert node.name in (str(r1), str(r2)) and why == "replica"
    assert watch.monitor.most_caught_up_replica().name in (str(r1), str(r2))


@pytest_twisted.inlineCallbacks
def test_lag_reported_after_writes(cluster, watch):
    primary, r1, r2 = cluster.nodes

    yield watch.blocking(cluster.psql, primary, "CREATE TABLE IF NOT EXISTS lagtest (a int)")
    yield watch.blocking(cluster.wait_replicas_caught_up, 30)
    # Hold replay on replica1 so the lag is certain, then write.
    yield watch.blocking(cluster.psql, r1, "SELECT pg_wal_replay_pause()")
    try:
        yield watch.blocking(cluster.psql, primary, "INSERT INTO lagtest SELECT generate_series(1, 20000)")
        yield watch.until(
            lambda: (watch.state(r1).lag_bytes or 0) > 0 and (watch.state(r1).lag_seconds or 0) > 0,
            10,
            "replica1 to report lag in bytes and seconds",
        )
        assert watch.state(r1).receive_lsn > watch.state(r1).lsn  # received, not replayed
    finally:
        yield watch.blocking(cluster.psql, r1, "SELECT pg_wal_replay_resume()")
    yield watch.blocking(cluster.wait_replicas_caught_up, 30)
    yield watch.until(
        lambda: all(watch.state(n).lag_bytes == 0 and watch.state(n).lag_seconds == 0.0 for n in (r1, r2)),
        10,
        "replicas caught up to report no lag",
    )
    node, _ = choose(list(watch.monitor.states.values()), want="replica", max_lag_bytes=0, max_lag_seconds=0.0)
    assert node.role == "replica"


@pytest_twisted.inlineCallbacks
def test_replica_crash_down_then_back(cluster, watch):
    primary, r1, r2 = cluster.nodes

    watch.events.clear()
    yield watch.blocking(cluster.stop, r2, "immediate")
    took = yield watch.until(lambda: not watch.state(r2).up, 2 * INTERVAL + TIMEOUT + 0.5, "replica2 down")
    assert took <= 2 * INTERVAL + TIMEOUT + 0.5
    assert watch.events == [(str(r2), "down")]
    assert watch.state(r2).last_error
    assert watch.state(primary).up and watch.state(r1).up
    node, why = choose(list(watch.monitor.states.values()), want="replica", max_lag_bytes=None, max_lag_seconds=None)
    assert node.name == str(r1)
    yield watch.blocking(cluster.start, r2)
    yield watch.until(lambda: watch.state(r2).up, BACKOFF_MAX + TIMEOUT + 5, "replica2 back up")
    assert watch.state(r2).role == "replica"
    assert watch.events == [(str(r2), "down"), (str(r2), "up")]


@pytest_twisted.inlineCallbacks
def test_mark_down_then_recovers(cluster, watch):
    primary, r1, r2 = cluster.nodes

    watch.events.clear()
    watch.monitor.mark_down(str(r1), "connection reset by peer")
    assert not watch.state(r1).up
    yield watch.until(lambda: watch.state(r1).up, 5, "replica1 back after a false alarm")
    assert watch.events == [(str(r1), "down"), (str(r1), "up")]


@pytest_twisted.inlineCallbacks
def test_failover_then_old_primary_fenced(cluster, watch):
    primary, r1, r2 = cluster.nodes

    watch.events.clear()
    yield watch.blocking(cluster.stop, primary, "immediate")
    yield watch.until(lambda: not watch.state(primary).up, 2 * INTERVAL + TIMEOUT + 0.5, "primary down")
    assert (str(primary), "down") in watch.events
    node, why = choose(list(watch.monitor.states.values()), want="primary", max_lag_bytes=None, max_lag_seconds=None)
    assert node is None and why == "no primary"
    # Reads still go to the replicas (their lag is unknown without a primary, not held against them).
    node, _ = choose(list(watch.monitor.states.values()), want="replica", max_lag_bytes=1, max_lag_seconds=1.0)
    assert node is not None and node.role == "replica"

    best = watch.monitor.most_caught_up_replica()
    assert best is not None
    target = next(n for n in (r1, r2) if str(n) == best.name)
    state = yield watch.monitor.promote(str(target))
    assert state.role == "primary" and state.up
    assert state.timeline == 2
    assert (str(target), "promoted") in watch.events
    node, _ = choose(list(watch.monitor.states.values()), want="primary", max_lag_bytes=None, max_lag_seconds=None)
    assert node.name == str(target)

    # The old primary restarts on its old timeline, still believing it is the primary: fenced.
    yield watch.blocking(cluster.start, primary)
    yield watch.until(lambda: watch.state(primary).up and watch.state(primary).fenced, 10, "old primary up and fenced")
    assert watch.state(primary).role == "primary" and watch.state(primary).timeline == 1
    assert (str(primary), "fenced") in watch.events
    assert not watch.state(target).fenced
    node, _ = choose(list(watch.monitor.states.values()), want="primary", max_lag_bytes=None, max_lag_seconds=None)
    assert node.name == str(target)
    # Several rounds later it stays fenced.
    yield deferLater(reactor, 3 * INTERVAL, lambda: None)
    assert watch.state(primary).fenced and not watch.state(target).fenced
