"""/metrics, /healthz and /readyz through the twisted.web resources (DummyRequest), on a MemoryReactorClock."""

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from pgtwist.admin import metrics
from pgtwist.service.lifecycle import PgBalanceService
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.admin_support import TestProxy, client, make_config


class Service:
    """What the resources use of PgBalanceService."""

    def __init__(self, proxy, accepting=True):
        self.proxy = proxy
        self.accepting = accepting


def get(root, path: bytes) -> DummyRequest:
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.path = path
    resource = getChildForRequest(root, request)
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    return request


def body(request) -> str:
    return b"".join(request.written).decode()


def test_metrics_exposition():
    proxy = TestProxy(make_config())
    app, _ = client(proxy)
    app.server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    proxy.clock.advance(0.02)
    app.server.got_data(m.command_complete("COMMIT") + m.ready_for_query(p.TX_IDLE))
    client(proxy, database="nope")  # an error by SQLSTATE
    root = metrics.make_root(Service(proxy), proxy.reactor)
    request = get(root, b"/metrics")
    assert request.responseCode in (None, 200)
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = body(request)
    for line in (
        'pgbalance_clients{database="appdb",state="linked",user="app"} 1.0',
        'pgbalance_servers{database="appdb",node="db1:5432",state="linked",user="app"} 1.0',
        'pgbalance_pool_size{database="appdb",node="db1:5432",user="app"} 2.0',
        'pgbalance_queries_total{node="db1:5432",role="primary"} 2.0',
        'pgbalance_transactions_total{node="db1:5432",role="primary"} 1.0',
        'pgbalance_transaction_duration_seconds_bucket{le="0.025",node="db1:5432",role="primary"} 1.0',
        'pgbalance_transaction_duration_seconds_count{node="db1:5432",role="primary"} 1.0',
        'pgbalance_errors_total{sqlstate="3D000"} 1.0',
        'pgbalance_clients_accepted_total 2.0',
        'pgbalance_node_up{database="appdb",node="db1:5432",role="primary"} 1.0',
        'pgbalance_routing_decisions_total{reason="',
        'pgbalance_failovers_total 0.0',
        'pgbalance_reloads_total{result="ok"} 0.0',
        "pgbalance_draining 0.0",
    ):
        assert line in text, line
    assert all(line.startswith(("#", "pgbalance_")) for line in text.splitlines() if line)


def test_each_service_has_its_own_registry():
    a = metrics.make_registry(Service(TestProxy(make_config())))
    b = metrics.make_registry(Service(TestProxy(make_config())))
    assert a is not b


def test_healthz():
    proxy = TestProxy(make_config())
    request = get(metrics.make_root(Service(proxy), proxy.reactor), b"/healthz")
    assert body(request) == "ok\n" and request.responseCode in (None, 200)


def test_readyz_not_accepting():
    proxy = TestProxy(make_config())
    request = get(metrics.make_root(Service(proxy, accepting=False), proxy.reactor), b"/readyz")
    assert request.responseCode == 503 and body(request).startswith("not ready")


def test_readyz_with_a_connected_primary_needs_no_probe():
    proxy = TestProxy(make_config())
    client(proxy)
    request = get(metrics.make_root(Service(proxy), proxy.reactor), b"/readyz")
    assert request.responseCode == 200 and "node db1:5432 connected" in body(request)
    assert proxy.reactor.tcpClients == []


def test_readyz_probes_the_primary():
    proxy = TestProxy(make_config())
    reactor = proxy.reactor
    root = metrics.make_root(Service(proxy), reactor)
    request = get(root, b"/readyz")
    assert not request.finished
    (host, port, factory, timeout, _), = reactor.tcpClients
    assert (host, port, timeout) == ("db1", 5432, metrics.PROBE_TIMEOUT)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    assert request.finished and request.responseCode == 200 and "reachable" in body(request)

    request = get(root, b"/readyz")
    factory = reactor.tcpClients[-1][2]
    factory.clientConnectionFailed(None, None)
    assert request.finished and request.responseCode == 503 and "no node reachable: db1:5432" in body(request)


def _clustered(proxy, *states):
    from pgtwist.routing.router import DatabaseRouter

    class Monitor:  # what DatabaseRouter reads of a ClusterMonitor
        pass

    Monitor.states = {s.name: s for s in states}
    proxy.routers["appdb"] = DatabaseRouter(proxy.config.databases["appdb"], proxy.config, Monitor())


def test_readyz_stays_ready_on_replicas_while_the_primary_is_down():
    # Every pod sees the same cluster: a 503 here would take all of them out of the Service
    # during a failover, when the replicas still answer reads.
    from pgtwist.routing.policy import NodeState

    cluster = {"appdb": {"dbname": "postgres", "nodes": ["db1:5432", "db2:5432"], "pool_size": 2}}
    proxy = TestProxy(make_config(databases=cluster))
    _clustered(
        proxy,
        NodeState("db1:5432", role="primary", up=False, timeline=1),
        NodeState("db2:5432", role="replica", up=True, timeline=1, upstream=False),
    )
    request = get(metrics.make_root(Service(proxy), proxy.reactor), b"/readyz")
    assert request.responseCode == 200, body(request)
    assert "no primary (writes fail with 08006), reads on replica db2:5432" in body(request)
    assert proxy.reactor.tcpClients == []  # the monitor's view is enough: no probe


def test_readyz_with_the_primary_up_names_it():
    from pgtwist.routing.policy import NodeState

    cluster = {"appdb": {"dbname": "postgres", "nodes": ["db1:5432", "db2:5432"], "pool_size": 2}}
    proxy = TestProxy(make_config(databases=cluster))
    _clustered(proxy, NodeState("db1:5432", role="primary", up=True, timeline=1), NodeState("db2:5432", role="replica", up=False))
    request = get(metrics.make_root(Service(proxy), proxy.reactor), b"/readyz")
    assert request.responseCode == 200 and "database appdb: primary db1:5432 up" in body(request)


def test_readyz_fails_when_no_node_can_serve():
    from pgtwist.routing.policy import NodeState

    cluster = {"appdb": {"dbname": "postgres", "nodes": ["db1:5432", "db2:5432"], "pool_size": 2}}
    proxy = TestProxy(make_config(databases=cluster))
    _clustered(proxy, NodeState("db1:5432", role="primary", up=False), NodeState("db2:5432", role="replica", up=False))
    request = get(metrics.make_root(Service(proxy), proxy.reactor), b"/readyz")
    assert request.responseCode == 503 and "database appdb: no node up" in body(request)
    assert proxy.reactor.tcpClients == []


def test_service_builds_metrics_and_readiness_follows_the_listener(monkeypatch):
    from pgtwist.service import lifecycle as servicemod

    monkeypatch.setattr(servicemod, "raise_nofile_limit", lambda: 1024)
    reactor = MemoryReactorClock()
    svc = PgBalanceService(make_config(metrics={"listen": "127.0.0.1:9555"}), reactor)
    assert not svc.accepting
    svc.startService()
    ports = {port for port, *_ in reactor.tcpServers}
    assert {6432, 9555} <= ports
    assert svc.accepting
    results = []
    svc.stopService().addBoth(results.append)
    assert results == [None] and not svc.accepting


def test_query_latency_runs_from_the_request_to_its_ready_for_query():
    proxy = TestProxy(make_config())
    app, _ = client(proxy)
    app.got_data(m.query("SELECT pg_sleep(0.3)"))
    proxy.clock.advance(0.3)
    app.server.got_data(m.command_complete("SELECT 1") + m.ready_for_query(p.TX_IDLE))
    text = body(get(metrics.make_root(Service(proxy), proxy.reactor), b"/metrics"))
    assert 'pgbalance_query_duration_seconds_bucket{le="0.25",node="db1:5432",role="primary"} 0.0' in text
    assert 'pgbalance_query_duration_seconds_bucket{le="0.5",node="db1:5432",role="primary"} 1.0' in text
    assert 'pgbalance_query_duration_seconds_count{node="db1:5432",role="primary"} 1.0' in text


def test_nodes_left_out_of_reads_say_why():
    from pgtwist.admin import inspect
    from pgtwist.routing.policy import NodeState
    from pgtwist.routing.router import DatabaseRouter

    cluster = {"appdb": {"dbname": "postgres", "nodes": ["db1:5432", "db2:5432", "db3:5432"], "pool_size": 2}}
    proxy = TestProxy(make_config(databases=cluster))

    class Monitor:  # what DatabaseRouter reads of a ClusterMonitor
        states = {
            "db1:5432": NodeState("db1:5432", role="replica", up=True, timeline=1, upstream=False, lag_bytes=0),
            "db2:5432": NodeState("db2:5432", role="primary", up=True, timeline=2, lag_bytes=0),
            "db3:5432": NodeState("db3:5432", role="replica", up=True, timeline=2, upstream=True, lag_bytes=0),
        }

    database = proxy.config.databases["appdb"]
    proxy.routers["appdb"] = DatabaseRouter(database, proxy.config, Monitor())
    rows = {row["node"]: row for row in inspect.nodes(proxy)}
    assert (rows["db1:5432"]["excluded"], rows["db1:5432"]["timeline"]) == ("old_timeline", 1)
    assert rows["db2:5432"]["excluded"] is None and rows["db3:5432"]["excluded"] is None
    text = body(get(metrics.make_root(Service(proxy), proxy.reactor), b"/metrics"))
    assert 'pgbalance_node_excluded{database="appdb",node="db1:5432",reason="old_timeline"} 1.0' in text
    assert 'node="db3:5432",reason=' not in text


def test_routing_reason_labels_are_bounded():
    from twisted.internet.task import Clock

    from pgtwist.admin.counters import MAX_ROUTE_LABELS, Counters, route_label

    assert route_label("volatile function nosuch_fn_123; replica lagging") == "volatile function"
    assert route_label("function nosuch_writer") == "function"
    assert route_label("batch with volatile function f") == "batch with"
    assert route_label("select") == "select"
    counters = Counters(Clock())
    for i in range(1000):
        counters.routed(f"volatile function nosuch_fn_{i}")
        counters.routed(f"made up reason {i}")
    assert len(counters.routes) <= MAX_ROUTE_LABELS + 1
    assert counters.routes["volatile function"] == 1000
    assert not any("nosuch" in label for label in counters.routes)


def test_per_database_stats_count_queries_transactions_and_times_in_microseconds():
    from twisted.internet.task import Clock

    from pgtwist.admin.counters import Counters
    from pgtwist.wire import protocol as p

    clock = Clock()
    counters = Counters(clock)
    counters.ready("c1", "n1", "primary", p.TX_IDLE, 0.002, "appdb")  # an autocommit statement
    counters.ready("c1", "n1", "primary", p.TX_IN_TRANSACTION, 0.001, "appdb")  # BEGIN
    clock.advance(0.5)
    counters.ready("c1", "n1", "primary", p.TX_IDLE, 0.003, "appdb")  # COMMIT
    stats = counters.databases["appdb"]
    assert (stats.queries, stats.xacts) == (3, 2)
    assert stats.query_us == 6000
    assert stats.xact_us == 2000 + 500000
