"""auto_promote: the primary stays away for failover_timeout, then the most advanced replica is promoted."""

from twisted.internet import defer

from pgtwist.routing.policy import NodeState, parse_lsn
from pgtwist.routing.router import DatabaseRouter

from tests.harness.admin_support import TestProxy, make_config

NODES = ["db1:5432", "db2:5432", "db3:5432"]


class Monitor:
    """What the proxy uses of a ClusterMonitor: states, probe_now, most_caught_up_replica, promote."""

    def __init__(self, reactor):
        from pgtwist.cluster.health import ClusterMonitor

        self.reactor = reactor
        self.running = True
        self.states = {
            NODES[0]: NodeState(NODES[0], role="primary", up=False, timeline=1),
            NODES[1]: NodeState(NODES[1], role="replica", up=True, timeline=1, lsn=parse_lsn("0/500"), receive_lsn=parse_lsn("0/900")),
            NODES[2]: NodeState(NODES[2], role="replica", up=True, timeline=1, lsn=parse_lsn("0/800"), receive_lsn=parse_lsn("0/800")),
        }
        self.probing: defer.Deferred | None = None
        self.promoted: list[str] = []
        self._pick = ClusterMonitor.most_caught_up_replica

    def probe_now(self, name=None):
        self.probing = defer.Deferred()
        return self.probing

    def most_caught_up_replica(self):
        return self._pick(self)

    def promote(self, name, wait_seconds=60):
        self.promoted.append(name)
        return defer.succeed(None)


def setup(**overrides):
    config = make_config(
        databases={"appdb": {"dbname": "postgres", "nodes": NODES}}, auto_promote=True, failover_timeout=5.0, **overrides
    )
    proxy = TestProxy(config)
    monitor = Monitor(proxy.reactor)
    database = config.databases["appdb"]
    proxy.routers["appdb"] = DatabaseRouter(database, config, monitor)
    return proxy, monitor, database


def test_promotes_the_replica_that_received_most_as_seen_by_a_fresh_probe():
    proxy, monitor, database = setup()
    proxy._node_changed(database, monitor.states[NODES[0]], "down")
    proxy.reactor.advance(4.9)
    assert monitor.probing is None
    proxy.reactor.advance(0.1)
    assert monitor.probing is not None and monitor.promoted == []  # positions are read again first
    # Meanwhile db3 received more than db2 (db2 still leads on what it had at the last probe).
    monitor.states[NODES[2]].receive_lsn = parse_lsn("0/A00")
    monitor.probing.callback(monitor.states)
    assert monitor.promoted == [NODES[2]]


def test_newest_timeline_beats_more_wal_on_an_older_one():
    proxy, monitor, database = setup()
    monitor.states[NODES[2]].timeline = 2
    monitor.states[NODES[2]].receive_lsn = parse_lsn("0/100")
    proxy._node_changed(database, monitor.states[NODES[0]], "down")
    proxy.reactor.advance(5.0)
    monitor.probing.callback(monitor.states)
    assert monitor.promoted == [NODES[2]]


def test_a_primary_back_during_the_probe_cancels_the_promotion():
    proxy, monitor, database = setup()
    proxy._node_changed(database, monitor.states[NODES[0]], "down")
    proxy.reactor.advance(5.0)
    monitor.states[NODES[0]].up = True
    monitor.probing.callback(monitor.states)
    assert monitor.promoted == []


def test_a_failing_probe_still_promotes_on_what_is_known():
    proxy, monitor, database = setup()
    proxy._node_changed(database, monitor.states[NODES[0]], "down")
    proxy.reactor.advance(5.0)
    monitor.probing.errback(RuntimeError("probe failed"))
    assert monitor.promoted == [NODES[1]]


def test_under_workers_only_worker_0_promotes():
    # Each worker probes with its own monitor; a probe that failed in one of them only would have
    # it choose another replica than the rest, and two primaries would serve writes.
    from pgtwist.service.workers import WorkerLink, WorkerSpec

    for index, promotes in ((0, True), (1, False), (2, False)):
        proxy, monitor, database = setup()
        proxy.worker = WorkerLink(WorkerSpec(index, 3, 3, "/nonexistent"), proxy.reactor)
        proxy._node_changed(database, monitor.states[NODES[0]], "down")
        proxy.reactor.advance(5.0)
        if monitor.probing is not None:
            monitor.probing.callback(monitor.states)
        assert monitor.promoted == ([NODES[1]] if promotes else [])


def test_a_start_while_the_primary_is_away_promotes_too():
    # A restarted pgtwist (or worker 0) never saw the primary up, so hears no "down" of it: a
    # replica coming up with no primary known starts the wait as well.
    proxy, monitor, database = setup()
    proxy._node_changed(database, monitor.states[NODES[1]], "up")
    proxy.reactor.advance(5.0)
    monitor.probing.callback(monitor.states)
    assert monitor.promoted == [NODES[1]]


def test_a_replica_up_beside_a_primary_starts_no_wait():
    proxy, monitor, database = setup()
    monitor.states[NODES[0]].up = True
    proxy._node_changed(database, monitor.states[NODES[1]], "up")
    proxy.reactor.advance(60.0)
    assert monitor.probing is None and monitor.promoted == []


def test_a_wait_started_before_the_primary_answered_is_called_off_when_it_does():
    # At start a replica often answers before the primary: that "up" starts the wait, and an
    # outage 4.5 s later must wait its own failover_timeout, not the 0.5 s left of that one.
    proxy, monitor, database = setup()
    proxy._node_changed(database, monitor.states[NODES[1]], "up")
    proxy.reactor.advance(1.0)
    monitor.states[NODES[0]].up = True
    proxy._node_changed(database, monitor.states[NODES[0]], "up")
    proxy.reactor.advance(3.5)
    monitor.states[NODES[0]].up = False
    proxy._node_changed(database, monitor.states[NODES[0]], "down")
    proxy.reactor.advance(4.9)
    assert monitor.probing is None  # (the old wait would have fired by now)
    proxy.reactor.advance(0.1)
    monitor.probing.callback(monitor.states)
    assert monitor.promoted == [NODES[1]]


def test_a_database_dropped_on_the_primary_promotes_nothing():
    # The node serves its other databases; its probe's login for this one answers 3D000.
    proxy, monitor, database = setup()
    monitor.states[NODES[0]].database_missing = True
    proxy._node_changed(database, monitor.states[NODES[0]], "down")
    proxy.reactor.advance(60.0)
    assert monitor.probing is None and monitor.promoted == []
    # Nor when the wait had begun already (a replica's "up" at start).
    proxy._node_changed(database, monitor.states[NODES[1]], "up")
    proxy.reactor.advance(5.0)
    monitor.probing.callback(monitor.states)
    assert monitor.promoted == []


def test_a_reload_that_turns_auto_promote_off_stops_a_wait_under_way():
    proxy, monitor, database = setup()
    proxy._node_changed(database, monitor.states[NODES[0]], "down")
    proxy.reactor.advance(1.0)
    proxy.config = make_config(databases={"appdb": {"dbname": "postgres", "nodes": NODES}}, auto_promote=False)
    proxy.reactor.advance(4.0)
    assert monitor.probing is None and monitor.promoted == []
