"""Users and secrets against a real primary + replica: a health user that works from start-up
next to SCRAM verifiers, auth_file (read, reloaded), and verifiers made by pgtwist-passwd.

The app user's password is given as the verifier PostgreSQL stores (pg_authid), as the README
recommends: pgtwist checks clients against it and logs in to the nodes with the ClientKey each
client proves. The health monitor cannot (no client has logged in when it starts): it logs in as
a role of its own whose plaintext secret is in auth_file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psycopg
import pytest

from pgtwist.tools.localcluster import LocalCluster, free_port

from tests.harness.ops import http_get, start_ops_proxy
from tests.harness.proxy import DATABASE, HOST, TWISTD, ProxyStartError, proxy_config, start_proxy, wait_for, write_config

pytestmark = pytest.mark.integration

MONITOR, MONITOR_SECRET = "pgtwist_monitor", 'mon "quoted" secret'
FILER = "filer"


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster.create(replicas=1) as c:
        c.psql(c.nodes[0], f"CREATE ROLE {MONITOR} LOGIN PASSWORD 'mon \"quoted\" secret' IN ROLE pg_monitor")
        c.psql(c.nodes[0], f"CREATE ROLE {FILER} LOGIN")
        c.psql(c.nodes[0], f"GRANT CONNECT ON DATABASE {c.app_database} TO {FILER}")
        c.wait_replicas_caught_up(30)
        yield c


def stored_verifier(cluster, role: str) -> str:
    return cluster.psql(cluster.nodes[0], f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")


def userlist_line(user: str, secret: str) -> str:
    return '"' + user.replace('"', '""') + '" "' + secret.replace('"', '""') + '"\n'


def passwd_tool(password: str) -> str:
    """The verifier `python -m pgtwist.tools.passwd` prints for *password* (read from stdin)."""
    out = subprocess.run(
        [sys.executable, "-m", "pgtwist.tools.passwd"], input=password + "\n", capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip()


def cluster_db(cluster) -> dict:
    return {DATABASE: {"dbname": cluster.app_database, "nodes": [n.addr for n in cluster.nodes]}}


def connect(px, user: str, password: str) -> psycopg.Connection:
    return psycopg.connect(
        host=px.host, port=px.port, dbname=DATABASE, user=user, password=password, sslmode="disable", connect_timeout=10, autocommit=True
    )


# --------------------------------------------------------------------------- the health monitor's login


def test_cluster_with_scram_verifiers_comes_up_routes_and_is_ready(cluster, tmp_path):
    verifier = stored_verifier(cluster, cluster.app_user)
    assert verifier.startswith("SCRAM-SHA-256$")
    (tmp_path / "userlist.txt").write_text("; the monitor's role, a Secret in production\n" + userlist_line(MONITOR, MONITOR_SECRET))
    metrics = free_port(HOST)
    primary, replica = cluster.nodes
    with start_ops_proxy(
        cluster,
        tmp_path,
        {"metrics": {"listen": f"{HOST}:{metrics}"}},
        databases=cluster_db(cluster),
        users={cluster.app_user: {"password": verifier}},
        auth_file="userlist.txt",
        health_user=MONITOR,
        pool_mode="transaction",
        health_check_interval=0.2,
    ) as px:
        # Before any client has logged in, the monitor sees both nodes up and /readyz says so.
        def nodes_up():
            text = http_get(metrics, "/metrics")[1]
            return sum(1 for line in text.splitlines() if line.startswith("pgbalance_node_up{") and line.endswith(" 1.0")) == 2

        wait_for(nodes_up, 20, "both nodes up in pgbalance_node_up")
        status, body = http_get(metrics, "/readyz")
        assert status == 200 and body.startswith("ready"), body
        assert "is down" not in px.log_text()
        assert f"database {DATABASE}: the health monitor probes 2 nodes as user {MONITOR}" in px.log_text()

        # A client with the app password: reads reach the replica, writes the primary.
        with connect(px, cluster.app_user, cluster.app_password) as conn:
            wait_for(lambda: conn.execute("SELECT inet_server_port()").fetchone()[0] == replica.port, 20, "a read on the replica")
            conn.execute("CREATE TABLE IF NOT EXISTS hu (v int)")
            assert conn.execute("INSERT INTO hu VALUES (1) RETURNING inet_server_port()").fetchone()[0] == primary.port
        status, body = http_get(metrics, "/readyz")
        assert status == 200, body


def test_check_refuses_a_cluster_the_monitor_cannot_log_in_to(cluster, tmp_path):
    # The reproduction: the app user's verifier only, no health user. It used to pass --check and
    # then mark every node down (08006 "no primary", /readyz 503).
    verifier = stored_verifier(cluster, cluster.app_user)
    config = tmp_path / "broken.toml"
    write_config(config, *proxy_config(cluster, free_port(HOST), {"databases": cluster_db(cluster), "users": {cluster.app_user: {"password": verifier}}}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(p) for p in sys.path if p]))
    result = subprocess.run(TWISTD + ["-n", "pgbalance", "--config", str(config), "--check"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 78, result
    assert "OK" not in result.stdout
    assert f"health_user: databases.{DATABASE}.nodes lists several nodes" in result.stderr
    assert "users.app.password) is a SCRAM verifier" in result.stderr
    assert verifier not in result.stderr + result.stdout  # never the secret
    with pytest.raises(ProxyStartError, match="health_user"):
        with start_proxy(cluster, tmp_path / "start", start_timeout=15, databases=cluster_db(cluster), users={cluster.app_user: {"password": verifier}}):
            pass


def test_md5_health_user_against_scram_nodes_says_why_they_are_down(cluster, tmp_path):
    # --check accepts an md5 hash (nodes using md5 take it); these nodes use SCRAM, and the log
    # and /readyz say so rather than leave the operator guessing.
    from pgtwist.auth import md5_hash

    (tmp_path / "userlist.txt").write_text(userlist_line(MONITOR, md5_hash(MONITOR, MONITOR_SECRET)))
    metrics = free_port(HOST)
    with start_ops_proxy(
        cluster,
        tmp_path,
        {"metrics": {"listen": f"{HOST}:{metrics}"}},
        databases=cluster_db(cluster),
        auth_file="userlist.txt",
        health_user=MONITOR,
        health_check_interval=0.2,
        check_log=False,
    ) as px:
        wait_for(lambda: "holds only an md5 hash" in px.log_text(), 20, "the reason in the log")
        status, body = http_get(metrics, "/readyz")
        assert status == 503, body


# --------------------------------------------------------------------------- auth_file, reloaded


def sighup_and_wait(px, expect: str) -> str:
    offset = px.log_size()
    os.kill(px.pid, signal.SIGHUP)
    return wait_for(lambda: expect in px.log_text(offset) and px.log_text(offset), 10, f"{expect!r} after SIGHUP")


def login_fails(px, user: str, password: str) -> str:
    with pytest.raises(psycopg.OperationalError) as e:
        connect(px, user, password).close()
    return str(e.value)


def test_auth_file_login_and_reload(cluster, tmp_path):
    userlist = tmp_path / "userlist.txt"
    app_verifier = stored_verifier(cluster, cluster.app_user)
    userlist.write_text(userlist_line(cluster.app_user, app_verifier))
    # A verifier made by the tool, set on the node as is: both legs use the same one.
    first = passwd_tool("filer-one")
    cluster.psql(cluster.nodes[0], f"ALTER ROLE {FILER} PASSWORD '{first}'")
    assert stored_verifier(cluster, FILER) == first
    with start_proxy(cluster, tmp_path, users={}, auth_file="userlist.txt") as px:
        with connect(px, cluster.app_user, cluster.app_password) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == cluster.app_user
        assert "password authentication failed" in login_fails(px, FILER, "filer-one")  # not in the file yet

        # The file gains filer: a reload lets it in.
        userlist.write_text(userlist_line(cluster.app_user, app_verifier) + userlist_line(FILER, first))
        sighup_and_wait(px, "applied")
        with connect(px, FILER, "filer-one") as conn:
            assert conn.execute("SELECT current_user, inet_server_port()").fetchone() == (FILER, cluster.nodes[0].port)

        # A broken file changes nothing, and the log names the file and line.
        userlist.write_text(userlist_line(cluster.app_user, app_verifier) + "broken line\n")
        log = sighup_and_wait(px, "nothing changed")
        assert f"auth_file: {userlist}:2:" in log and app_verifier not in log
        with connect(px, FILER, "filer-one") as conn:
            conn.execute("SELECT 1")

        # filer's password changes on the node and in the file: the old one stops working here.
        second = passwd_tool("filer-two")
        cluster.psql(cluster.nodes[0], f"ALTER ROLE {FILER} PASSWORD '{second}'")
        userlist.write_text(userlist_line(cluster.app_user, app_verifier) + userlist_line(FILER, second))
        sighup_and_wait(px, "applied")
        message = login_fails(px, FILER, "filer-one")
        assert "password authentication failed" in message, message
        with connect(px, FILER, "filer-two") as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == FILER
        assert "filer-one" not in px.log_text() and "filer-two" not in px.log_text()
