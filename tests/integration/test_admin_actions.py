"""Admin-console actions against live traffic: DISABLE/ENABLE, RECONNECT + WAIT_CLOSE, KILL db + RESUME, SET.

Each test runs a real pgtwist (start_ops_proxy) in front of the session's real PostgreSQL primary and
checks what PgBouncer documents for the command (README "Coming from PgBouncer") from the clients' side
and, where it matters, from the node's (pg_stat_activity through the admin fixture).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.ops import start_ops_proxy
from tests.harness.proxy import RawClient, ServerError, error_fields_of, wait_for

pytestmark = pytest.mark.integration

ADMIN, ADMIN_PASSWORD = "admin", "admin-secret"


def users(cluster) -> dict:
    return {cluster.app_user: {"password": cluster.app_password}, ADMIN: {"password": ADMIN_PASSWORD}}


def console(px) -> psycopg.Connection:
    return psycopg.connect(px.dsn(dbname="pgbouncer", user=ADMIN, password=ADMIN_PASSWORD), autocommit=True)


def simple(conn, sql: str):
    """One simple-protocol Query, as psql and pgbouncer_exporter send admin commands."""
    cur = psycopg.ClientCursor(conn)
    cur.execute(sql)
    return cur


def in_background(fn) -> tuple[threading.Event, list]:
    """Run *fn* in a daemon thread; (done event, [its result or exception])."""
    done, out = threading.Event(), []

    def run():
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 - handed to the test
            out.append(e)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, out


def backend_alive(admin, pid: int) -> bool:
    return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 1


def test_disable_refuses_new_logins_with_55000_keeps_sessions_and_enable_restores(pg_cluster, tmp_path):
    """DISABLE db: a new login to db gets 55000 (as PostgreSQL for datallowconn = false) while a
    session already connected goes on; SHOW DATABASES says disabled = 1; ENABLE db lets logins in again."""
    with start_ops_proxy(pg_cluster, tmp_path, {"admin": {"users": [ADMIN]}}, users=users(pg_cluster)) as px:
        with px.connect() as existing, console(px) as admin_console:
            assert existing.execute("SELECT 1").fetchone() == (1,)
            simple(admin_console, "DISABLE appdb")
            with RawClient(px.host, px.port) as raw:
                with pytest.raises(ServerError) as refused:
                    raw.login(pg_cluster.app_user, "appdb", pg_cluster.app_password)
            assert refused.value.sqlstate == "55000", refused.value.fields
            assert "not currently accepting connections" in refused.value.fields["M"]
            assert existing.execute("SELECT 2").fetchone() == (2,)  # the session goes on
            cur = simple(admin_console, "SHOW DATABASES")
            row = dict(zip([c.name for c in cur.description], next(r for r in cur.fetchall() if r[0] == "appdb")))
            assert row["disabled"] == 1, row
            with pytest.raises(psycopg.errors.InvalidCatalogName):  # a database that is not there
                simple(admin_console, "DISABLE nosuchdb")
            simple(admin_console, "ENABLE appdb")
            with px.connect() as later:
                assert later.execute("SELECT 3").fetchone() == (3,)
            assert existing.execute("SELECT 4").fetchone() == (4,)


def wait_close_answer(waiter: RawClient, timeout: float) -> bool:
    """Whether the WAIT_CLOSE sent on *waiter* is answered (CommandComplete) within *timeout* s."""
    waiter.sock.settimeout(timeout)
    try:
        while (msg := waiter.read_message())[0] != p.READY_FOR_QUERY:
            assert msg[0] != p.ERROR_RESPONSE, msg
        return True
    except TimeoutError:
        return False


def test_reconnect_and_wait_close_move_idle_clients_to_new_backends(pg_cluster, admin, tmp_path):
    """Transaction pooling, two clients between transactions (each keeps its backend lent):
    RECONNECT db closes both backends (pg_stat_activity), WAIT_CLOSE db answers, and each client's
    next transaction runs on a new backend (pg_backend_pid changes)."""
    with start_ops_proxy(pg_cluster, tmp_path, {"admin": {"users": [ADMIN]}}, users=users(pg_cluster), pool_mode="transaction") as px:
        with px.connect() as one, px.connect(autocommit=False) as two, console(px) as admin_console:
            (two_pid,) = two.execute("SELECT pg_backend_pid()").fetchone()  # BEGIN: holds a backend ...
            (one_pid,) = one.execute("SELECT pg_backend_pid()").fetchone()  # ... so this one gets another
            two.commit()
            assert one_pid != two_pid
            simple(admin_console, "RECONNECT appdb")
            simple(admin_console, "WAIT_CLOSE appdb")
            wait_for(lambda: not backend_alive(admin, one_pid) and not backend_alive(admin, two_pid), 10,
                     "the reconnected backends to leave pg_stat_activity")
            assert one.execute("SELECT pg_backend_pid()").fetchone()[0] not in (one_pid, two_pid)
            assert two.execute("SELECT pg_backend_pid()").fetchone()[0] not in (one_pid, two_pid)
            two.commit()


def test_reconnect_lets_an_open_transaction_finish_then_wait_close_answers(pg_cluster, admin, tmp_path):
    """Transaction pooling. RECONNECT db while a transaction is open: it finishes on its backend
    undisturbed; WAIT_CLOSE db answers only once it has ended (PgBouncer: closed "after it is
    released, according to the pooling mode"); the old backend is gone and the client's next
    transaction runs on a new one."""
    with start_ops_proxy(pg_cluster, tmp_path, {"admin": {"users": [ADMIN]}}, users=users(pg_cluster), pool_mode="transaction") as px:
        with px.connect(autocommit=False) as busy, console(px) as admin_console, RawClient(px.host, px.port) as waiter:
            waiter.login(ADMIN, "pgbouncer", ADMIN_PASSWORD)
            (busy_pid,) = busy.execute("SELECT pg_backend_pid()").fetchone()  # BEGIN: a transaction is open
            simple(admin_console, "RECONNECT appdb")
            waiter.send(m.query("WAIT_CLOSE appdb"))
            assert not wait_close_answer(waiter, 1.0)  # the open transaction still holds its backend
            assert busy.execute("SELECT pg_backend_pid()").fetchone() == (busy_pid,)
            busy.commit()
            closed = wait_close_answer(waiter, 5.0)
            (next_pid,) = busy.execute("SELECT pg_backend_pid()").fetchone()
            busy.commit()
            # Both at once, so that a failure says which of the two (or both) is wrong.
            assert (closed, next_pid != busy_pid) == (True, True), "(WAIT_CLOSE answered, next transaction on a new backend)"
            wait_for(lambda: not backend_alive(admin, busy_pid), 10, "the RECONNECTed backend to leave pg_stat_activity")


def test_kill_db_closes_clients_with_57P01_and_new_logins_wait_until_resume(pg_cluster, admin, tmp_path):
    """KILL db (PgBouncer: drop every client and server connection of db now; new clients wait until
    RESUME): a connected client is sent FATAL 57P01 and closed, its backend leaves the node, a new
    client's connect + first query waits while KILLed and is served once RESUME is run."""
    with start_ops_proxy(pg_cluster, tmp_path, {"admin": {"users": [ADMIN]}}, users=users(pg_cluster)) as px:
        with console(px) as admin_console, RawClient(px.host, px.port) as victim:
            victim.login(pg_cluster.app_user, "appdb", pg_cluster.app_password)
            pid = int(victim.scalar("SELECT pg_backend_pid()"))
            simple(admin_console, "KILL appdb")
            fields = error_fields_of(victim.wait_closed(10))
            assert fields and fields["S"] == "FATAL" and fields["C"] == "57P01", fields
            wait_for(lambda: not backend_alive(admin, pid), 10, "the killed client's backend to leave the node")

            def newcomer():
                with px.connect() as conn:
                    return conn.execute("SELECT 42").fetchone()

            done, out = in_background(newcomer)
            assert not done.wait(1.5), out  # waits, as PgBouncer's new clients of a KILLed database
            simple(admin_console, "RESUME appdb")
            assert done.wait(10), "the waiting client was not served after RESUME"
            assert out == [(42,)], out


def test_set_changes_a_reloadable_setting_live_and_show_config_shows_it(pg_cluster, tmp_path):
    """SET query_wait_timeout = 1 on the console: SHOW CONFIG shows 1 and it applies at once (a client
    waiting for the one busy server connection is refused after ~1 s, not after the configured 60 s);
    a key that needs a restart is refused with 55P02 and left as it was."""
    overrides = dict(users=users(pg_cluster), pool_size=1, query_wait_timeout=60)
    with start_ops_proxy(pg_cluster, tmp_path, {"admin": {"users": [ADMIN]}}, **overrides) as px:
        with console(px) as admin_console, px.connect() as holder:
            holder.execute("SELECT 1")  # session pooling: holds the only server connection
            simple(admin_console, "SET query_wait_timeout = 1")
            config = {r[0]: r[1] for r in simple(admin_console, "SHOW CONFIG").fetchall()}
            assert float(config["query_wait_timeout"]) == 1, config["query_wait_timeout"]
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError, match="no server connection"):
                px.connect(connect_timeout=20).execute("SELECT 1")
            assert time.monotonic() - started < 10
            with pytest.raises(psycopg.errors.CantChangeRuntimeParam):
                simple(admin_console, "SET listen = '127.0.0.1:1'")
            config = {r[0]: r[1] for r in simple(admin_console, "SHOW CONFIG").fetchall()}
            assert config["listen"] == f"{px.host}:{px.port}", config["listen"]
            assert holder.execute("SELECT 2").fetchone() == (2,)
