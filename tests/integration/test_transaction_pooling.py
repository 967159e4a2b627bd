"""Transaction pooling end to end: many clients over a few server connections, real drivers, what follows a client.

Most tests share one proxy (pool_mode="transaction", pool_size=4); tests that need other
settings start their own. Server connections are shared, so every test looks at what a
client sees (its settings, its statements, its results), never at which connection it got
unless the point is that it must (pins) or that it may differ (settings follow the client).
"""

from __future__ import annotations

import asyncio
import re
import time

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.proxy import RawClient, ServerError, error_fields_of, start_proxy, wait_for
from tests.harness.txhelpers import (
    TX_CONFIG,
    Worker,
    batch,
    bind,
    close,
    describe,
    execute,
    libpq_copy_in,
    parse,
    pgbench,
    proxy_backends,
    raw_login,
    run_async,
    run_threads,
    sync,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def txproxy(pg_cluster, tmp_path_factory):
    with start_proxy(pg_cluster, tmp_path_factory.mktemp("txproxy"), **TX_CONFIG) as px:
        yield px


def test_twistd_runs_pgtwist_on_its_own_reactor(txproxy):
    """`twistd pgbalance` installs ProxyReactor (docs/BENCHMARKS.md says why); losing it would
    silently cost about a quarter of the CPU per transaction."""
    assert "reactor class: pgtwist.transport.reactor.ProxyReactor." in txproxy.log_text()


def warm(proxy, n: int) -> set[int]:
    """Make the pool open *n* server connections (n clients in a transaction at once); their backend pids."""
    conns = [proxy.connect() for _ in range(n)]
    try:
        pids = set()
        for c in conns:
            c.execute("BEGIN")
            pids.add(c.execute("SELECT pg_backend_pid()").fetchone()[0])
        for c in conns:
            c.execute("COMMIT")
        assert len(pids) == n
        return pids
    finally:
        for c in conns:
            c.close()


def backend_pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


# --------------------------------------------------------------------------- pgbench


@pytest.fixture(scope="module")
def pgbench_tables(txproxy):
    pgbench(txproxy, "-i", "-s", "1", "-q")
    yield
    with txproxy.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history")


def _pgbench_counts(out: str) -> tuple[int, int]:
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert processed, out[-3000:]
    return int(processed.group(1)), int(failed.group(1)) if failed else 0


def test_pgbench_prepared_select_only_32_clients_over_4(txproxy, pgbench_tables):
    out = pgbench(txproxy, "-M", "prepared", "-S", "-c", "32", "-j", "2", "-T", "5", "-n", timeout=40)
    processed, failed = _pgbench_counts(out)
    assert failed == 0, out[-3000:]
    assert processed > 100, out[-3000:]


def test_pgbench_extended_tpcb_16_clients_over_4(txproxy, pgbench_tables):
    out = pgbench(txproxy, "-M", "extended", "-c", "16", "-j", "2", "-T", "5", "-n", timeout=40)
    processed, failed = _pgbench_counts(out)
    assert failed == 0, out[-3000:]
    assert processed > 50, out[-3000:]


# --------------------------------------------------------------------------- drivers


def test_asyncpg_100_connections_over_4(txproxy):
    """asyncpg prepares a named statement for every query: 100 clients share 4 server connections."""

    async def client(i: int) -> int:
        conn = await asyncpg.connect(**txproxy.asyncpg_kwargs())
        try:
            total = 0
            for k in range(3):
                row = await conn.fetchrow("SELECT $1::int * 2 AS twice, $2::text AS tag", i + k, f"c{i}")
                assert (row["twice"], row["tag"]) == (2 * (i + k), f"c{i}")
                total += row["twice"]
            assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
            rows = await conn.fetch("SELECT g FROM generate_series(1, $1::int) g", 5)
            assert [r["g"] for r in rows] == [1, 2, 3, 4, 5]
            async with conn.transaction():
                a = await conn.fetchval("SELECT $1::int + 1", i)
                b = await conn.fetchval("SELECT txid_current()")
                assert await conn.fetchval("SELECT txid_current()") == b  # one transaction, one server
                total += a
            return total
        finally:
            await conn.close()

    async def main():
        return await asyncio.gather(*(client(i) for i in range(100)))

    results = run_async(main(), timeout=60)
    assert results == [sum(2 * (i + k) for k in range(3)) + i + 1 for i in range(100)]


def test_psycopg_prepare_threshold_0_from_20_threads(txproxy):
    def work(i: int) -> int:
        with psycopg.connect(txproxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
            for k in range(10):
                assert conn.execute("SELECT %s::int + %s::int", (i, k)).fetchone() == (i + k,)
                assert conn.execute("SELECT %s::text || '-' || %s::text", (f"t{i}", k)).fetchone() == (f"t{i}-{k}",)
            with conn.transaction():
                xid = conn.execute("SELECT txid_current()").fetchone()[0]
                assert conn.execute("SELECT txid_current() = %s::bigint", (xid,)).fetchone() == (True,)
            return i

    assert run_threads(work, 20, timeout=60) == list(range(20))


# --------------------------------------------------------------------------- settings that follow a client


def test_search_path_follows_each_client(txproxy, admin):
    admin.execute("CREATE SCHEMA IF NOT EXISTS tx_sp_a")
    admin.execute("CREATE SCHEMA IF NOT EXISTS tx_sp_b")
    admin.execute(f"GRANT USAGE ON SCHEMA tx_sp_a, tx_sp_b TO {txproxy.user}")
    warm(txproxy, 4)
    with txproxy.connect() as a, txproxy.connect() as b, txproxy.connect() as c, txproxy.connect() as d, txproxy.connect() as e:
        default = c.execute("SHOW search_path").fetchone()[0]
        a.execute("SET search_path TO tx_sp_a, public")
        b.execute("SET search_path TO tx_sp_b")
        pids = {"a": set(), "b": set()}
        for i in range(15):
            for name, conn, want in (("a", a, "tx_sp_a, public"), ("b", b, "tx_sp_b")):
                assert conn.execute("SHOW search_path").fetchone()[0] == want, (name, i)
                with conn.transaction():
                    assert conn.execute("SELECT (current_schemas(false))[1]").fetchone()[0] == want.split(",")[0]
                    pids[name].add(backend_pid(conn))
            assert c.execute("SHOW search_path").fetchone()[0] == default
            # Now and then hold three of the four connections at once: a and b keep theirs
            # between transactions only while nobody else needs one, so they must move.
            if i % 3 == 0:
                with c.transaction(), d.transaction(), e.transaction():
                    for other in (c, d, e):
                        other.execute("SELECT 1")
                    assert a.execute("SHOW search_path").fetchone()[0] == "tx_sp_a, public"
        assert default == '"$user", public'
        # The point: the setting followed the client across server connections.
        assert len(pids["a"]) > 1 and len(pids["b"]) > 1, pids
        # RESET goes back to the default, and stays there.
        a.execute("RESET search_path")
        for _ in range(4):
            assert a.execute("SHOW search_path").fetchone()[0] == default
            assert b.execute("SHOW search_path").fetchone()[0] == "tx_sp_b"


def test_application_name_follows_its_client(txproxy):
    warm(txproxy, 4)
    sql = "SELECT current_setting('application_name'), (SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid())"
    with txproxy.connect(application_name="tx-startup-app") as a, txproxy.connect(application_name="tx-b0") as b, txproxy.connect() as c:
        b.execute("SET application_name = 'tx-set-app'")
        assert b.info.parameter_status("application_name") == "tx-set-app"
        for i in range(12):
            assert a.execute(sql).fetchone() == ("tx-startup-app", "tx-startup-app"), i
            assert b.execute(sql).fetchone() == ("tx-set-app", "tx-set-app"), i
            assert c.execute(sql).fetchone() == ("", ""), i
            with a.transaction():
                assert a.execute(sql).fetchone() == ("tx-startup-app", "tx-startup-app")
                b.execute("SELECT 1")  # b takes another connection meanwhile
        b.execute("SET application_name = 'tx-set-again'")
        for _ in range(3):
            assert b.execute(sql).fetchone() == ("tx-set-again", "tx-set-again")
            assert a.execute(sql).fetchone() == ("tx-startup-app", "tx-startup-app")


def test_startup_options_follow_the_client_and_set_local_stays_in_its_transaction(txproxy):
    warm(txproxy, 4)
    with txproxy.connect(options="-c statement_timeout=1234") as a, txproxy.connect() as other:
        for i in range(10):
            assert a.execute("SHOW statement_timeout").fetchone()[0] == "1234ms", i
            assert other.execute("SHOW statement_timeout").fetchone()[0] == "0", i
            with a.transaction():
                a.execute("SET LOCAL statement_timeout = '5s'")
                assert a.execute("SHOW statement_timeout").fetchone()[0] == "5s"
                assert other.execute("SHOW statement_timeout").fetchone()[0] == "0"
            assert a.execute("SHOW statement_timeout").fetchone()[0] == "1234ms", i
        # The startup setting really applies: a query longer than 1.234 s is cancelled.
        with pytest.raises(pgerrors.QueryCanceled):
            a.execute("SELECT pg_sleep(3)")
        assert a.execute("SHOW statement_timeout").fetchone()[0] == "1234ms"
        # A session-level SET replaces it for this client only.
        a.execute("SET statement_timeout = '7s'")
        for _ in range(3):
            assert a.execute("SHOW statement_timeout").fetchone()[0] == "7s"
            assert other.execute("SHOW statement_timeout").fetchone()[0] == "0"


def test_reset_returns_to_the_startup_value(txproxy):
    with txproxy.connect(options="-c statement_timeout=1234", application_name="tx-reset-app") as a:
        a.execute("SET statement_timeout = '7s'")
        assert a.execute("RESET statement_timeout").statusmessage == "RESET"  # its own tag, as sent
        assert a.execute("SHOW statement_timeout").fetchone()[0] == "1234ms"
        a.execute("SET application_name = 'other'")
        a.execute("SET application_name TO DEFAULT")
        assert a.execute("SELECT current_setting('application_name')").fetchone()[0] == "tx-reset-app"
        a.commit()
        # ... and it stays so on whichever connection serves the client next.
        for _ in range(3):
            with a.transaction():
                assert a.execute("SHOW statement_timeout").fetchone()[0] == "1234ms"
    with txproxy.connect(autocommit=True, options="-c search_path=pg_catalog,public") as b:
        b.execute("SET search_path TO public")
        b.execute("RESET search_path")  # simple protocol: psycopg sends no parameters here
        # Exactly as a direct connection shows it: the startup value as given.
        assert b.execute("SHOW search_path").fetchone()[0] == "pg_catalog,public"


@pytest.mark.parametrize("prepare", [False, True], ids=["simple", "extended"])
@pytest.mark.parametrize("statement", ["RESET ALL", "DISCARD ALL"])
def test_reset_all_and_discard_all_return_to_the_startup_settings(txproxy, statement, prepare):
    """As on a direct connection: a startup packet's settings are the session's defaults."""
    warm(txproxy, 4)
    opts = "-c statement_timeout=1234 -c search_path=pg_catalog,public"
    show = "SELECT current_setting('statement_timeout'), current_setting('search_path'), current_setting('application_name'), current_setting('work_mem')"
    startup = ("1234ms", "pg_catalog,public", "tx-resetall-app", "4MB")
    with txproxy.connect(autocommit=True, options=opts, application_name="tx-resetall-app") as a, txproxy.connect(autocommit=True) as other:
        assert a.execute(show).fetchone() == startup
        a.execute("SET statement_timeout = '7s'")
        a.execute("SET search_path TO public")
        a.execute("SET application_name = 'changed'")
        a.execute("SET work_mem = '7MB'")
        assert a.execute(show).fetchone() == ("7s", "public", "changed", "7MB")
        a.execute(statement, prepare=prepare)
        # The driver hears of the restored setting before the statement's ReadyForQuery.
        assert a.info.parameter_status("application_name") == "tx-resetall-app"
        for i in range(6):  # ... on whichever connection serves it next
            assert a.execute(show).fetchone() == startup, i
            assert other.execute("SHOW statement_timeout").fetchone()[0] == "0", i
        # Inside a transaction it is transactional, the restored values with it.
        a.execute("SET work_mem = '7MB'")
        with a.transaction(force_rollback=True):
            if statement == "RESET ALL":
                a.execute(statement, prepare=prepare)
                assert a.execute(show).fetchone() == startup
        assert a.execute(show).fetchone() == startup[:3] + ("7MB",)


def test_reset_all_in_a_failed_transaction_fails_as_postgresql_s_does(txproxy):
    with txproxy.connect(autocommit=True, application_name="tx-failed-app") as a:
        a.execute("SET application_name = 'changed'")
        a.execute("BEGIN")
        with pytest.raises(pgerrors.DivisionByZero):
            a.execute("SELECT 1/0")
        with pytest.raises(pgerrors.InFailedSqlTransaction):
            a.execute("RESET ALL")
        a.execute("ROLLBACK")
        assert a.execute("SHOW application_name").fetchone()[0] == "changed"
        a.execute("RESET ALL")
        assert a.execute("SHOW application_name").fetchone()[0] == "tx-failed-app"


# --------------------------------------------------------------------------- pins


def test_listen_notify_pins_the_client(txproxy):
    with txproxy.connect() as listener, txproxy.connect() as sender:
        listener.execute("LISTEN tx_chan")
        pid = backend_pid(listener)
        sender.execute("SELECT pg_notify('tx_chan', 'hello')")
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert [(n.channel, n.payload) for n in got] == [("tx_chan", "hello")]
        for i in range(5):
            with listener.transaction():
                assert backend_pid(listener) == pid, i
            sender.execute("NOTIFY tx_chan, 'again'")
        got = list(listener.notifies(timeout=10, stop_after=5))
        assert [n.payload for n in got] == ["again"] * 5
    assert "pinned to its server connection: LISTEN" in txproxy.log_text()


def test_session_advisory_lock_pins_and_is_held_across_transactions(txproxy, admin):
    key = 424242
    with txproxy.connect() as holder, txproxy.connect() as other:
        holder.execute("SELECT pg_advisory_lock(%s)", (key,))
        pid = backend_pid(holder)
        for i in range(5):
            with holder.transaction():
                assert backend_pid(holder) == pid, i
            held = admin.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND granted", (key,)
            ).fetchall()
            assert held == [(pid,)], i
            assert other.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone() == (False,)
        assert holder.execute("SELECT pg_advisory_unlock(%s)", (key,)).fetchone() == (True,)
        assert other.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone() == (True,)
    assert not admin.execute("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = %s", (key,)).fetchall()


def test_temp_table_survives_across_transactions(txproxy):
    with txproxy.connect() as conn, txproxy.connect() as other:
        conn.execute("CREATE TEMP TABLE tx_tmp (x int)")
        for i in range(6):
            with conn.transaction():
                conn.execute("INSERT INTO tx_tmp VALUES (%s)", (i,))
            other.execute("SELECT 1")
        assert conn.execute("SELECT array_agg(x ORDER BY x) FROM tx_tmp").fetchone() == ([0, 1, 2, 3, 4, 5],)
        assert other.execute("SELECT to_regclass('pg_temp.tx_tmp')").fetchone() == (None,)
    # Once the pinned client leaves, its connection is reset before anyone else gets it.
    for _ in range(4):
        with txproxy.connect() as conn:
            assert conn.execute("SELECT to_regclass('pg_temp.tx_tmp')").fetchone() == (None,)


@pytest.mark.parametrize("reset", ["", "RESET ALL", "DEALLOCATE ALL"])
def test_without_discard_all_a_pinned_clients_connection_is_closed_not_handed_on(pg_cluster, tmp_path, reset):
    """server_reset_query = "" (PgBouncer uses none in transaction pooling), or one that leaves the
    role and the tables: the next client of the pool ran as the role a pinned client had SET,
    and saw its temporary table."""
    with start_proxy(pg_cluster, tmp_path, **dict(TX_CONFIG, pool_size=1, server_reset_query=reset)) as px:
        with px.connect() as conn:
            login = conn.execute("SELECT current_user").fetchone()[0]
        pg_cluster.psql(pg_cluster.nodes[0], f"CREATE ROLE tx_lowpriv_role; GRANT tx_lowpriv_role TO {login}")
        try:
            for pin in ("SET ROLE tx_lowpriv_role", "CREATE TEMP TABLE tx_left_behind (x int)"):
                with px.connect() as conn:
                    conn.execute(pin)
                for _ in range(3):
                    with px.connect() as conn:
                        assert conn.execute("SELECT current_user, to_regclass('pg_temp.tx_left_behind')").fetchone() == (login, None)
            # (Clients that pin nothing keep sharing the connection as before.)
            with px.connect() as a:
                pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
            with px.connect() as b:
                assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        finally:
            pg_cluster.psql(pg_cluster.nodes[0], "DROP ROLE tx_lowpriv_role")


def test_unpoolable_error_refuses_and_the_session_goes_on(pg_cluster, tmp_path):
    with start_proxy(pg_cluster, tmp_path, **dict(TX_CONFIG, unpoolable="error")) as px:
        with px.connect() as conn:
            with pytest.raises(pgerrors.FeatureNotSupported) as info:
                conn.execute("LISTEN tx_refused")  # simple query
            assert info.value.sqlstate == "0A000"
            assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)
            with pytest.raises(pgerrors.FeatureNotSupported):
                conn.execute("SELECT pg_advisory_lock(%s)", (1,), prepare=True)  # extended protocol
            assert conn.execute("SELECT %s::int", (5,)).fetchone() == (5,)
            with conn.transaction():
                with pytest.raises(pgerrors.FeatureNotSupported):
                    with conn.transaction():
                        conn.execute("CREATE TEMP TABLE tx_refused (x int)")
                assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert "pinned" not in px.log_text()


# --------------------------------------------------------------------------- cancel


def test_cancel_hits_only_its_own_client(pg_cluster, tmp_path, admin):
    with start_proxy(pg_cluster, tmp_path, **dict(TX_CONFIG, pool_size=2)) as px:
        with px.connect() as a, px.connect() as b, px.connect() as idle:
            assert idle.execute("SELECT 1").fetchone() == (1,)
            wa = Worker(lambda: a.execute("SELECT pg_sleep(10) /* tx-cancel-a */").fetchone())
            wb = Worker(lambda: b.execute("SELECT pg_sleep(2), 'b done' /* tx-cancel-b */").fetchone())
            wa.start()
            wb.start()

            def running():
                rows = admin.execute(
                    "SELECT query FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%tx-cancel-%' AND pid <> pg_backend_pid()"
                ).fetchall()
                return len(rows) == 2

            try:
                wait_for(running, 10, "both sleeps to run on the node")
                # A cancel for a client holding no server connection: nothing happens to anyone.
                idle.cancel_safe(timeout=5)
                until = time.monotonic() + 0.5
                while time.monotonic() < until:
                    assert running(), "a cancel for an idle client cancelled someone else's query"
                    time.sleep(0.05)
                start = time.monotonic()
                a.cancel_safe(timeout=5)
                wa.finish(5)
            finally:
                if wa.is_alive():
                    admin.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE '%tx-cancel-a%' AND pid <> pg_backend_pid()")
                    wa.join(10)
            assert isinstance(wa.error, pgerrors.QueryCanceled), wa.error
            assert wa.error.sqlstate == "57014"
            assert wa.finished_at - start < 3
            wb.finish(10)
            assert wb.error is None, wb.error
            assert wb.result == ("", "b done")
            assert wb.finished_at - start > 0.5  # b slept its full 2 s, not cut short
            for conn in (a, b, idle):
                assert conn.execute("SELECT 'after'").fetchone() == ("after",)
            # Cancelling an idle client again, then using it: still harmless.
            idle.cancel_safe(timeout=5)
            assert idle.execute("SELECT %s::int", (3,)).fetchone() == (3,)


def running(admin, tag: str) -> int:
    """How many backends on the primary run a statement carrying *tag* right now."""
    sql = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s AND pid <> pg_backend_pid()"
    return admin.execute(sql, (f"%{tag}%",)).fetchone()[0]


def test_terminate_during_a_statement_ends_the_client_at_once_and_cancels_the_statement(txproxy, admin):
    """psycopg's close() from one thread while another waits in execute() sends a Query, then a
    Terminate. pgtwist acts on the Terminate at once, as PgBouncer does: not one byte more, only
    the end of the connection, and the statement cancelled on its node. (PostgreSQL reads the
    Terminate only when the statement ends, and sends its answer first: ClientSession._terminate.)"""
    tag = f"terminated_{time.monotonic_ns()}"
    with raw_login(txproxy) as client:
        client.send(m.query(f"SELECT pg_sleep(30) /* {tag} */"))
        wait_for(lambda: running(admin, tag) == 1, 10, "the statement to run on the primary")
        started = time.monotonic()
        client.send(m.terminate())
        assert client.wait_closed(5) == b""
        assert time.monotonic() - started < 2
    wait_for(lambda: running(admin, tag) == 0, 10, "the statement to be cancelled")
    with txproxy.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------- prepared statements across clients


def test_discard_and_deallocate_do_not_disturb_other_clients(txproxy):
    queries = ["SELECT %s::int + 1", "SELECT %s::int * 3", "SELECT %s::text || 'x'"]
    expected = [lambda v: v + 1, lambda v: v * 3, lambda v: f"{v}x"]

    def run_all(conn, v):
        for q, f in zip(queries, expected):
            arg = str(v) if "text" in q else v
            assert conn.execute(q, (arg,)).fetchone() == (f(arg),), q

    warm(txproxy, 4)
    with psycopg.connect(txproxy.dsn(), autocommit=True, prepare_threshold=0) as a, psycopg.connect(
        txproxy.dsn(), autocommit=True, prepare_threshold=0
    ) as b:
        for v in range(3):
            run_all(a, v)
            run_all(b, v)
        a.execute("DISCARD ALL")
        for v in range(3, 8):
            run_all(b, v)
            run_all(a, v)
        a.execute("DEALLOCATE ALL")
        for v in range(8, 12):
            run_all(b, v)
            run_all(a, v)
        with b.transaction():
            run_all(b, 12)
            a.execute("DEALLOCATE ALL")
            run_all(a, 12)
            run_all(b, 13)
    # DEALLOCATE of one of the client's own protocol-level statements (psycopg names them _pg3_N).
    with psycopg.connect(txproxy.dsn(), autocommit=True, prepare_threshold=0) as a, psycopg.connect(
        txproxy.dsn(), autocommit=True, prepare_threshold=0
    ) as b:
        assert a.execute("SELECT %s::int + 100", (1,)).fetchone() == (101,)  # becomes _pg3_0
        assert b.execute("SELECT %s::int + 100", (2,)).fetchone() == (102,)  # same text: same server statement
        a.execute("DEALLOCATE _pg3_0")
        with pytest.raises(pgerrors.InvalidSqlStatementName):
            a.execute("SELECT %s::int + 100", (3,))  # a's name is gone, as PostgreSQL would have it...
        for v in range(5):
            assert b.execute("SELECT %s::int + 100", (v,)).fetchone() == (v + 100,)  # ...b's statement is not
            assert a.execute("SELECT %s::int - 100", (v,)).fetchone() == (v - 100,)
        with pytest.raises(pgerrors.InvalidSqlStatementName):
            a.execute("DEALLOCATE no_such_statement")
        assert a.execute("SELECT 'ok'").fetchone() == ("ok",)


# --------------------------------------------------------------------------- raw extended protocol


def test_parse_of_an_existing_name_is_42P05(txproxy):
    with raw_login(txproxy) as c:
        r = batch(c, parse("s1", "SELECT $1::int + 1"), sync())
        assert r.types == "1Z"
        r = batch(c, parse("s1", "SELECT 2"), bind("s1", ("1",)), execute(), sync())
        assert r.sqlstates == ["42P05"] and r.types == "EZ", r
        # The original s1 is intact.
        r = batch(c, bind("s1", ("41",)), execute(), sync())
        assert r.rows == [["42"]] and r.types == "2DCZ", r
        # Within one batch too: the second Parse fails, everything after it up to Sync is skipped.
        r = batch(c, parse("s2", "SELECT 1"), parse("s2", "SELECT 1"), bind("s2"), execute(), sync())
        assert r.types == "1EZ" and r.sqlstates == ["42P05"], r
        r = batch(c, bind("s2"), execute(), sync())
        assert r.rows == [["1"]]


def test_bind_of_an_unknown_name_is_26000_and_the_session_goes_on(txproxy):
    with raw_login(txproxy) as c:
        r = batch(c, bind("nope", ("1",)), execute(), sync())
        assert r.types == "EZ" and r.sqlstates == ["26000"] and r.status == "I", r
        r = batch(c, describe("S", "nope"), sync())
        assert r.types == "EZ" and r.sqlstates == ["26000"], r
        r = batch(c, parse("", "SELECT 'fine'"), bind(""), execute(), sync())
        assert r.rows == [["fine"]] and r.types == "12DCZ", r
        # Inside a transaction the error aborts it, as PostgreSQL would.
        c.query("BEGIN")
        r = batch(c, parse("t1", "SELECT 7"), bind("t1"), execute(), bind("nope"), execute(), sync())
        assert r.types == "12DCEZ" and r.sqlstates == ["26000"] and r.status == "E", r
        r = batch(c, bind("t1"), execute(), sync())
        assert r.sqlstates == ["25P02"], r
        c.query("ROLLBACK")
        r = batch(c, bind("t1"), execute(), sync())
        assert r.rows == [["7"]] and r.status == "I", r


def test_unknown_name_fails_the_whole_batch_as_postgresql_does(txproxy):
    """An extended-protocol batch is one implicit transaction: an error in it undoes what ran before it."""
    with raw_login(txproxy) as c:
        c.query("CREATE TABLE IF NOT EXISTS tx_batch_atomic (x int)")
        c.query("TRUNCATE tx_batch_atomic")
        r = batch(c, parse("ins", "INSERT INTO tx_batch_atomic VALUES ($1::int)"), bind("ins", ("1",)), execute(), sync())
        assert r.types == "12CZ", r
        r = batch(c, bind("ins", ("2",)), execute(), bind("nope"), execute(), bind("ins", ("3",)), execute(), sync())
        assert r.types == "2CEZ" and r.sqlstates == ["26000"] and r.status == "I", r
        assert c.scalar("SELECT string_agg(x::text, ',' ORDER BY x) FROM tx_batch_atomic") == "1"
        # What the failed batch would have prepared or closed after the error did not happen.
        batch(c, parse("known", "SELECT 'known'"), sync())
        r = batch(c, bind("nope"), parse("later", "SELECT 'known'"), close("S", "known"), sync())
        assert r.types == "EZ", r
        r = batch(c, parse("later", "SELECT 'later'"), bind("later"), execute(), bind("known"), execute(), sync())
        assert r.rows == [["later"], ["known"]], r
        c.query("DROP TABLE tx_batch_atomic")


def test_pinned_client_deallocates_its_own_statements(txproxy):
    with raw_login(txproxy) as c:
        c.query("LISTEN tx_pinned_dealloc")
        batch(c, parse("mine", "SELECT 'mine'"), sync())
        c.query("PREPARE sqlprep AS SELECT 'sql'")
        assert c.scalar("EXECUTE sqlprep") == "sql"
        r = batch(c, bind("sqlprep"), execute(), sync())  # one namespace, as in PostgreSQL
        assert r.rows == [["sql"]], r
        c.query("DEALLOCATE mine")
        r = batch(c, bind("mine"), execute(), sync())
        assert r.sqlstates == ["26000"], r
        c.query("DEALLOCATE sqlprep")
        with pytest.raises(ServerError) as info:
            c.query("EXECUTE sqlprep")
        assert info.value.sqlstate == "26000"


def test_deallocate_through_the_extended_protocol(txproxy):
    with raw_login(txproxy) as c, raw_login(txproxy) as other:
        batch(c, parse("d1", "SELECT 'd1'"), parse("d2", "SELECT 'd2'"), sync())
        batch(other, parse("d1", "SELECT 'd1'"), sync())
        r = batch(c, parse("", "DEALLOCATE d1"), bind(""), execute(), sync())
        assert r.types == "12CZ", r
        r = batch(c, bind("d1"), execute(), sync())
        assert r.sqlstates == ["26000"], r
        r = batch(c, parse("", "DEALLOCATE d1"), bind(""), execute(), sync())  # twice: gone, as PostgreSQL says
        assert r.sqlstates == ["26000"], r
        r = batch(c, bind("d2"), execute(), sync())
        assert r.rows == [["d2"]], r
        r = batch(other, bind("d1"), execute(), sync())
        assert r.rows == [["d1"]], r
        r = batch(c, parse("d1", "SELECT 'd1 again'"), bind("d1"), execute(), sync())
        assert r.rows == [["d1 again"]], r


def test_duplicate_parse_inside_a_transaction_aborts_it(txproxy):
    with raw_login(txproxy) as c:
        batch(c, parse("dup", "SELECT 1"), sync())
        c.query("BEGIN")
        r = batch(c, parse("dup", "SELECT 1"), sync())
        c.query("ROLLBACK")
        assert r.sqlstates == ["42P05"] and r.status == "E", r
        # The server refused it under the shared name; the client reads its own.
        assert r.errors[0]["M"] == 'prepared statement "dup" already exists', r.errors


def test_close_then_parse_again_under_the_same_name(txproxy):
    with raw_login(txproxy) as c, raw_login(txproxy) as other:
        r = batch(c, parse("s", "SELECT 'first'"), bind("s"), execute(), sync())
        assert r.rows == [["first"]]
        r = batch(other, parse("s", "SELECT 'first'"), sync())  # the same statement, shared on the server
        assert r.types == "1Z"
        r = batch(c, close("S", "s"), sync())
        assert r.types == "3Z", r
        r = batch(c, bind("s"), execute(), sync())
        assert r.sqlstates == ["26000"], r
        r = batch(c, parse("s", "SELECT 'second'"), bind("s"), execute(), sync())
        assert r.rows == [["second"]] and r.types == "12DCZ", r
        # Close and re-Parse in one batch; closing a name that does not exist is no error.
        r = batch(c, close("S", "s"), parse("s", "SELECT 'third'"), bind("s"), execute(), close("S", "never"), sync())
        assert r.types == "312DC3Z" and r.rows == [["third"]], r
        # The other client's statement is untouched by c's Close.
        r = batch(other, bind("s"), execute(), sync())
        assert r.rows == [["first"]], r
        # Describe of a statement works wherever the client lands.
        r = batch(other, describe("S", "s"), sync())
        assert r.types == "tTZ", r


def test_statement_eviction_and_re_prepare(pg_cluster, tmp_path):
    with start_proxy(pg_cluster, tmp_path, **dict(TX_CONFIG, pool_size=2, max_prepared_statements=2)) as px:
        with raw_login(px) as c, raw_login(px) as other:
            for k in range(5):
                r = batch(c, parse(f"q{k}", f"SELECT $1::int + {k * 1000}", (23,)), sync())
                assert r.types == "1Z", r
            for i in range(40):
                k = i % 5
                if i % 4 == 0:
                    c.query("BEGIN")
                    r = batch(c, bind(f"q{k}", (str(i),)), execute(), bind(f"q{(k + 2) % 5}", (str(i),)), execute(), sync())
                    assert r.rows == [[str(i + k * 1000)], [str(i + ((k + 2) % 5) * 1000)]], (i, r)
                    c.query("COMMIT")
                else:
                    r = batch(c, bind(f"q{k}", (str(i),)), execute(), sync())
                    assert r.rows == [[str(i + k * 1000)]], (i, r)
                if i % 3 == 0:  # another client moves the connections around
                    other.query("BEGIN")
                    r = batch(c, bind(f"q{(k + 1) % 5}", (str(i),)), execute(), sync())
                    assert r.rows == [[str(i + ((k + 1) % 5) * 1000)]], (i, r)
                    other.query("COMMIT")
                held = int(c.scalar("SELECT count(*) FROM pg_prepared_statements"))
                assert held <= 2, (i, held)


# --------------------------------------------------------------------------- many clients, few connections


def test_500_clients_queue_for_4_connections(pg_cluster, tmp_path, admin):
    database = "tx_many"
    admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {database} OWNER {pg_cluster.app_user}")
    try:
        config = dict(TX_CONFIG, pool_size=4, query_wait_timeout=60, dbname=database, max_client_conn=1000)
        with start_proxy(pg_cluster, tmp_path, **config) as px:
            seen_max = 0

            async def client(i: int, all_in: asyncio.Event, connected: list) -> int:
                conn = await asyncpg.connect(**px.asyncpg_kwargs(timeout=60, command_timeout=60))
                try:
                    connected.append(i)
                    if len(connected) == 500:
                        all_in.set()
                    await asyncio.wait_for(all_in.wait(), 60)
                    return await conn.fetchval("SELECT $1::int + 1", i)
                finally:
                    await conn.close()

            async def watch(stop: asyncio.Event) -> None:
                nonlocal seen_max
                async with await psycopg.AsyncConnection.connect(admin.info.dsn, password=pg_cluster.superuser_password, autocommit=True) as mon:
                    while not stop.is_set():
                        cur = await mon.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename = %s AND backend_type = 'client backend'",
                            (database, pg_cluster.app_user),
                        )
                        seen_max = max(seen_max, (await cur.fetchone())[0])
                        await asyncio.sleep(0.05)

            async def main():
                all_in, stop, connected = asyncio.Event(), asyncio.Event(), []
                watcher = asyncio.create_task(watch(stop))
                try:
                    return await asyncio.gather(*(client(i, all_in, connected) for i in range(500)))
                finally:
                    stop.set()
                    await watcher

            results = run_async(main(), timeout=80)
            assert results == [i + 1 for i in range(500)]
            backends = proxy_backends(admin, pg_cluster.app_user, database)
            assert 1 <= len(backends) <= 4, backends
            assert 1 <= seen_max <= 4, seen_max
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def test_copy_from_stdin_with_its_data_sent_before_copy_in_response(pg_cluster, tmp_path):
    """A client that sends Parse/Bind/Execute/Sync, its data, CopyDone and Sync at once, without
    waiting for CopyInResponse: PostgreSQL ignores the first Sync and answers the second. The
    pool's only connection must serve the next client afterwards (before, it stayed with this
    one: the next client timed out)."""
    with start_proxy(pg_cluster, tmp_path, **dict(TX_CONFIG, pool_size=1, query_wait_timeout=10)) as px:
        with px.connect() as setup:
            setup.execute("DROP TABLE IF EXISTS copy_early; CREATE TABLE copy_early (v int)")
        with RawClient(px.host, px.port) as c:
            c.login(px.user, "appdb", px.password)
            c.send(m.parse("", "COPY copy_early FROM STDIN") + m.bind("", "") + m.execute() + m.sync()
                   + m.copy_data(b"7\n") + m.copy_done() + m.sync())  # fmt: skip
            seen = []
            while not seen or seen[-1] != p.READY_FOR_QUERY:
                seen.append(c.read_message()[0])
            assert seen == [p.PARSE_COMPLETE, p.BIND_COMPLETE, p.COPY_IN_RESPONSE, p.COMMAND_COMPLETE, p.READY_FOR_QUERY]
            assert c.scalar("SELECT sum(v) FROM copy_early") == "7"
            with px.connect(connect_timeout=10) as other:  # (pool_size 1: the connection came back)
                assert other.execute("SELECT count(*) FROM copy_early").fetchone() == (1,)


def test_pipelines_of_many_clients_over_two_connections(pg_cluster, tmp_path):
    """psycopg's pipeline mode (many Syncs in flight, answers read later) from 12 clients over
    pool 2 in transaction pooling: a connection changes hands only once every Sync of the
    pipeline is answered, and no client ever reads another's rows; an error inside a pipeline
    aborts only that client's batch."""
    config = dict(TX_CONFIG, pool_size=2, query_wait_timeout=60)
    with start_proxy(pg_cluster, tmp_path, **config) as px:

        def client(i: int) -> int:
            with px.connect() as conn:
                done = 0
                for r in range(15):
                    with conn.pipeline() as pipeline:
                        curs = [conn.execute("SELECT %s::int * 1000 + %s::int", (i, k)) for k in range(6)]
                        pipeline.sync()
                        assert [c.fetchone()[0] for c in curs] == [i * 1000 + k for k in range(6)], (i, r)
                    if r % 5 == 4:
                        with pytest.raises(pgerrors.DivisionByZero):
                            with conn.pipeline():
                                conn.execute("SELECT %s::int", (i,))
                                conn.execute("SELECT 1 / %s", (0,))
                    assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
                    done += 1
                return done

        assert run_threads(client, 12, timeout=120) == [15] * 12


def test_clients_with_different_settings_share_two_connections_under_contention(pg_cluster, tmp_path, admin):
    """48 clients over pool 2, all busy at once: most transactions end with others waiting, so
    the connection goes to the next client in place when its settings are the connection's, and
    through a settings sync when not. Clients with the default settings, with their own
    application_name and statement_timeout at login, and with a session-level SET search_path
    (read back at release) mix in every way of writing: simple queries, queries with parameters
    (the extended protocol), prepared statements run again, and BEGIN..COMMIT with SET LOCAL.
    Each must always see its own settings and its own answers, and no connection may leak."""
    database = "tx_handoff"  # (its own: the module's other proxies keep connections to appdb's)
    admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {database} OWNER {pg_cluster.app_user}")
    try:
        config = dict(TX_CONFIG, pool_size=2, query_wait_timeout=60, max_client_conn=200, dbname=database)
        clients, rounds = 48, 25
        with start_proxy(pg_cluster, tmp_path, **config) as px:

            async def client(i: int, start: asyncio.Event) -> int:
                kind = i % 4
                settings = {}
                if kind == 1:
                    settings = {"application_name": f"hand-{i}", "statement_timeout": f"{10000 + i}"}
                conn = await asyncpg.connect(**px.asyncpg_kwargs(timeout=60, command_timeout=60), server_settings=settings)
                try:
                    if kind == 2:
                        await conn.execute(f"SET search_path TO hand_{i}, public")
                    want_app = settings.get("application_name", "")
                    want_timeout = f"{10000 + i}ms" if kind == 1 else "0"
                    want_path = f"hand_{i}, public" if kind == 2 else '"$user", public'
                    statement = await conn.prepare("SELECT $1::int * 2, current_setting('application_name'), current_setting('search_path')")
                    await start.wait()
                    done = 0
                    for r in range(rounds):
                        way = (i + r) % 4
                        if way == 0:
                            app, timeout, path = await conn.fetchrow(
                                "SELECT current_setting('application_name'), current_setting('statement_timeout'), current_setting('search_path')"
                            )
                            assert (app, timeout, path) == (want_app, want_timeout, want_path), (i, r)
                        elif way == 1:
                            assert await conn.fetchval("SELECT $1::int + $2::int", i, r) == i + r
                        elif way == 2:
                            assert tuple(await statement.fetchrow(i * 1000 + r)) == (2 * (i * 1000 + r), want_app, want_path), (i, r)
                        else:
                            async with conn.transaction():
                                await conn.execute("SET LOCAL statement_timeout = '42s'")
                                assert await conn.fetchval("SELECT current_setting('statement_timeout')") == "42s"
                                assert await conn.fetchval("SELECT current_setting('application_name')") == want_app
                            assert await conn.fetchval("SELECT current_setting('statement_timeout')") == want_timeout, (i, r)
                        done += 1
                    return done
                finally:
                    await conn.close()

            async def main():
                start = asyncio.Event()
                tasks = [asyncio.create_task(client(i, start)) for i in range(clients)]
                await asyncio.sleep(0.5)
                start.set()
                return await asyncio.gather(*tasks)

            assert run_async(main(), timeout=150) == [rounds] * clients
            backends = proxy_backends(admin, pg_cluster.app_user, database)
            assert 1 <= len(backends) <= 2, backends
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


# --------------------------------------------------------------------------- idle in transaction


def test_idle_transaction_timeout_disconnects_and_frees_the_connection(pg_cluster, tmp_path):
    config = dict(TX_CONFIG, pool_size=1, idle_transaction_timeout=1, query_wait_timeout=20)
    with start_proxy(pg_cluster, tmp_path, **config) as px:
        with raw_login(px) as idle, px.connect() as waiter:
            pid = idle.scalar("SELECT pg_backend_pid()")
            idle.query("BEGIN")
            assert idle.scalar("SELECT txid_current() > 0") == "t"
            started = time.monotonic()
            worker = Worker(lambda: waiter.execute("SELECT pg_backend_pid(), now() = statement_timestamp()").fetchone())
            worker.start()
            data = idle.wait_closed(10)
            fields = error_fields_of(data)
            assert fields is not None, data
            assert fields["C"] == "25P03" and fields["S"] == "FATAL", fields
            elapsed = time.monotonic() - started
            assert 0.5 < elapsed < 5, elapsed
            worker.finish(10)
            assert worker.error is None, worker.error
            # The only server connection came back to the pool, rolled back.
            assert worker.result == (int(pid), True)
            assert waiter.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert waiter.execute("SELECT 1").fetchone() == (1,)



def test_idle_transaction_timeout_spares_a_busy_transaction(pg_cluster, tmp_path):
    """Only idleness counts: a transaction answered with several ReadyForQuery at once, then kept busy, lives on."""
    config = dict(TX_CONFIG, pool_size=1, idle_transaction_timeout=1)
    with start_proxy(pg_cluster, tmp_path, **config) as px:
        with raw_login(px) as c:
            c.query("BEGIN")
            c.send(m.query("SELECT 1") + m.query("SELECT 2") + m.query("SELECT 3"))
            for _ in range(3):
                while c.read_message()[0] != p.READY_FOR_QUERY:
                    pass
            until = time.monotonic() + 2.0
            while time.monotonic() < until:  # gaps well under the timeout, for twice its length
                time.sleep(0.3)
                assert c.scalar("SELECT txid_current_if_assigned() IS NULL") == "t"
                assert c.scalar("SELECT now() <> statement_timestamp()") == "t"  # still the same transaction
            c.query("COMMIT")


def test_copy_from_stdin_in_the_extended_protocol_frees_its_connection(pg_cluster, tmp_path):
    """libpq's PQexecParams / PQexecPrepared of COPY ... FROM STDIN (tokio-postgres does the same):
    Parse/Bind/Describe/Execute/Sync, the data, then CopyDone and another Sync. PostgreSQL
    ignores a Sync while it reads COPY data, so the batch earns one ReadyForQuery, not two: the
    pool's only connection must come back for the next client, and answers must not fall one
    behind. Unnamed (the fast path), named and run again (prepared), and a CopyFail."""
    from psycopg import pq

    with start_proxy(pg_cluster, tmp_path, pool_mode="transaction", pool_size=1) as px:
        with px.connect() as setup:
            setup.execute("DROP TABLE IF EXISTS copy_ext; CREATE TABLE copy_ext (v int)")
        conn = pq.PGconn.connect(px.dsn().encode())
        assert conn.status == pq.ConnStatus.OK, conn.get_error_message()
        try:

            def copy(send, rows: bytes, fail: bytes | None = None) -> None:
                libpq_copy_in(conn, send, rows, fail)

            def others_get_the_connection() -> None:
                # pool_size 1: a connection left owing a ReadyForQuery would keep this one waiting.
                with px.connect(connect_timeout=10, options="-c statement_timeout=10000") as other:
                    other.execute("SET statement_timeout = 0")
                    assert other.execute("SELECT 41 + 1").fetchone() == (42,)
                result = conn.exec_(b"SELECT 7")
                assert result.status == pq.ExecStatus.TUPLES_OK and result.get_value(0, 0) == b"7"

            copy(lambda: conn.send_query_params(b"COPY copy_ext FROM STDIN", None), b"1\n2\n")
            others_get_the_connection()
            assert conn.prepare(b"cp", b"COPY copy_ext FROM STDIN").status == pq.ExecStatus.COMMAND_OK
            for _ in range(2):  # prepared, then run again (the connection holds it: the fast path)
                copy(lambda: conn.send_query_prepared(b"cp", None), b"3\n")
                others_get_the_connection()
            copy(lambda: conn.send_query_params(b"COPY copy_ext FROM STDIN", None), b"99\n", fail=b"changed my mind")
            others_get_the_connection()
            result = conn.exec_(b"SELECT count(*), sum(v) FROM copy_ext")
            assert (result.get_value(0, 0), result.get_value(0, 1)) == (b"4", b"9")
        finally:
            conn.finish()
