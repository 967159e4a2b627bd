"""Plain-data views, counters, actions and the audit log, over a real Proxy on StringTransports."""

import json

import pytest
from twisted.logger import globalLogPublisher

from pgtwist.admin import actions, inspect
from pgtwist.admin.counters import DURATION_BUCKETS, Counters, Histogram
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.admin_support import TestProxy, client, make_config

PLAIN = (str, int, float, bool, type(None))


@pytest.fixture
def proxy():
    return TestProxy(make_config())


def assert_plain(rows, columns):
    names = [name for name, _ in columns]
    for row in rows:
        assert list(row) == names
        for (name, kind), value in zip(columns, row.values()):
            assert value is None or isinstance(value, kind) or (kind is str and isinstance(value, PLAIN)), (name, value)
    json.dumps(rows)  # plain data all the way down


def test_views_are_plain_data_with_their_columns(proxy):
    client(proxy)
    client(proxy, user="admin", database="pgbalance")
    assert_plain(inspect.clients(proxy), inspect.CLIENT_COLUMNS)
    assert_plain(inspect.servers(proxy), inspect.SERVER_COLUMNS)
    assert_plain(inspect.pools(proxy), inspect.POOL_COLUMNS)
    assert_plain(inspect.nodes(proxy), inspect.NODE_COLUMNS)
    assert_plain(inspect.stats(proxy), inspect.KEY_VALUE_COLUMNS)
    assert_plain(inspect.config(proxy.config), inspect.CONFIG_COLUMNS)
    assert_plain(inspect.prepared(proxy), inspect.PREPARED_COLUMNS)


def test_clients_and_servers_show_the_link(proxy):
    app, _ = client(proxy)
    (c,) = [c for c in inspect.clients(proxy) if c["id"] == app.id]
    (s,) = inspect.servers(proxy)
    assert (c["user"], c["database"], c["state"], c["tx"], c["server"]) == ("app", "appdb", "linked", "I", s["id"])
    assert (s["client"], s["state"], s["backend_pid"], s["node"]) == (app.id, "linked", 4242, "db1:5432")
    proxy.clock.advance(3)
    (c,) = inspect.clients(proxy)
    assert c["age_s"] == 3.0


def test_pools_count_waits(proxy):
    first, _ = client(proxy)
    second, _ = client(proxy)
    third, _ = client(proxy)  # pool_size 2: this one waits
    assert third.state == "waiting"
    proxy.clock.advance(1.5)
    (pool,) = inspect.pools(proxy)
    assert (pool["size"], pool["busy"], pool["waiting"], pool["waits"]) == (2, 2, 1, 1)
    assert pool["lent"] == 0  # (session pooling lends nothing)
    assert pool["oldest_wait_s"] == 1.5 and pool["role"] == "primary"
    first.connection_lost(None)  # a server comes back (reset first)
    server = proxy.servers[0]
    server.got_data(m.command_complete("DISCARD ALL") + m.ready_for_query())
    assert third.state == "linked"
    (pool,) = inspect.pools(proxy)
    assert pool["waiting"] == 0 and pool["wait_s"] == 1.5


def test_nodes_without_a_monitor(proxy):
    client(proxy)
    (node,) = inspect.nodes(proxy)
    assert (node["database"], node["node"], node["role"], node["servers"]) == ("appdb", "db1:5432", "primary", 1)
    assert [str(n) for n in inspect.primaries(proxy)] == ["db1:5432"]


def test_stats_and_config_never_leak_secrets(proxy):
    stats = {r["name"]: r["value"] for r in inspect.stats(proxy)}
    assert stats["clients"] == 0 and stats["draining"] is False
    text = json.dumps(inspect.config(proxy.config))
    assert "adminpw" not in text and '"pw"' not in text and "********" in text


def test_explain_says_where_and_why(proxy):
    answer = inspect.explain(proxy, "SELECT 1")
    assert answer["database"] == "appdb" and answer["node"] == "db1:5432" and answer["reason"]
    assert inspect.explain(proxy, "LISTEN x")["pins_session"]
    assert inspect.explain(proxy, "SELECT 1", database="nope") == {"database": "nope", "error": "no such database"}


def test_counters_ready_counts_queries_transactions_and_durations():
    from twisted.internet.task import Clock

    clock = Clock()
    c = Counters(clock)
    c.ready("c1", "n1", "primary", p.TX_IDLE)  # autocommit statement
    c.ready("c1", "n1", "primary", p.TX_IN_TRANSACTION)  # BEGIN
    clock.advance(0.2)
    c.ready("c1", "n1", "primary", p.TX_IN_TRANSACTION)
    clock.advance(0.1)
    c.ready("c1", "n1", "primary", p.TX_IDLE)  # COMMIT
    assert c.queries == {("n1", "primary"): 4} and c.transactions == {("n1", "primary"): 2}
    (h,) = c.transaction_seconds.values()
    assert h.count == 1 and abs(h.sum - 0.3) < 1e-9
    c.ready("c2", "n1", "primary", p.TX_IN_TRANSACTION)
    c.client_closed("c2")  # left inside a transaction: not a duration
    assert h.count == 1 and c._open_tx == {}


def test_histogram_buckets_are_cumulative():
    h = Histogram()
    for v in (0.0005, 0.003, 0.003, 100.0):
        h.observe(v)
    buckets = dict(h.buckets())
    assert buckets["0.001"] == 1 and buckets["0.005"] == 3 and buckets[repr(DURATION_BUCKETS[-1])] == 3
    assert buckets["+Inf"] == 4 == h.count


@pytest.mark.parametrize("value", [0.0, 1e-9, 0.001, 0.0010001, 0.004, 0.005, 2.5, 59.9, 60.0, 60.1, 1e9, -1.0])
def test_a_value_falls_in_the_bucket_bisect_finds(value):
    from bisect import bisect_left

    from pgtwist.admin.counters import bucket_of

    assert bucket_of(value) == bisect_left(DURATION_BUCKETS, value)


def test_counters_from_sessions(proxy):
    app, transport = client(proxy)
    server = app.server
    server.got_data(m.command_complete("SELECT 1") + m.ready_for_query(p.TX_IDLE))
    server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    server.got_data(m.command_complete("COMMIT") + m.ready_for_query(p.TX_IDLE))
    counters = proxy.counters
    assert sum(counters.queries.values()) == 3 and sum(counters.transactions.values()) == 2
    assert counters.clients_accepted == 1
    client(proxy, database="nope")
    assert counters.errors == {"3D000": 1}
    assert sum(counters.routes.values()) == 1


def test_actions_pause_resume_kill(proxy):
    app, transport = client(proxy)
    assert actions.pause(proxy, "appdb") == 1
    with pytest.raises(actions.ActionError):
        actions.pause(proxy, "nope")
    assert actions.resume(proxy) == 1
    assert actions.kill(proxy, app.id) and transport.disconnecting
    assert not actions.kill(proxy, "c404")


def audit_events(proxy, user, data_fn, **config):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        data_fn(TestProxy(make_config(**config)))
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [e for e in events if e.get("log_namespace") == "pgtwist.audit"]


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_audit_logs_statement_texts_but_never_bind_values(mode):
    secret = b"s3cret-value"

    def run(proxy):
        app, _ = client(proxy)
        if mode == "transaction":
            app.got_data(m.query("SELECT 1"))
        server = app.server or proxy.servers[0]
        data = m.query("SELECT 42") + m.parse("st", "SELECT $1") + m.bind("", "st", [secret]) + m.execute() + m.sync()
        app.got_data(data)
        forwarded = server.transport.value()
        assert secret in forwarded and b"SELECT 42" in forwarded  # still forwarded, unchanged

    events = audit_events(None, "app", run, audit=["app"], pool_mode=mode)
    texts = [e["statement"] for e in events]
    assert "SELECT 42" in texts and "SELECT $1" in texts
    assert all("s3cret" not in json.dumps({k: str(v) for k, v in e.items()}) for e in events)
    assert {e["user"] for e in events} == {"app"}


def test_no_audit_for_unlisted_users():
    def run(proxy):
        app, _ = client(proxy)
        app.got_data(m.query("SELECT 42"))

    assert audit_events(None, "app", run, audit=["admin"]) == []


def test_pools_say_how_many_busy_connections_are_lent_between_transactions():
    from tests.harness.session import Harness

    h = Harness(pool_mode="transaction")
    session, _ = h.client()
    session.got_data(m.query("SELECT 1"))
    session.server.got_data(m.command_complete("SELECT 1") + m.ready_for_query())
    (pool,) = inspect.pools(h.proxy)
    assert (pool["busy"], pool["lent"], pool["idle"]) == (1, 1, 0)
