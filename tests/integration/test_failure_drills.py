"""Failure drills against real PostgreSQL: a hung (SIGSTOPped) primary, replicas left behind by a failover.

The first two tests share one private cluster (a primary and two replicas) and run in order:
the primary is frozen under load and thawed, then killed and replica1 promoted while replica2
is left on the old timeline until it is pointed at the new primary. The third freezes nothing
and kills nothing: replica1 is promoted while the old primary lives on, and replica2 keeps
streaming the old primary's timeline. Which node served a statement is inet_server_port().
"""

from __future__ import annotations

import re
import time

import psycopg
import pytest

from pgtwist.service.lifecycle import JANITOR_INTERVAL

from tests.harness.failover import FAILOVER, make_cluster, wait_routing, write, write_until_it_works
from tests.harness.load import MixedLoad
from tests.harness.ops import http_get, start_ops_proxy
from tests.harness.proxy import DATABASE, HOST, free_port, run_psql, wait_for

pytestmark = pytest.mark.integration

ADMIN, ADMIN_PASSWORD = "admin", "admin-secret"


@pytest.fixture(scope="module")
def cluster():
    c = make_cluster()
    with c:
        yield c


def drill_proxy(cluster, tmp_path, **overrides):
    """A routing proxy in transaction mode with the admin console and /metrics on."""
    metrics_port = free_port(HOST)
    tables = {"admin": {"users": [ADMIN]}, "metrics": {"listen": f"{HOST}:{metrics_port}"}}
    px = start_ops_proxy(
        cluster,
        tmp_path,
        tables,
        databases={DATABASE: {"dbname": cluster.app_database, "nodes": [n.addr for n in cluster.nodes]}},
        users={cluster.app_user: {"password": cluster.app_password}, ADMIN: {"password": ADMIN_PASSWORD}},
        **{**FAILOVER, **overrides},
    )
    return px, metrics_port


def show_nodes(px) -> dict[str, dict[str, str]]:
    """SHOW NODES through the admin console: {node: {column: text}}."""
    conninfo = f"host={px.host} port={px.port} dbname=pgbalance user={ADMIN} sslmode=disable"
    out = run_psql(conninfo, ADMIN_PASSWORD, "SHOW NODES", "-F", "|").stdout.strip().splitlines()
    header = out[0].split("|")
    rows = [dict(zip(header, line.split("|"))) for line in out[1:] if "|" in line]
    return {row["node"]: row for row in rows}


# --------------------------------------------------------------------------- a hung primary

LOAD_ALLOWANCE = 0.5  # seconds of work a loaded, shared machine adds to a bound measured from outside

HUNG = {
    "health_check_interval": 0.5,
    "health_check_timeout": 1.0,
    "query_timeout": 3.0,
    "failover_wait": 3.0,
    "tcp_keepidle": 5,
    "tcp_keepintvl": 1,
    "tcp_keepcnt": 3,
}


def test_hung_primary_reads_go_on_writes_fail_within_bounds(cluster, tmp_path):
    primary, r1, r2 = cluster.nodes
    px_cm, _ = drill_proxy(cluster, tmp_path, **HUNG)
    with px_cm as px:
        wait_routing(px, cluster)
        with MixedLoad(px) as load:
            wait_for(lambda: len(load.between(0, time.monotonic(), "write")) >= 5, 20, "writes before the freeze")
            frozen_at = time.monotonic()
            cluster.freeze(primary)
            try:
                # Within a couple of probe intervals (+ the probe timeout) the primary is down.
                wait_for(lambda: show_nodes(px)[primary.addr]["excluded"] == "down", 10, "the frozen primary marked down")
                down_at = time.monotonic()
                # (Room for a slow, shared machine: the errors must come within the bounds below,
                # but the test must see them before it thaws the primary.)
                time.sleep(max(HUNG["query_timeout"], HUNG["failover_wait"]) + 6.0)
                thawed_at = time.monotonic()
            finally:
                cluster.thaw(primary)
            wait_for(lambda: load.between(thawed_at, time.monotonic(), "write") and any(
                o[3] is None for o in load.between(thawed_at, time.monotonic(), "write")), 20, "writes after the thaw")
            recovered_at = time.monotonic()
            time.sleep(1.0)
        end = time.monotonic()
    marked_down_after = down_at - frozen_at
    print(f"hung primary: marked down {marked_down_after:.2f}s after SIGSTOP")
    assert marked_down_after < 2 * HUNG["health_check_interval"] + HUNG["health_check_timeout"] + 2.0
    assert not load.broken, load.broken  # every session kept
    # Reads (autocommit and BEGIN READ ONLY) never stopped: no errors, and served all along.
    for kind in ("read", "read_only_tx"):
        outcomes = load.between(frozen_at, end, kind)
        assert outcomes and all(o[3] is None for o in outcomes), [o for o in outcomes if o[3]][:5]
        served = [o for o in load.between(down_at, thawed_at, kind)]
        assert len(served) >= 10, f"only {len(served)} {kind} completed while the primary was frozen"
        assert {o[4] for o in served} <= {r1.port, r2.port}
    # A write while frozen got a clear error within query_timeout / failover_wait (+ the janitor's tick).
    # The bound is that worst case plus 0.5 s for the work itself on a loaded box: a write that begins
    # just after a janitor tick is caught a whole tick late, and one such write measured 6.015 s
    # against a bound of exactly 6.0 (a write begun on a tick takes 5.00 s).
    frozen_writes = load.between(frozen_at, thawed_at, "write")
    bound = max(HUNG["query_timeout"], HUNG["failover_wait"]) + HUNG["health_check_timeout"] + 2 * JANITOR_INTERVAL + LOAD_ALLOWANCE
    failures = [o for o in frozen_writes if o[3] is not None]
    assert failures, "no write attempt failed while the primary was frozen"
    assert {o[3] for o in failures} <= {"57014", "08006"}, {o[3] for o in failures}
    slowest = max(o[1] - o[0] for o in frozen_writes)
    assert slowest < bound, f"a write waited {slowest:.1f}s (bound {bound:.1f}s)"
    print(
        f"hung primary: {len(failures)} write errors {sorted({o[3] for o in failures})}, slowest {slowest:.2f}s;"
        f" writes back {recovered_at - thawed_at:.2f}s after SIGCONT"
    )


# --------------------------------------------------------------------------- left behind by a failover


def reader_sees(px, v: int) -> tuple[int, int]:
    """(port, rows with v) as a fresh client (no read-your-writes of its own) reads them."""
    with px.connect() as conn:
        return conn.execute("SELECT inet_server_port(), count(*) FROM ft WHERE v = %s", (v,)).fetchone()


def rows_missed(px) -> tuple[int, int]:
    """(port, rows written while replica2 was left out) as a fresh client reads them."""
    with px.connect() as conn:
        return conn.execute("SELECT inet_server_port(), count(*) FROM ft WHERE v > 10000").fetchone()


def test_replica_left_behind_by_a_failover_gets_no_reads_until_it_follows(cluster, tmp_path):
    primary, r1, r2 = cluster.nodes
    px_cm, metrics_port = drill_proxy(cluster, tmp_path)
    with px_cm as px:
        wait_routing(px, cluster)
        cluster.wait_replicas_caught_up(30)
        cluster.stop(primary, mode="immediate")
        # No primary yet: both replicas lost their upstream, and they are all there is to read from.
        wait_for(lambda: show_nodes(px)[primary.addr]["excluded"] == "down", 10, "the primary marked down")
        nodes = show_nodes(px)
        assert nodes[r1.addr]["excluded"] == nodes[r2.addr]["excluded"] == "", nodes
        assert reader_sees(px, 0)[0] in (r1.port, r2.port)
        cluster.promote(r1)
        port, took, _ = write_until_it_works(px, 0, 30)
        assert port == r1.port
        # replica2 has lost its upstream and is still on timeline 1; replica1 is on timeline 2.
        nodes = wait_for(
            lambda: (n := show_nodes(px))[r2.addr]["excluded"] == "old_timeline" and n, 10, "replica2 excluded"
        )
        assert nodes[r1.addr]["role"] == "primary" and nodes[r1.addr]["timeline"] == "2" and nodes[r1.addr]["excluded"] == ""
        assert nodes[primary.addr]["excluded"] == "down"
        status, text = http_get(metrics_port, "/metrics")
        assert status == 200
        assert re.search(rf'pgbalance_node_excluded\{{database="{DATABASE}",node="{re.escape(r2.addr)}",reason="old_timeline"\}} 1\.0', text)
        # Every write on the new primary is visible to every later read, by whichever client.
        with px.connect() as writer:
            for v in range(1, 31):
                assert write(writer, 10_000 + v) == r1.port
                for _ in range(2):
                    assert reader_sees(px, 10_000 + v) == (r1.port, 1)

        # Pointed at the new primary, replica2 follows timeline 2 and serves reads again.
        cluster.follow(r2, r1)
        wait_for(lambda: show_nodes(px)[r2.addr]["excluded"] == "", 30, "replica2 following the new primary")
        assert show_nodes(px)[r2.addr]["timeline"] == "2"
        wait_for(lambda: reader_sees(px, 10_030)[0] == r2.port, 20, "a read on replica2 again")
        # ...and, once it has replayed them, what was written while it was left out. A fresh
        # client has no read-your-writes of its own: a replica within max_replica_lag may serve
        # it a few rows behind, as PostgreSQL's own hot standby would (CI saw 23 of 30).
        wait_for(lambda: rows_missed(px) == (r2.port, 30), 20, "replica2 serving what it missed")

        # Its WAL receiver stopped while the primary lives (same timeline): no reads either.
        cluster.detach(r2)
        wait_for(lambda: show_nodes(px)[r2.addr]["excluded"] == "no_upstream", 15, "replica2 without an upstream")
        with px.connect() as writer:
            for v in range(31, 41):
                assert write(writer, 10_000 + v) == r1.port
                assert reader_sees(px, 10_000 + v) == (r1.port, 1)
        cluster.follow(r2, r1)
        wait_for(lambda: show_nodes(px)[r2.addr]["excluded"] == "", 30, "replica2 streaming again")


def test_replica_still_streaming_the_old_primary_gets_no_reads(tmp_path):
    """A failover that leaves the old primary running: replica2 streams timeline 1 from it."""
    with make_cluster() as cluster:
        primary, r1, r2 = cluster.nodes
        px_cm, _ = drill_proxy(cluster, tmp_path)
        with px_cm as px:
            wait_routing(px, cluster)
            cluster.wait_replicas_caught_up(30)
            cluster.promote(r1)  # the old primary lives on; replica2 still follows it
            wait_for(lambda: f"node {primary.addr} fenced" in px.log_text(), 20, "the old primary fenced")
            nodes = wait_for(
                lambda: (n := show_nodes(px))[r2.addr]["excluded"] == "old_timeline" and n, 10, "replica2 excluded"
            )
            assert nodes[primary.addr]["excluded"] == "fenced"
            status = cluster.psql(r2, "SELECT status, received_tli FROM pg_stat_wal_receiver")
            assert status == "streaming|1", status  # really streaming, from the old history
            with px.connect() as writer:
                for v in range(1, 21):
                    assert write(writer, 20_000 + v) == r1.port
                    assert reader_sees(px, 20_000 + v) == (r1.port, 1)
            # The old primary took none of it, and replica2 has none of it either.
            assert cluster.psql(r2, "SELECT count(*) FROM ft WHERE v > 20000", dbname=cluster.app_database) == "0"


# --------------------------------------------------------------------------- query_timeout on a healthy node


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_query_timeout_stops_a_long_statement(pg_cluster, tmp_path, pool_mode):
    from tests.harness.proxy import start_proxy

    primary = pg_cluster.nodes[0]
    with start_proxy(pg_cluster, tmp_path, pool_mode=pool_mode, query_timeout=1.0) as px:
        conn = px.connect()
        try:
            conn.execute("SELECT 1")
            started = time.monotonic()
            with pytest.raises(psycopg.Error) as caught:
                conn.execute("SELECT pg_sleep(30)")
            took = time.monotonic() - started
            assert caught.value.sqlstate == "57014" and "query_timeout" in str(caught.value), caught.value
            assert 1.0 <= took < 4.0, took
            if pool_mode == "transaction":
                assert conn.execute("SELECT 2").fetchone() == (2,)  # the session goes on
                conn.execute("BEGIN")
                with pytest.raises(psycopg.Error) as caught:
                    conn.execute("SELECT pg_sleep(30)")
                assert caught.value.sqlstate == "57014"
                with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                    conn.execute("SELECT 3")
                conn.execute("ROLLBACK")
                assert conn.execute("SELECT 4").fetchone() == (4,)
            else:
                assert conn.broken or conn.closed  # FATAL: its server session was its state
        finally:
            conn.close()
        # The node stopped the work (the CancelRequest), and its health was not touched.
        with psycopg.connect(pg_cluster.dsn(primary, connect_timeout=10), autocommit=True) as direct:
            wait_for(
                lambda: direct.execute(
                    "SELECT count(*) = 0 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
                ).fetchone()[0],
                10,
                "the timed-out statements cancelled on the node",
            )
        assert "marked down" not in px.log_text() and "is down" not in px.log_text()
