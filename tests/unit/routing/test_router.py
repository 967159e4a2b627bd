"""DatabaseRouter: single node, cluster routing over a fake monitor, the routing hook, pg_proc volatility."""

import pytest
from twisted.internet import defer
from twisted.logger import Logger

from pgtwist import config as configmod
from pgtwist.cluster.catalog import function_volatility
from pgtwist.routing import router as routermod
from pgtwist.routing.router import DatabaseRouter, NoNode

from tests.harness.routing import R1, R2, P, cluster_states, clustered, make_config


def decide(router, sql, *, in_transaction=None, user_rule="auto", min_lsn=0):
    return router.decide(sql, in_transaction=in_transaction, user_rule=user_rule, min_lsn=min_lsn)


def decide_hooked(router, sql, *, in_transaction=None, user_rule="auto", min_lsn=0):
    """decide_with_hook's Deferred."""
    return router.decide_with_hook(sql, in_transaction=in_transaction, user_rule=user_rule, min_lsn=min_lsn, identity={"user": "app"})


def result_of(d):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    (r,) = results
    if isinstance(r, Exception) or hasattr(r, "raiseException"):
        r.raiseException()
    return r


@pytest.fixture
def logged(monkeypatch):
    events: list[dict] = []
    monkeypatch.setattr(routermod, "log", Logger(namespace="test", observer=events.append))
    return events


# -- one node ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sql", ["SELECT 1", "INSERT INTO t VALUES (1)", "BEGIN READ ONLY", None, "not sql at all"])
def test_single_node_decide_always_returns_the_node(sql):
    config = make_config(nodes=("db1:5432",))
    router = DatabaseRouter(config.databases["appdb"], config)
    assert not router.clustered
    decision = decide(router, sql, user_rule="replica")
    assert decision.node is config.databases["appdb"].nodes[0]
    assert decision.want == "primary" and decision.reason == "single node"
    assert router.primary() is decision.node
    router.server_ended(decision.node, None)  # no monitor: nothing to tell, nothing raised


def test_single_node_decide_with_hook_ignores_the_hook():
    config = make_config(nodes=("db1:5432",))
    calls = []
    router = DatabaseRouter(config.databases["appdb"], config, None, lambda c, i: calls.append(c) or "replica")
    decision = result_of(decide_hooked(router, "SELECT 1"))
    assert decision.reason == "single node" and calls == []


# -- a cluster --------------------------------------------------------------------------------


def test_select_goes_to_a_replica_insert_to_the_primary():
    router, _ = clustered()
    read = decide(router, "SELECT 1")
    assert str(read.node) in (R1, R2) and read.want == "replica" and read.read_only
    write = decide(router, "INSERT INTO t VALUES (1)")
    assert str(write.node) == P and write.want == "primary" and not write.read_only
    assert router.primary() is write.node


def test_reads_are_spread_over_the_replicas():
    router, _ = clustered()
    assert {str(decide(router, "SELECT 1").node) for _ in range(4)} == {R1, R2}


def test_begin_read_only_goes_to_a_replica_begin_to_the_primary():
    router, _ = clustered()
    assert decide(router, "BEGIN READ ONLY").want == "replica"
    assert str(decide(router, "BEGIN").node) == P
    # Inside a read-only transaction even an unknown statement stays on the replica side.
    assert decide(router, None, in_transaction="begin_read_only").want == "replica"
    assert decide(router, "SELECT 1", in_transaction="begin").want == "primary"


def test_no_sql_goes_to_the_primary():
    router, _ = clustered()
    assert str(decide(router, None).node) == P


def test_user_rule_and_database_route_are_respected():
    router, _ = clustered()
    assert str(decide(router, "SELECT 1", user_rule="primary").node) == P
    assert decide(router, "INSERT INTO t VALUES (1)", user_rule="replica").want == "replica"
    router, _ = clustered(route="primary")
    d = decide(router, "SELECT 1")
    assert str(d.node) == P and "rule: database" in d.reason
    router, _ = clustered(route="replica")
    assert decide(router, "INSERT INTO t VALUES (1)").want == "replica"
    # The user's rule comes before the database's.
    assert str(decide(router, "SELECT 1", user_rule="primary").node) == P


def test_no_primary_up_raises_nonode_for_writes_but_reads_still_go():
    router, _ = clustered(states=cluster_states(primary_up=False))
    assert router.primary() is None
    with pytest.raises(NoNode):
        decide(router, "INSERT INTO t VALUES (1)")
    assert decide(router, "SELECT 1").want == "replica"


def test_a_fenced_primary_is_not_the_primary():
    states = cluster_states()
    states[0].fenced = True
    router, _ = clustered(states=states)
    assert router.primary() is None
    with pytest.raises(NoNode):
        decide(router, "INSERT INTO t VALUES (1)")


def test_nothing_up_raises_nonode_for_reads_too():
    states = cluster_states(primary_up=False)
    for s in states:
        s.up = False
    router, _ = clustered(states=states)
    with pytest.raises(NoNode):
        decide(router, "SELECT 1")


def test_read_your_writes_sends_a_read_past_every_replica_to_the_primary():
    router, _ = clustered(states=cluster_states(lsn=1000))
    assert decide(router, "SELECT 1", min_lsn=1000).want == "replica"
    assert str(decide(router, "SELECT 1", min_lsn=1000).node) in (R1, R2)
    late = decide(router, "SELECT 1", min_lsn=1001)
    assert str(late.node) == P and "caught up" in late.reason
    # Caught up on one replica only: that one.
    router.monitor.states[R2].lsn = 2000
    assert {str(decide(router, "SELECT 1", min_lsn=1500).node) for _ in range(3)} == {R2}


def test_read_your_writes_off_ignores_min_lsn():
    router, _ = clustered(read_your_writes=False)
    assert str(decide(router, "SELECT 1", min_lsn=10**9).node) in (R1, R2)


def test_a_connection_lost_without_a_word_marks_the_node_down():
    router, monitor = clustered()
    node = router.by_name[R1]
    router.server_ended(node, None)
    assert monitor.marked == [(R1, "connection lost")]
    assert {str(decide(router, "SELECT 1").node) for _ in range(3)} == {R2}


@pytest.mark.parametrize("code", ["57P02", "57P03", "08006"])
def test_a_fatal_about_the_node_marks_it_down(code):
    router, monitor = clustered()
    router.server_ended(router.by_name[R1], {"S": "FATAL", "C": code, "M": "going away"})
    assert monitor.marked == [(R1, f"connection lost: {code} going away")] and not monitor.verified


def test_57p01_asks_for_a_probe_and_leaves_the_node_up():
    """pg_terminate_backend() and a fast shutdown both say 57P01: only a probe can tell them apart."""
    router, monitor = clustered()
    router.server_ended(router.by_name[R1], {"S": "FATAL", "C": "57P01", "M": "terminating connection due to administrator command"})
    assert monitor.marked == [] and [n for n, _ in monitor.verified] == [R1]
    assert {str(decide(router, "SELECT 1").node) for _ in range(4)} == {R1, R2}


@pytest.mark.parametrize("code", ["08P01", "25P03", "57P05", "53200", "XX000", None])
def test_a_fatal_about_one_session_leaves_the_node_alone(code):
    router, monitor = clustered()
    fields = {"S": "FATAL", "M": "invalid frontend message type 88"}
    if code is not None:
        fields["C"] = code
    router.server_ended(router.by_name[P], fields)
    assert monitor.marked == [] and monitor.verified == []


# -- the routing hook ---------------------------------------------------------------------------


def test_hook_gets_the_classification_and_identity():
    seen = []
    router, _ = clustered(hook=lambda c, identity: seen.append((c, identity)) or None)
    result_of(decide_hooked(router, "SELECT 1"))
    ((classification, identity),) = seen
    assert classification.read_only and classification.reason == "select"
    assert identity == {"user": "app"}


def test_hook_returning_replica_or_primary():
    router, _ = clustered(hook=lambda c, i: "replica")
    d = result_of(decide_hooked(router, "INSERT INTO t VALUES (1)"))
    assert str(d.node) in (R1, R2) and d.reason.startswith("hook: replica")
    router, _ = clustered(hook=lambda c, i: "primary")
    d = result_of(decide_hooked(router, "SELECT 1"))
    assert str(d.node) == P and d.want == "primary"


def test_hook_returning_a_node_name():
    router, _ = clustered(hook=lambda c, i: R2)
    d = result_of(decide_hooked(router, "INSERT INTO t VALUES (1)"))
    assert d.node is router.by_name[R2] and d.want == "node" and d.reason == "hook: node"


@pytest.mark.parametrize("answer", [None, "auto"])
def test_hook_returning_none_uses_the_built_in_policy(answer):
    router, _ = clustered(hook=lambda c, i: answer)
    assert str(result_of(decide_hooked(router, "INSERT INTO t VALUES (1)")).node) == P
    assert result_of(decide_hooked(router, "SELECT 1")).want == "replica"


def test_hook_returning_a_deferred():
    pending = defer.Deferred()
    router, _ = clustered(hook=lambda c, i: pending)
    d = decide_hooked(router, "SELECT 1")
    assert not d.called
    pending.callback(P)
    assert result_of(d).node is router.by_name[P]


def test_hook_as_a_coroutine():
    pending = defer.Deferred()

    async def hook(classification, identity):
        answer = await pending
        return answer if classification.read_only else "primary"

    router, _ = clustered(hook=hook)
    d = decide_hooked(router, "SELECT 1")
    assert not d.called
    pending.callback("replica")
    assert result_of(d).want == "replica"
    # A coroutine that needs no waiting answers at once.
    pending2 = defer.succeed(None)

    async def quick(classification, identity):
        return await pending2

    router, _ = clustered(hook=quick)
    assert str(result_of(decide_hooked(router, "INSERT INTO t VALUES (1)")).node) == P


def test_a_raising_hook_falls_back_and_is_logged(logged):
    def hook(classification, identity):
        raise RuntimeError("hook bug")

    router, _ = clustered(hook=hook)
    d = result_of(decide_hooked(router, "INSERT INTO t VALUES (1)"))
    assert str(d.node) == P and d.want == "primary"
    (event,) = [e for e in logged if "log_failure" in e]
    assert event["log_failure"].check(RuntimeError)


def test_a_failing_deferred_or_coroutine_hook_falls_back(logged):
    router, _ = clustered(hook=lambda c, i: defer.fail(ValueError("nope")))
    assert result_of(decide_hooked(router, "SELECT 1")).want == "replica"

    async def hook(classification, identity):
        raise KeyError("x")

    router, _ = clustered(hook=hook)
    assert str(result_of(decide_hooked(router, "INSERT INTO t VALUES (1)")).node) == P
    assert len([e for e in logged if "log_failure" in e]) == 2


def test_a_hook_naming_an_unknown_node_falls_back(logged):
    router, _ = clustered(hook=lambda c, i: "elsewhere:5432")
    assert str(result_of(decide_hooked(router, "INSERT INTO t VALUES (1)")).node) == P
    (event,) = [e for e in logged if "log_failure" in e]
    assert "elsewhere" in event["log_failure"].getErrorMessage()


def test_nonode_after_the_hook_is_not_swallowed():
    router, _ = clustered(hook=lambda c, i: "primary", states=cluster_states(primary_up=False))
    with pytest.raises(NoNode):
        result_of(decide_hooked(router, "SELECT 1"))
    router, _ = clustered(hook=lambda c, i: None, states=cluster_states(primary_up=False))
    with pytest.raises(NoNode):
        result_of(decide_hooked(router, "INSERT INTO t VALUES (1)"))


def test_no_hook_still_gives_a_deferred_with_nonode():
    router, _ = clustered(states=cluster_states(primary_up=False))
    d = decide_hooked(router, "INSERT INTO t VALUES (1)")
    with pytest.raises(NoNode):
        result_of(d)


# -- function volatility: what the monitor last read from pg_proc ---------------------------------


def test_before_the_monitor_reads_pg_proc_an_unknown_function_counts_as_volatile():
    router, monitor = clustered()
    assert str(decide(router, "SELECT f()").node) == P
    # Built-in readers stay readers even before anything is read.
    assert decide(router, "SELECT random()").want == "replica"


def test_after_the_read_stable_functions_read_and_volatile_ones_write():
    router, monitor = clustered()
    monitor.functions = function_volatility([[b"f", b"f"], [b"g", b"t"], [None, b"t"]])
    assert decide(router, "SELECT f()").want == "replica"
    assert str(decide(router, "SELECT g()").node) == P
    assert str(decide(router, "SELECT h()").node) == P  # created since the read: volatile
    assert decide(router, "SELECT public.f(1)").want == "replica"


def test_read_only_functions_override_volatility():
    router, monitor = clustered(read_only_functions=["g"])
    monitor.functions = function_volatility([[b"g", b"t"]])
    assert decide(router, "SELECT g()").want == "replica"


def test_a_newer_read_is_used_at_once():
    router, monitor = clustered()
    monitor.functions = function_volatility([[b"f", b"f"]])
    assert decide(router, "SELECT f()").want == "replica"
    monitor.functions = function_volatility([[b"f", b"t"]])
    assert str(decide(router, "SELECT f()").node) == P


def test_the_router_never_fetches_and_ddl_asks_the_monitor():
    router, monitor = clustered()
    decide(router, "SELECT f()")
    assert not hasattr(monitor, "fetch")  # (the fake has none: routing must not need it)
    router.schema_changed()
    assert monitor.functions_changes == 1


def test_single_node_never_needs_volatility():
    config = make_config(nodes=("db1:5432",))
    router = DatabaseRouter(config.databases["appdb"], config)
    assert decide(router, "SELECT f()").want == "primary"  # no monitor: one node, nothing to ask
    router.schema_changed()  # (nothing to tell)


# -- the routing hook: loaded once per configuration ------------------------------------------------


def test_the_hook_is_loaded_once_per_configuration_load_and_shared_by_every_router(monkeypatch):
    from twisted.internet.testing import MemoryReactorClock

    from pgtwist.service import proxy as proxymod

    loads = []

    def load_hook(spec):
        loads.append(spec)
        return lambda classification, identity: f"hook #{len(loads)}"

    monkeypatch.setattr(proxymod, "load_hook", load_hook)
    raw = {
        "auth_type": "trust",
        "routing_hook": "hooks:choose",
        "databases": {"a": {"dbname": "a", "nodes": [P, R1]}, "b": {"dbname": "b", "nodes": [P, R1]}},
        "users": {"app": {"password": "pw"}},
    }
    old = configmod.from_dict(raw)
    px = proxymod.Proxy(old, MemoryReactorClock())
    routers = [px.router_for(db) for db in old.databases.values()]
    assert loads == ["hooks:choose"]
    assert routers[0].hook is routers[1].hook is px.routing_hook
    new = configmod.from_dict({**raw, "max_client_conn": 50})
    px.apply_config(new, configmod.diff(old, new))
    assert loads == ["hooks:choose"] * 2  # (a reload picks up a new version of the module)
    assert all(r.hook is px.routing_hook for r in px.routers.values())
    assert px.routing_hook(None, {}) == "hook #2"
