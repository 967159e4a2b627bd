"""Real clusters for the failover tests: a primary + 2 replicas with a table to write to, and polling writes.

Shared by tests/integration/test_failover.py and test_failure_drills.py.
"""

from __future__ import annotations

import time

import psycopg

from pgtwist.tools.localcluster import LocalCluster

from .proxy import wait_for

FAILOVER: dict = {
    "pool_mode": "transaction",
    "pool_size": 8,
    "query_wait_timeout": 30,
    "health_check_interval": 0.2,
    "health_check_timeout": 1.0,
    "failover_wait": 15.0,
}

SETUP_SQL = "CREATE TABLE ft (id serial PRIMARY KEY, v int, port int);"


def make_cluster() -> LocalCluster:
    c = LocalCluster.create(replicas=2)
    try:
        c.psql(c.nodes[0], SETUP_SQL, user=c.app_user, dbname=c.app_database)
        c.wait_replicas_caught_up(30)
    except BaseException:
        c.destroy()
        raise
    return c


def wait_routing(px, cluster, timeout: float = 20) -> None:
    """Until the monitor knows every node: reads reach both replicas, writes the primary."""
    primary, r1, r2 = (n.port for n in cluster.nodes)
    seen: set[int] = set()

    def both():
        with px.connect() as conn:
            for _ in range(6):
                seen.add(conn.execute("SELECT inet_server_port()").fetchone()[0])
        return {r1, r2} <= seen

    wait_for(both, timeout, f"reads on both replicas (seen {seen})")
    with px.connect() as conn:
        assert write(conn, 0) == primary


def write(conn, v: int) -> int:
    """Insert a row; the port of the node that took it."""
    return conn.execute("INSERT INTO ft (v, port) VALUES (%s, inet_server_port()) RETURNING port", (v,)).fetchone()[0]


def write_until_it_works(px, v: int, timeout: float) -> tuple[int, float, list[str]]:
    """Poll writes through the proxy (new connection each try) until one succeeds; (port, seconds, errors seen)."""
    start = time.monotonic()
    errors: list[str] = []

    def attempt():
        try:
            with px.connect() as conn:
                return write(conn, v)
        except psycopg.Error as e:
            errors.append(f"{type(e).__name__}: {e}".strip())
            raise

    port = wait_for(attempt, timeout, "a write to succeed", interval=0.1)
    return port, time.monotonic() - start, errors
