"""Bounded fuzzing of a live pgtwist in front of a real primary + replica: hostile frames close their sender only.

Hypothesis draws batches of frames (valid, mutated, random types, bad lengths, truncated) that
logged-in clients send, each batch followed by Sync and a sentinel query (fuzzing.FuzzClient
judges every answer). Throughout, a healthy client beside them must keep its right answers;
afterwards pgtwist must be alive, with no traceback or XX000 in its log, and no node may have
changed health (SHOW NODES, and no "marked down"/"is down" in the log). A few thousand batches
in under a minute; bench/fuzz.py runs the same for a million frames.
"""

import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pgtwist.wire import messages as m

from tests.harness import fuzzing
from tests.harness.ops import ADMIN, ADMIN_PASSWORD, admin_show, nodes_up, pools_at_rest, show_nodes, start_ops_proxy
from tests.harness.proxy import RawClient, wait_for

pytestmark = pytest.mark.integration

MAX_MESSAGE = 1 << 20
TABLE = "fuzz_healthy"
# Generation only: shrinking against a live server would outlast the test's deadline, and the
# falsifying batch is printed whole anyway.
FUZZ = dict(deadline=None, phases=[Phase.generate], database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_setup(pg_cluster):
    primary = pg_cluster.nodes[0]
    pg_cluster.psql(
        primary,
        f"CREATE TABLE IF NOT EXISTS {TABLE} (id serial PRIMARY KEY, v int); CREATE SEQUENCE IF NOT EXISTS fuzz_seq;",
        user=pg_cluster.app_user,
        dbname=pg_cluster.app_database,
    )
    pg_cluster.wait_replicas_caught_up(30)
    return pg_cluster


def fuzz_proxy(cluster, tmp_path, **overrides):
    return start_ops_proxy(
        cluster,
        tmp_path,
        {"admin": {"users": [ADMIN]}},
        auth_type="trust",  # logins cost nothing: the fuzzing is about what comes after
        pool_size=8,
        query_wait_timeout=20,
        max_message_size=MAX_MESSAGE,
        health_check_interval=0.5,
        databases={"appdb": {"dbname": cluster.app_database, "nodes": [n.addr for n in cluster.nodes]}},
        users={cluster.app_user: {"password": cluster.app_password}, ADMIN: {"password": ADMIN_PASSWORD}},
        **overrides,
    )


def run_fuzz(px, cluster, examples: int, seconds: float) -> fuzzing.Verdicts:
    nodes_before = nodes_up(px)
    assert len(nodes_before) == len(cluster.nodes)
    log_offset = px.log_size()
    healthy = fuzzing.HealthyClient(lambda: px.connect(autocommit=True), TABLE)
    healthy.start()
    fuzzer = fuzzing.FuzzClient(px.host, px.port, px.user, px.password)
    stop_at = time.monotonic() + seconds

    @settings(max_examples=examples, **FUZZ)
    @given(st.data())
    def one_batch(data):
        frames, truncated = fuzzing.batch(fuzzing.HypothesisChooser(data), MAX_MESSAGE)
        if time.monotonic() > stop_at:
            # The time bound wins over the example count on a slow machine. Drawn all the same:
            # an example that stopped drawing early would make Hypothesis see generation depend
            # on outside state and fail the run (FlakyStrategyDefinition).
            return
        fuzzer.send(frames, truncated)
        assert not fuzzer.verdicts.violations, fuzzer.verdicts.violations[-1]

    try:
        one_batch()
    finally:
        fuzzer.close()
        healthy.finish()
    v = fuzzer.verdicts
    print(v.summary(), f"; healthy client: {healthy.checks} checks")
    assert not v.violations, v.violations[:5]
    assert not healthy.failures, healthy.failures[:5]
    assert healthy.checks >= 10, f"the healthy client got only {healthy.checks} answers"
    assert v.answered > 0 and v.closed > 0, v.summary()
    assert px.alive()
    text = px.log_text(log_offset)
    for bad in ("marked down", "is down", "XX000", "internal error", "Traceback"):
        assert bad not in text, f"{bad!r} in the proxy log:\n" + text[text.find(bad) - 2000 : text.find(bad) + 500]
    assert {name: row["up"] for name, row in show_nodes(px).items()} == nodes_before
    # No server connection was left behind with a client gone (a leak would starve the pool).
    wait_for(lambda: pools_at_rest(px), 10, f"every pool at rest: {admin_show(px, 'NODE_POOLS')}")
    # And it still serves.
    with RawClient(px.host, px.port) as c:
        c.login(px.user, "appdb", px.password)
        assert c.scalar("SELECT 'still here'") == "still here"
    return v


def test_fuzz_transaction_mode(fuzz_setup, tmp_path):
    with fuzz_proxy(fuzz_setup, tmp_path, pool_mode="transaction") as px:
        run_fuzz(px, fuzz_setup, examples=2000, seconds=35)


def test_fuzz_session_mode(fuzz_setup, tmp_path):
    with fuzz_proxy(fuzz_setup, tmp_path, pool_mode="session") as px:
        run_fuzz(px, fuzz_setup, examples=1000, seconds=20)


# Batches the fuzzing found to hang or fail once, kept as they were found.
FOUND = [
    # Execute of a missing portal, then Queries before the Sync: the relay waited for their answers.
    [b"E\x00\x00\x00\t\x00\x00\x00\x00\x00", m.query("SELECT 1"), m.query("SELEC 1"), m.query("SELEC 1")],
    # The same with the write held back from the replica inside the unsynced batch.
    [b"E\x00\x00\x00\x0bs2\x00\x00\x00\x00\x05", m.query("SELECT 1"), m.query("SAVEPOINT s")],
    # A failing read on the replica, then a multi-statement text.
    [m.sync(), m.query("SELECT $1::int"), m.query("SELECT 1; SELECT 2")],
]


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_batches_found_by_fuzzing(fuzz_setup, tmp_path, pool_mode):
    with fuzz_proxy(fuzz_setup, tmp_path, pool_mode=pool_mode) as px:
        nodes_up(px)
        fuzzer = fuzzing.FuzzClient(px.host, px.port, px.user, px.password, timeout=5)
        for frames in FOUND:
            fuzzer.send(frames, False)
            fuzzer.send([m.query("SELECT 1")], False)
        fuzzer.close()
        assert not fuzzer.verdicts.violations, fuzzer.verdicts.violations
