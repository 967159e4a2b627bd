"""Operating pgtwist live: SSH manhole, admin console, metrics and probes, SIGHUP reload, SIGTERM drain."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import psycopg
import pytest

from pgtwist.tools.localcluster import free_port

from tests.harness.ops import http_get, rewrite_config, screen_text, ssh_keygen, ssh_repl, start_ops_proxy
from tests.harness.proxy import HOST, RawClient, ServerError, port_accepts, run_psql, wait_for

pytestmark = pytest.mark.integration

ADMIN, ADMIN_PASSWORD = "admin", "admin-secret"


def users(cluster) -> dict:
    return {cluster.app_user: {"password": cluster.app_password}, ADMIN: {"password": ADMIN_PASSWORD}}


def admin_psql(px, sql: str, user: str = ADMIN, password: str = ADMIN_PASSWORD) -> subprocess.CompletedProcess:
    conninfo = f"host={px.host} port={px.port} dbname=pgbalance user={user} sslmode=disable"
    return run_psql(conninfo, password, sql, "-F", "|", check=False)


def log_since(px, offset: int, text: str, timeout: float = 10) -> str:
    return wait_for(lambda: text in px.log_text(offset) and px.log_text(offset), timeout, f"{text!r} in the proxy log")


# --------------------------------------------------------------------------- manhole


@pytest.mark.skipif(not (shutil.which("ssh") and shutil.which("ssh-keygen")), reason="needs the OpenSSH client (apt-get install openssh-client)")
def test_manhole_over_real_ssh_sees_live_sessions(pg_cluster, tmp_path):
    listed = ssh_keygen(tmp_path / "listed")
    unlisted = ssh_keygen(tmp_path / "unlisted")
    (tmp_path / "authorized_keys").write_text((tmp_path / "listed.pub").read_text())
    port = free_port(HOST)
    tables = {"manhole": {"listen": f"{HOST}:{port}", "authorized_keys": "authorized_keys", "host_key": "host_key"}}
    with start_ops_proxy(pg_cluster, tmp_path, tables) as px:
        assert (tmp_path / "host_key").stat().st_mode & 0o777 == 0o600  # created on first start
        with px.connect() as conn:
            conn.execute("SELECT 1")
            result = ssh_repl(port, listed, ['"CLIENTS=%d" % len(clients())', '"SERVERS=%d" % len(servers())', 'sorted(pools()[0])[:3]'])
            screen = screen_text(result.stdout)
            assert re.search(r"'CLIENTS=1'", screen), screen
            assert re.search(r"'SERVERS=1'", screen), screen
            assert "['busy', 'connecting', 'database']" in screen, screen

        refused = ssh_repl(port, unlisted, ["len(clients())"])
        assert refused.returncode == 255
        assert b"Permission denied (publickey)" in refused.stderr
        assert "CLIENTS" not in screen_text(refused.stdout)

        # The host key is kept: a second start would present the same one.
        key_before = (tmp_path / "host_key").read_bytes()
    assert (tmp_path / "host_key").read_bytes() == key_before


def test_manhole_refuses_to_start_without_authorized_keys(pg_cluster, tmp_path):
    from tests.harness.proxy import ProxyStartError

    tables = {"manhole": {"listen": f"{HOST}:{free_port(HOST)}", "authorized_keys": "missing_keys"}}
    with pytest.raises(ProxyStartError, match="authorized_keys"):
        with start_ops_proxy(pg_cluster, tmp_path, tables, start_timeout=10):
            pass


# --------------------------------------------------------------------------- admin console


def test_admin_console_show_commands_return_rows(pg_cluster, tmp_path):
    tables = {"admin": {"users": [ADMIN]}}
    with start_ops_proxy(pg_cluster, tmp_path, tables, users=users(pg_cluster), pool_mode="transaction") as px:
        with px.connect() as app:
            # A named prepared statement kept by the proxy for this client (SHOW PREPARED).
            app.execute("SELECT %s::int + 1", (41,), prepare=True).fetchone()
            for command, expect in [
                ("SHOW CLIENTS", ADMIN),
                ("SHOW SERVERS", "|appdb|"),
                ("SHOW POOLS", "appdb"),
                ("SHOW NODES", str(pg_cluster.nodes[0].addr)),
                ("SHOW TOTALS", "clients_accepted"),
                ("SHOW STATS", "appdb|"),
                ("SHOW CONFIG", "pool_mode|transaction"),
                ("SHOW PREPARED", "SELECT $1::int + 1"),
            ]:
                out = admin_psql(px, command)
                assert out.returncode == 0, out.stderr
                header, *rows = out.stdout.strip().splitlines()
                assert rows and rows[-1].startswith("(") and len(rows) >= 2, out.stdout  # data rows + "(N rows)"
                assert expect in out.stdout, (command, out.stdout)
            assert "********" in admin_psql(px, "SHOW CONFIG").stdout
            assert px.cluster.app_password not in admin_psql(px, "SHOW CONFIG").stdout

            # Any driver can read the results: psycopg uses the extended protocol.
            dsn = px.dsn(dbname="pgbalance", user=ADMIN, password=ADMIN_PASSWORD)
            with psycopg.connect(dsn, autocommit=True) as console:
                cur = console.execute("SHOW POOLS")
                names = [c.name for c in cur.description]
                rows = cur.fetchall()
                assert {"database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "pool_size"} <= set(names)
                assert any(r[names.index("database")] == "appdb" and r[names.index("pool_size")] == 20 for r in rows)
                assert console.execute("SHOW STATS").fetchall()
                # PgBouncer's column names first (pgtwist's own may follow), and rows on a live proxy.
                # (SHOW FDS's cancel, password and scram keys are for PgBouncer's online restart, which
                # pgtwist does not do: always NULL, never a secret.)
                for what, first in [
                    ("USERS", ["name", "pool_mode"]),
                    ("STATS_AVERAGES", ["database", "xact_count", "query_count", "bytes_received", "bytes_sent",
                                        "xact_time", "query_time", "wait_time"]),
                    ("MEM", ["name", "size", "used", "free", "memtotal"]),
                    ("FDS", ["fd", "task", "user", "database", "addr", "port", "cancel", "link", "client_encoding",
                             "std_strings", "datestyle", "timezone", "password", "scram_client_key", "scram_server_key"]),
                ]:
                    cur = console.execute(f"SHOW {what}")
                    got = [c.name for c in cur.description]
                    assert got[: len(first)] == first, (what, got)
                    table = [dict(zip(got, r)) for r in cur.fetchall()]
                    assert table, what
                    if what == "USERS":
                        assert {r["name"] for r in table} >= {pg_cluster.app_user, ADMIN}, table
                    elif what == "STATS_AVERAGES":
                        assert [r["database"] for r in table] == ["appdb", "pgbouncer"], table  # (the console's row)
                    elif what == "FDS":  # the app's socket and its server connection's, no cancel key
                        tasks = {(r["task"], r["user"]) for r in table}
                        assert {("client", pg_cluster.app_user), ("server", pg_cluster.app_user)} <= tasks, table
                        assert all(r["cancel"] is None and isinstance(r["fd"], int) for r in table if r["task"] != "pooler"), table
                        assert all(r["password"] is None and r["scram_client_key"] is None for r in table), table
                        assert ("pooler", None) in tasks, table  # the listening socket, as PgBouncer lists it
                console.execute("PAUSE appdb")
                paused = dict(zip(names, console.execute("SHOW POOLS").fetchone()))
                assert paused["paused"] is True
                console.execute("RESUME")
                assert app.execute("SELECT 2").fetchone() == (2,)
                cur = console.execute("SHOW CLIENTS")
                cnames = [c.name for c in cur.description]
                app_id = next(r[cnames.index("id")] for r in cur.fetchall() if r[cnames.index("user")] == pg_cluster.app_user)
                console.execute(f"KILL {app_id}")
                with pytest.raises(psycopg.OperationalError):
                    app.execute("SELECT 3")
                with pytest.raises(psycopg.errors.SyntaxError):
                    console.execute("SHOW NOTHING")


def test_admin_console_refuses_other_users(pg_cluster, tmp_path):
    with start_ops_proxy(pg_cluster, tmp_path, {"admin": {"users": [ADMIN]}}, users=users(pg_cluster)) as px:
        with RawClient(px.host, px.port) as client:
            with pytest.raises(ServerError) as e:
                client.login(pg_cluster.app_user, "pgbalance", pg_cluster.app_password)
        assert e.value.sqlstate == "42501"
        out = admin_psql(px, "SHOW POOLS", user=pg_cluster.app_user, password=pg_cluster.app_password)
        assert out.returncode != 0 and "permission denied" in out.stderr


# --------------------------------------------------------------------------- metrics and probes


def test_metrics_healthz_readyz(pg_cluster, tmp_path):
    port = free_port(HOST)
    with start_ops_proxy(pg_cluster, tmp_path, {"metrics": {"listen": f"{HOST}:{port}"}}) as px:
        assert http_get(port, "/healthz") == (200, "ok\n")
        status, body = http_get(port, "/readyz")
        assert status == 200 and body.startswith("ready"), body
        with px.connect() as conn:
            conn.execute("SELECT 1")
            with conn.transaction():
                conn.execute("SELECT 2")
            status, text = http_get(port, "/metrics")
        assert status == 200
        for name in (
            "pgbalance_clients{",
            "pgbalance_servers{",
            "pgbalance_pool_size{",
            "pgbalance_pool_waits_total",
            "pgbalance_queries_total{",
            "pgbalance_transactions_total{",
            "pgbalance_transaction_duration_seconds_bucket{",
            "pgbalance_routing_decisions_total",
            "pgbalance_node_up{",
            "pgbalance_failovers_total",
            "pgbalance_errors_total",
        ):
            assert name in text, name
        # (The exposition lists labels in name order.)
        assert re.search(r'pgbalance_clients\{database="appdb",state="linked",user="[^"]+"\} 1\.0', text), text[:2000]
        assert http_get(port, "/nothing")[0] == 404


# --------------------------------------------------------------------------- reload


def test_sighup_applies_pool_size_and_new_database_keeping_idle_session(pg_cluster, tmp_path):
    settings = {"pool_size": 1, "query_wait_timeout": 1}
    with start_ops_proxy(pg_cluster, tmp_path, {}, **settings) as px:
        idle = px.connect()
        try:
            idle.execute("SET application_name = 'survivor'")
            # pool_size = 1 and the idle session holds that connection: another client gets 53300.
            with pytest.raises(psycopg.OperationalError, match="no server connection"):
                px.connect()
            databases = {
                "appdb": {"dbname": pg_cluster.app_database, "nodes": [pg_cluster.nodes[0].addr]},
                "appdb2": {"dbname": pg_cluster.app_database, "nodes": [pg_cluster.nodes[0].addr]},
            }
            rewrite_config(px, {}, **dict(settings, pool_size=2, databases=databases))
            offset = px.log_size()
            os.kill(px.pid, signal.SIGHUP)
            log = log_since(px, offset, "reload: ")
            wait_for(lambda: "applied" in px.log_text(offset), 10, "the reload to be applied")
            assert "pool_size" in px.log_text(offset), log
            with px.connect() as second:
                assert second.execute("SELECT 1").fetchone() == (1,)
            with px.connect(dbname="appdb2") as third:
                assert third.execute("SELECT current_database()").fetchone() == (pg_cluster.app_database,)
            # The idle session was not touched: same server connection, same settings.
            assert idle.execute("SHOW application_name").fetchone() == ("survivor",)
        finally:
            idle.close()
        assert px.alive()


def test_sighup_adding_a_replica_reaches_open_transaction_pooled_sessions(pg_cluster, tmp_path):
    """A reload that changes a database's nodes is followed by sessions already open, from
    their next transaction: here their reads start going to the replica just added."""
    primary, replica = pg_cluster.nodes[0].addr, pg_cluster.nodes[1].addr
    settings = {"pool_mode": "transaction", "health_check_interval": 0.2}
    one = {"appdb": {"dbname": pg_cluster.app_database, "nodes": [primary]}}
    with start_ops_proxy(pg_cluster, tmp_path, {}, databases=one, **settings) as px:
        with px.connect(autocommit=True) as open_session:
            assert open_session.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            two = {"appdb": {"dbname": pg_cluster.app_database, "nodes": [primary, replica]}}
            rewrite_config(px, {}, databases=two, **settings)
            offset = px.log_size()
            os.kill(px.pid, signal.SIGHUP)
            wait_for(lambda: "applied" in px.log_text(offset), 10, "the reload to be applied")

            def read_on_the_replica():
                return open_session.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)

            wait_for(read_on_the_replica, 15, "a read of the open session to reach the replica")
            # Work that writes still goes to the primary (txid_current() would fail on a replica).
            assert open_session.execute("SELECT txid_current() > 0, pg_is_in_recovery()").fetchone() == (True, False)
        assert px.alive()


def test_broken_config_on_sighup_keeps_serving(pg_cluster, tmp_path):
    with start_ops_proxy(pg_cluster, tmp_path, {}) as px:
        with px.connect() as conn:
            px.config_path.write_text('pool_size = 0\nlisten = "nowhere:x"\n[databases.appdb]\nnodes = []\n')
            offset = px.log_size()
            os.kill(px.pid, signal.SIGHUP)
            log = log_since(px, offset, "nothing changed")
            for key in ("pool_size", "listen", "databases.appdb.nodes"):
                assert key in log, log
            assert px.alive()
            assert conn.execute("SELECT 1").fetchone() == (1,)
            with px.connect() as other:
                assert other.execute("SELECT 2").fetchone() == (2,)


# --------------------------------------------------------------------------- shutdown


def test_sigterm_lets_an_open_transaction_commit_refuses_new_clients_and_exits(pg_cluster, tmp_path):
    table = "ops_drain_test"
    direct = pg_cluster.dsn(pg_cluster.nodes[0], connect_timeout=10)
    with psycopg.connect(direct, autocommit=True) as setup:
        setup.execute(f"DROP TABLE IF EXISTS {table}")
        setup.execute(f"CREATE TABLE {table} (v int)")
    metrics_port = free_port(HOST)
    tables = {"metrics": {"listen": f"{HOST}:{metrics_port}"}}
    with start_ops_proxy(pg_cluster, tmp_path, tables, shutdown_timeout=30) as px:
        busy = px.connect(autocommit=False)
        idle = px.connect()
        try:
            busy.execute(f"INSERT INTO {table} VALUES (1)")  # a transaction is open
            idle.execute("SELECT 1")
            os.kill(px.pid, signal.SIGTERM)
            wait_for(lambda: not port_accepts(HOST, px.port, 0.5), 10, "the listener to close")
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(px.dsn(connect_timeout=3))
            assert http_get(metrics_port, "/readyz")[0] == 503  # Kubernetes stops sending traffic
            # A client between transactions is told at once (57P01) ...
            with pytest.raises(psycopg.OperationalError, match="administrator command|closed"):
                idle.execute("SELECT 1")
            # ... one in a transaction finishes it.
            assert px.alive()
            busy.execute(f"INSERT INTO {table} VALUES (2)")
            busy.commit()
            px.process.wait(15)
            assert px.process.returncode == 0
        finally:
            busy.close()
            idle.close()
    with psycopg.connect(direct, autocommit=True) as check:
        assert check.execute(f"SELECT array_agg(v ORDER BY v) FROM {table}").fetchone() == ([1, 2],)
        check.execute(f"DROP TABLE {table}")
