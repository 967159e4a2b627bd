"""/readyz against a real primary and replica: a missing primary is not a reason to leave the
Service while the replica still answers reads; no node at all is."""

from __future__ import annotations

import pytest

from pgtwist.tools.localcluster import LocalCluster, free_port

from tests.harness.ops import http_get, start_ops_proxy
from tests.harness.proxy import DATABASE, HOST, wait_for

pytestmark = pytest.mark.integration


def node_up(metrics: int, port: int) -> float | None:
    for line in http_get(metrics, "/metrics")[1].splitlines():
        if line.startswith("pgbalance_node_up{") and f':{port}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_ready_on_the_replica_while_the_primary_is_down_and_not_ready_with_no_node(tmp_path):
    with LocalCluster.create(replicas=1) as cluster:
        primary, replica = cluster.nodes
        metrics = free_port(HOST)
        with start_ops_proxy(
            cluster,
            tmp_path,
            {"metrics": {"listen": f"{HOST}:{metrics}"}},
            databases={DATABASE: {"dbname": cluster.app_database, "nodes": [n.addr for n in cluster.nodes]}},
            pool_mode="transaction",
            health_check_interval=0.2,
            health_check_timeout=1.0,
        ) as px:
            wait_for(lambda: node_up(metrics, primary.port) == 1.0 and node_up(metrics, replica.port) == 1.0, 30, "both nodes up")
            status, body = http_get(metrics, "/readyz")
            assert status == 200 and f"primary {primary.addr} up" in body, body

            cluster.stop(primary, "immediate")
            wait_for(lambda: node_up(metrics, primary.port) == 0.0, 30, "the primary seen down")
            status, body = http_get(metrics, "/readyz")
            assert status == 200, body
            assert f"no primary (writes fail with 08006), reads on replica {replica.addr}" in body
            with px.connect() as conn:  # what readiness promised: reads are served
                assert conn.execute("SELECT inet_server_port()").fetchone()[0] == replica.port

            cluster.stop(replica, "immediate")
            wait_for(lambda: node_up(metrics, replica.port) == 0.0, 30, "the replica seen down")
            status, body = http_get(metrics, "/readyz")
            assert status == 503 and f"database {DATABASE}: no node up" in body, body
