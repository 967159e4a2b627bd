"""PgBouncer tooling against pgtwist: pgbouncer_exporter's exact queries, byte and login counters, log secrecy."""

from __future__ import annotations

import json
import re
import threading
import time

import psycopg
import pytest

from pgtwist.tools.localcluster import free_port

from tests.harness.ops import http_get, start_ops_proxy
from tests.harness.proxy import HOST, wait_for

pytestmark = pytest.mark.integration

ADMIN, ADMIN_PASSWORD = "admin", "admin-secret"
TEXT, INT4, NUMERIC = 25, 23, 1700

# prometheus-community/pgbouncer_exporter (collector.go): every column it reads, and the type PgBouncer
# 1.18 sends it as (lib/pq hands int4 back as int64, numeric as text it parses). Labels must arrive as
# text (a string), an int or NULL; metrics as numbers or parsable text.
EXPORTER_COLUMNS = {
    "databases": {
        "name": TEXT, "host": TEXT, "port": INT4, "database": TEXT, "force_user": TEXT, "pool_mode": TEXT,
        "pool_size": INT4, "min_pool_size": INT4, "reserve_pool": INT4, "max_connections": INT4,
        "current_connections": INT4, "paused": INT4, "disabled": INT4,
    },
    "stats": {
        "database": TEXT, "total_query_count": NUMERIC, "total_query_time": NUMERIC, "total_received": NUMERIC,
        "total_sent": NUMERIC, "total_wait_time": NUMERIC, "total_xact_count": NUMERIC, "total_xact_time": NUMERIC,
    },
    "stats_totals": {
        "database": TEXT, "query_count": NUMERIC, "query_time": NUMERIC, "bytes_received": NUMERIC, "bytes_sent": NUMERIC,
        "wait_time": NUMERIC, "xact_count": NUMERIC, "xact_time": NUMERIC,
    },
    "pools": {
        "database": TEXT, "user": TEXT, "cl_active": INT4, "cl_active_cancel_req": INT4, "cl_waiting": INT4,
        "cl_waiting_cancel_req": INT4, "sv_active": INT4, "sv_active_cancel": INT4, "sv_being_canceled": INT4,
        "sv_idle": INT4, "sv_used": INT4, "sv_tested": INT4, "sv_login": INT4, "maxwait": INT4, "maxwait_us": INT4,
    },
    # (Counted by user, database, state, addr_port, close_needed; lib/pq cannot scan a NULL into a string.)
    "servers": {"user": TEXT, "database": TEXT, "state": TEXT, "addr": TEXT, "port": INT4, "close_needed": INT4},
}


def users(cluster) -> dict:
    return {cluster.app_user: {"password": cluster.app_password}, ADMIN: {"password": ADMIN_PASSWORD}}


def simple(conn, sql: str):
    """What lib/pq's db.Query(sql) without arguments does: one simple-protocol Query."""
    cur = psycopg.ClientCursor(conn)
    cur.execute(sql)
    return cur


def test_waiting_clients_and_times_mean_what_pgbouncer_s_do(pg_cluster, tmp_path):
    """SHOW POOLS' cl_waiting counts a client waiting for a server connection, maxwait/maxwait_us
    say how long the oldest has waited (seconds, then the microseconds beyond them), and SHOW
    STATS_TOTALS' times are microseconds and wait_time the time clients waited: a dashboard built
    on PgBouncer's meanings reads pgtwist's the same way."""
    with start_ops_proxy(pg_cluster, tmp_path, {"admin": {"users": [ADMIN]}}, users=users(pg_cluster), pool_mode="transaction",
                         pool_size=1, query_wait_timeout=30) as px:
        dsn = px.dsn(dbname="pgbouncer", user=ADMIN, password=ADMIN_PASSWORD)
        with psycopg.connect(dsn, autocommit=True) as console, px.connect() as holder, px.connect() as waiter:

            def table(what: str) -> list[dict]:
                cur = simple(console, f"SHOW {what}")
                return [dict(zip([c.name for c in cur.description], row)) for row in cur.fetchall()]

            def totals() -> dict:
                return next(r for r in table("STATS_TOTALS") if r["database"] == "appdb")

            before = totals()
            holder.execute("SELECT pg_sleep(0.3)")  # a query of 0.3 s: 300,000 µs more query_time
            after = totals()
            assert 300_000 <= after["query_time"] - before["query_time"] < 3_000_000, (before, after)
            holder.execute("BEGIN")  # the pool's one connection is held now
            holder.execute("SELECT 1")
            done = threading.Event()
            thread = threading.Thread(target=lambda: (waiter.execute("SELECT 2"), done.set()), daemon=True)
            thread.start()
            time.sleep(1.3)
            pool = next(r for r in table("POOLS") if r["database"] == "appdb")
            assert (pool["cl_waiting"], pool["cl_active"], pool["sv_active"]) == (1, 1, 1), pool
            assert pool["maxwait"] == 1 and 0 <= pool["maxwait_us"] < 1_000_000, pool
            waited = pool["maxwait"] + pool["maxwait_us"] / 1e6
            assert 1.2 <= waited < 5, pool
            holder.execute("COMMIT")
            assert done.wait(10)
            thread.join(10)
            pool = next(r for r in table("POOLS") if r["database"] == "appdb")
            assert (pool["cl_waiting"], pool["maxwait"], pool["maxwait_us"]) == (0, 0, 0), pool
            wait_us = totals()["wait_time"] - after["wait_time"]
            assert 1_200_000 <= wait_us < 10_000_000, wait_us  # the waiter's wait, in microseconds


def test_pgbouncer_exporter_queries(pg_cluster, tmp_path):
    with start_ops_proxy(pg_cluster, tmp_path, {"admin": {"users": [ADMIN]}}, users=users(pg_cluster), pool_mode="transaction",
                         server_check_delay=0.5) as px:
        with px.connect() as app:
            app.execute("SELECT repeat('x', 5000)").fetchone()
            with app.transaction():
                app.execute("SELECT 1")
            dsn = px.dsn(dbname="pgbouncer", user=ADMIN, password=ADMIN_PASSWORD)
            with psycopg.connect(dsn, autocommit=True) as console:
                assert simple(console, "SHOW STATS").fetchall()  # the exporter's ping
                cur = simple(console, "SHOW VERSION;")
                assert [c.name for c in cur.description] == ["version"]
                assert re.match(r"pgtwist \d", cur.fetchone()[0])
                cur = simple(console, "SHOW LISTS;")
                assert len(cur.description) == 2
                lists = {name: float(items) for name, items in cur.fetchall()}
                assert {"databases", "users", "pools", "free_clients", "used_clients", "login_clients",
                        "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries"} <= set(lists)
                assert lists["databases"] == 2 and lists["used_clients"] >= 2  # appdb and the console, "pgbouncer"
                cur = simple(console, "SHOW CONFIG;")
                assert len(cur.description) in (3, 4)
                config = {row[0]: row[1] for row in cur.fetchall()}
                float(config["max_client_conn"])  # the exporter parses it as a number
                for namespace, wanted in EXPORTER_COLUMNS.items():
                    cur = simple(console, f"SHOW {namespace};")
                    types = {c.name: c.type_code for c in cur.description}
                    rows = [dict(zip(types, r)) for r in cur.fetchall()]
                    for column, oid in wanted.items():
                        assert types.get(column) == oid, (namespace, column, types.get(column))
                    labels = [(r.get("database") or r.get("name"), r.get("user")) for r in rows]
                    if namespace != "servers":
                        assert len(labels) == len(set(labels)), (namespace, labels)  # duplicates break a scrape
                    assert rows, namespace
                    assert all(r[c] is not None for r in rows for c, oid in wanted.items() if namespace == "servers"), rows
                pools = {r[0]: r for r in simple(console, "SHOW POOLS").fetchall()}
                assert pools["pgbouncer"][1] == "pgbouncer"  # the console's pool, as PgBouncer shows it
                cur = simple(console, "SHOW STATS_TOTALS")
                totals = dict(zip([c.name for c in cur.description], cur.fetchone()))
                assert totals["database"] == "appdb"
                assert totals["bytes_sent"] > 5000 and totals["bytes_received"] > 0
                assert totals["query_count"] >= 3 and totals["xact_count"] >= 2 and totals["query_time"] > 0
                assert "appdb" in pools
                # The app, idle between transactions, keeps its server connection only until
                # somebody needs it: idle, as PgBouncer counts it (not a full pool on a dashboard).
                cur = simple(console, "SHOW POOLS")
                row = dict(zip([c.name for c in cur.description], cur.fetchone()))
                assert (row["sv_active"], row["sv_idle"] + row["sv_used"], row["cl_active"]) == (0, 1, 1), row
                cur = simple(console, "SHOW SERVERS")
                server = dict(zip([c.name for c in cur.description], cur.fetchone()))
                assert server["state"] == "idle" and server["link"], server
                # sv_used: the app's server connection, idle past server_check_delay once the app left.
                app.close()
                columns = [c.name for c in simple(console, "SHOW POOLS").description]
                for _ in range(50):
                    row = dict(zip(columns, simple(console, "SHOW POOLS").fetchone()))
                    if row["sv_used"]:
                        break
                    time.sleep(0.1)
                assert (row["sv_used"], row["sv_idle"], row["sv_active"], row["sv_tested"]) == (1, 0, 0, 0), row


def test_byte_and_login_counters_and_bounded_route_labels(pg_cluster, tmp_path):
    port = free_port(HOST)
    tables = {"metrics": {"listen": f"{HOST}:{port}"}}
    with start_ops_proxy(pg_cluster, tmp_path, tables, users=users(pg_cluster)) as px:
        with px.connect() as app:
            app.execute("SELECT repeat('y', 20000)").fetchone()
            for i in range(3):
                with pytest.raises(psycopg.errors.UndefinedFunction):
                    app.execute(f"SELECT nosuch_fn_{i}_zq()")
        bad = px.dsn(password="wrong-password")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(bad).close()
        status, text = http_get(port, "/metrics")
        assert status == 200
        sent = re.search(r'pgbalance_client_sent_bytes_total\{database="appdb"\} ([0-9.e+]+)', text)
        received = re.search(r'pgbalance_client_received_bytes_total\{database="appdb"\} ([0-9.e+]+)', text)
        assert sent and float(sent.group(1)) > 20000, text[:3000]
        assert received and float(received.group(1)) > 0
        assert re.search(r'pgbalance_server_logins_total\{node="[^"]+",result="ok"\} [1-9]', text), text[:3000]
        assert "nosuch_fn" not in text


def test_json_logs_at_debug_carry_fields_and_never_a_secret(pg_cluster, tmp_path):
    secret = "topsecret-zq-4711"
    wrong = "wrong-secret-zq-0815"
    # deaddb: one node nobody listens on, so that some line is about a node (a failed server login):
    # the app's traffic alone (one-node database, no monitor) writes no line with a `node` field.
    dead = f"{HOST}:{free_port(HOST)}"
    databases = {
        "appdb": {"dbname": pg_cluster.app_database, "nodes": [pg_cluster.nodes[0].addr]},
        "deaddb": {"dbname": pg_cluster.app_database, "nodes": [dead]},
    }
    overrides = dict(log_format="json", log_level="debug", audit=[pg_cluster.app_user], users=users(pg_cluster),
                     databases=databases, query_wait_timeout=3)
    with start_ops_proxy(pg_cluster, tmp_path, {"admin": {"users": [ADMIN]}}, **overrides) as px:
        with px.connect() as app:
            with pytest.raises(psycopg.Error):
                app.execute(f"ALTER ROLE nosuch_role_zq WITH LOGIN PASSWORD '{secret}'")
            app.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(px.dsn(password=wrong)).close()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(px.dsn(dbname="deaddb")).close()
        with psycopg.connect(px.dsn(dbname="pgbouncer", user=ADMIN, password=ADMIN_PASSWORD), autocommit=True) as console:
            simple(console, "SHOW CONFIG").fetchall()
        text = px.log_text()
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert events and all({"ts", "level", "msg", "logger"} <= set(e) for e in events)
    assert not any(key.startswith("log_") for e in events for key in e)
    audited = [e for e in events if e["logger"] == "pgtwist.audit"]
    assert any("PASSWORD '********'" in e["msg"] for e in audited), audited
    connected = [e for e in events if "client" in e and e.get("user") == pg_cluster.app_user]
    assert connected and any(e.get("database") == "appdb" for e in connected)
    # ... and the node a line is about is a field of its own, as text (logs.py), e.g. on log_pooler_errors' line.
    assert any(e.get("node") == dead and e["level"] == "warn" for e in events), [e["msg"] for e in events]
    for needle in (secret, wrong, pg_cluster.app_password, ADMIN_PASSWORD):
        assert needle not in text, needle


def test_pause_waits_for_an_open_transaction_then_resume_serves(pg_cluster, tmp_path):
    with start_ops_proxy(pg_cluster, tmp_path, {"admin": {"users": [ADMIN]}}, users=users(pg_cluster), pool_mode="transaction") as px:
        dsn = px.dsn(dbname="pgbouncer", user=ADMIN, password=ADMIN_PASSWORD)
        with px.connect(autocommit=False) as app, psycopg.connect(dsn, autocommit=True) as console:
            app.execute("SELECT 1")  # BEGIN (psycopg, not autocommit): a transaction is open
            done = threading.Event()
            errors = []

            def pause():
                try:
                    simple(console, "PAUSE appdb")
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                done.set()

            worker = threading.Thread(target=pause, daemon=True)
            worker.start()
            assert not done.wait(1.0), errors  # PgBouncer's PAUSE: not while a transaction is open
            app.commit()
            assert done.wait(10), "PAUSE never answered after COMMIT"
            assert not errors, errors
            pools = simple(console, "SHOW POOLS")
            names = [c.name for c in pools.description]
            row = dict(zip(names, next(r for r in pools.fetchall() if r[0] == "appdb")))
            assert row["paused"] is True and row["sv_active"] == 0 and row["sv_idle"] == 0
            simple(console, "RESUME appdb")
            assert app.execute("SELECT 2").fetchone() == (2,)
            app.commit()


BAD_ROLE = "pgtw_badpw_zq"


def _clients_of(px, user: str) -> list:
    """SHOW CLIENTS rows of *user* (via the admin console, as PgBouncer's users read them)."""
    dsn = px.dsn(dbname="pgbouncer", user=ADMIN, password=ADMIN_PASSWORD)
    with psycopg.connect(dsn, autocommit=True) as console:
        cur = simple(console, "SHOW CLIENTS")
        names = [c.name for c in cur.description]
        return [r for r in cur.fetchall() if r[names.index("user")] == user]


def test_failed_server_logins_are_logged_per_log_pooler_errors_and_counted(pg_cluster, admin, tmp_path):
    """PgBouncer's log_pooler_errors: a server login the node refuses (wrong password toward it) is a
    warn line "server login to NODE failed: ..." and pgbalance_server_logins_total{result="login_failed"};
    a node that refuses the TCP connection counts as result="connect_failed". With log_pooler_errors =
    false the line is gone (the counter stays). log_level = "warn" drops info lines ("connected from",
    log_connections = true) while this warn line is kept."""
    admin.execute(f"DROP ROLE IF EXISTS {BAD_ROLE}")
    admin.execute(f"CREATE ROLE {BAD_ROLE} LOGIN PASSWORD 'the-node-knows-this-zq'")
    try:
        user_table = dict(users(pg_cluster), **{BAD_ROLE: {"password": "pgtwist-thinks-this-zq"}})
        dead = f"{HOST}:{free_port(HOST)}"  # nobody listens there: connection refused
        databases = {
            "appdb": {"dbname": pg_cluster.app_database, "nodes": [pg_cluster.nodes[0].addr]},
            "deaddb": {"dbname": pg_cluster.app_database, "nodes": [dead]},
        }
        for pooler_errors in (True, False):
            port = free_port(HOST)
            tables = {"admin": {"users": [ADMIN]}, "metrics": {"listen": f"{HOST}:{port}"}}
            with start_ops_proxy(pg_cluster, tmp_path / str(pooler_errors), tables, users=user_table, databases=databases,
                                 log_pooler_errors=pooler_errors, log_level="warn", log_connections=True,
                                 query_wait_timeout=3) as px:
                with pytest.raises(psycopg.OperationalError):
                    psycopg.connect(px.dsn(user=BAD_ROLE, password="pgtwist-thinks-this-zq")).close()
                with pytest.raises(psycopg.OperationalError):
                    psycopg.connect(px.dsn(dbname="deaddb")).close()
                status, text = http_get(port, "/metrics")
                assert status == 200
                failed = re.search(r'pgbalance_server_logins_total\{node="[^"]+",result="login_failed"\} ([0-9.e+]+)', text)
                assert failed and float(failed.group(1)) >= 1, text[:3000]
                refused = re.search(rf'pgbalance_server_logins_total\{{node="{re.escape(dead)}",result="connect_failed"\}} ([0-9.e+]+)', text)
                assert refused and float(refused.group(1)) >= 1, text[:3000]
                log = px.log_text()
                login_line = re.search(r"server login to \S+ failed: password authentication failed", log)
                connect_line = re.search(rf"server login to {re.escape(dead)} failed", log)
                if pooler_errors:
                    assert login_line and connect_line, log[-3000:]
                else:
                    assert not login_line and not connect_line, log[-3000:]
                assert "connected from" not in log, log[-3000:]  # an info line, under log_level = "warn"
    finally:
        admin.execute(f"DROP ROLE IF EXISTS {BAD_ROLE}")


def test_log_disconnections_writes_or_omits_the_line_a_client_leaves_with(pg_cluster, tmp_path):
    """log_disconnections = true: a client that leaves gets "client cN disconnected: USER@DB, ..."
    (log_connections: "client cN connected from ADDR"); false: no disconnect line, though the client
    is gone (SHOW CLIENTS) and the connect line of the same client is still written."""
    for disconnections in (True, False):
        with start_ops_proxy(pg_cluster, tmp_path / str(disconnections), {"admin": {"users": [ADMIN]}}, users=users(pg_cluster),
                             log_connections=True, log_disconnections=disconnections) as px:
            with px.connect() as app:
                app.execute("SELECT 1")
            line = f"disconnected: {pg_cluster.app_user}@appdb"
            if disconnections:
                wait_for(lambda: line in px.log_text(), 10, "the disconnect line")
            else:
                wait_for(lambda: not _clients_of(px, pg_cluster.app_user), 10, "the app client to be gone")
                assert line not in px.log_text(), px.log_text()[-3000:]
            assert re.search(r"client \S+ connected from 127\.0\.0\.1:\d+", px.log_text()), px.log_text()[-3000:]
