"""Real drivers through pgtwist: psycopg 3, asyncpg and pgbench against the primary."""

import asyncio
import hashlib
import re

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from tests.harness.proxy import start_proxy
from tests.harness.txhelpers import pgbench

pytestmark = pytest.mark.integration


def run_async(coro, timeout: float = 60):
    """Run *coro* in a fresh event loop, bounded by *timeout* seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# --------------------------------------------------------------------------- psycopg 3


def test_psycopg_simple_query(proxy):
    with proxy.connect() as conn:
        assert conn.execute("SELECT 'hello', 1 + 1").fetchone() == ("hello", 2)
        # Several statements in one simple Query message.
        cur = conn.cursor()
        cur.execute("SELECT 1; SELECT 2")
        assert cur.fetchone() == (1,)
        assert cur.nextset()
        assert cur.fetchone() == (2,)


def test_psycopg_parameters_use_the_extended_protocol(proxy):
    with proxy.connect() as conn:
        row = conn.execute(
            "SELECT %s::int * 2, %s::text || '!', %s::bytea, %s::int IS NULL", (21, "hi", b"\x00\xff", None)
        ).fetchone()
        assert row == (42, "hi!", b"\x00\xff", True)
        # Binary results too.
        cur = conn.cursor(binary=True)
        assert cur.execute("SELECT %s::bigint + 1", (2**40,)).fetchone() == (2**40 + 1,)


def test_psycopg_prepared_statements(proxy):
    with proxy.connect() as conn:
        for i in range(10):
            assert conn.execute("SELECT %s::int + 100", (i,), prepare=True).fetchone() == (i + 100,)
        prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql").fetchone()[0]
        assert prepared >= 1


def test_psycopg_transaction_rollback(proxy):
    with proxy.connect() as conn:
        conn.execute("CREATE TEMP TABLE itest_tx (x int)")
        with conn.transaction():
            conn.execute("INSERT INTO itest_tx VALUES (1)")
        with conn.transaction() as tx:
            conn.execute("INSERT INTO itest_tx VALUES (2)")
            assert conn.execute("SELECT count(*) FROM itest_tx").fetchone() == (2,)
            raise psycopg.Rollback(tx)
        assert conn.execute("SELECT array_agg(x) FROM itest_tx").fetchone() == ([1],)
    # Non-autocommit: an explicit rollback.
    with proxy.connect(autocommit=False) as conn:
        conn.execute("CREATE TEMP TABLE itest_tx2 (x int)")
        conn.commit()
        conn.execute("INSERT INTO itest_tx2 VALUES (1)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM itest_tx2").fetchone() == (0,)
        conn.rollback()


def test_psycopg_server_error_then_continue(proxy):
    with proxy.connect() as conn:
        with pytest.raises(pgerrors.DivisionByZero) as info:
            conn.execute("SELECT 1 / 0")
        assert info.value.sqlstate == "22012"
        with pytest.raises(pgerrors.UndefinedTable):
            conn.execute("SELECT * FROM itest_no_such_table WHERE x = %s", (1,))
        assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)
    with proxy.connect(autocommit=False) as conn:
        with pytest.raises(pgerrors.UniqueViolation):
            conn.execute("SELECT 1")
            conn.execute("CREATE TEMP TABLE itest_u (x int PRIMARY KEY)")
            conn.execute("INSERT INTO itest_u VALUES (1), (1)")
        with pytest.raises(pgerrors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)
        conn.rollback()


def test_psycopg_listen_notify(proxy):
    with proxy.connect() as listener, proxy.connect() as notifier:
        listener.execute("LISTEN itest_channel")
        notifier.execute("SELECT pg_notify('itest_channel', 'payload-1')")
        notifier.execute("NOTIFY itest_channel, 'payload-2'")
        got = [n.payload for n in listener.notifies(timeout=10, stop_after=2)]
        assert got == ["payload-1", "payload-2"]
        listener_pid = listener.info.backend_pid
        assert listener_pid  # the proxy's key, not the node's: notifications carry the node's pid
        assert listener.execute("SELECT 1").fetchone() == (1,)


def test_psycopg_notices(proxy):
    with proxy.connect() as conn:
        notices = []
        conn.add_notice_handler(lambda diag: notices.append((diag.severity, diag.message_primary)))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'itest notice %', 1; RAISE WARNING 'itest warning'; END $$")
        assert ("NOTICE", "itest notice 1") in notices
        assert ("WARNING", "itest warning") in notices


def test_psycopg_large_result_is_byte_exact(proxy):
    n = 200_000
    with proxy.connect() as conn:
        cur = conn.execute("SELECT g, md5(g::text) FROM generate_series(1, %s) AS g", (n,))
        count = total = 0
        digest = hashlib.sha256()
        for g, h in cur:
            count += 1
            total += g
            digest.update(h.encode())
        expected = hashlib.sha256(b"".join(hashlib.md5(str(i).encode()).hexdigest().encode() for i in range(1, n + 1)))
        assert count == n
        assert total == n * (n + 1) // 2
        assert digest.hexdigest() == expected.hexdigest()
        # Wide rows, fetched as text through the simple protocol as well.
        cur = conn.cursor()
        cur.execute("SELECT repeat('x', 10000) || g FROM generate_series(1, 2000) AS g")
        rows = cur.fetchall()
        assert len(rows) == 2000 and rows[-1][0] == "x" * 10000 + "2000"


def test_psycopg_pipeline_mode(proxy):
    with proxy.connect() as conn:
        conn.execute("CREATE TEMP TABLE itest_pipe (x int)")
        with conn.pipeline() as pipeline:
            curs = [conn.execute("INSERT INTO itest_pipe VALUES (%s) RETURNING x", (i,)) for i in range(50)]
            pipeline.sync()
            assert [c.fetchone()[0] for c in curs] == list(range(50))
        # An error inside a pipeline aborts the whole implicit transaction up to the Sync.
        with pytest.raises(pgerrors.DivisionByZero):
            with conn.pipeline():
                conn.execute("INSERT INTO itest_pipe VALUES (%s)", (100,))
                conn.execute("SELECT 1 / %s", (0,))
                conn.execute("INSERT INTO itest_pipe VALUES (%s)", (101,))
        assert conn.execute("SELECT count(*), max(x) FROM itest_pipe").fetchone() == (50, 49)


# --------------------------------------------------------------------------- asyncpg


def test_asyncpg_basics(proxy):
    async def main():
        conn = await asyncpg.connect(**proxy.asyncpg_kwargs())
        try:
            assert await conn.fetchval("SELECT 1", timeout=10) == 1
            # fetch with parameters: asyncpg prepares named statements.
            rows = await conn.fetch("SELECT g, $1::text || g FROM generate_series(1, $2::int) AS g", "n", 5, timeout=10)
            assert [tuple(r) for r in rows] == [(i, f"n{i}") for i in range(1, 6)]
            # The same statement again comes from asyncpg's statement cache.
            assert await conn.fetchval("SELECT $1::int * 2", 21, timeout=10) == 42
            assert await conn.fetchval("SELECT $1::int * 2", 22, timeout=10) == 44
            stmt = await conn.prepare("SELECT $1::int + 1", timeout=10)
            assert await stmt.fetchval(41, timeout=10) == 42

            await conn.execute("CREATE TEMP TABLE itest_many (a int, b text)", timeout=10)
            await conn.executemany("INSERT INTO itest_many VALUES ($1, $2)", [(i, f"v{i}") for i in range(500)], timeout=20)
            assert await conn.fetchval("SELECT count(*) FROM itest_many", timeout=10) == 500

            with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
                async with conn.transaction():
                    await conn.execute("INSERT INTO itest_many VALUES (-1, 'gone')", timeout=10)
                    await conn.fetchval("SELECT 1 / 0", timeout=10)
            async with conn.transaction():
                await conn.execute("INSERT INTO itest_many VALUES (-2, 'kept')", timeout=10)
            assert await conn.fetchval("SELECT string_agg(b, ',') FROM itest_many WHERE a < 0", timeout=10) == "kept"
        finally:
            await asyncio.wait_for(conn.close(), 10)

    run_async(main())


def test_asyncpg_20_concurrent_connections(proxy):
    async def worker(i):
        conn = await asyncpg.connect(**proxy.asyncpg_kwargs())
        try:
            pids = set()
            for j in range(20):
                assert await conn.fetchval("SELECT $1::int * 1000 + $2::int", i, j, timeout=10) == i * 1000 + j
                pids.add(await conn.fetchval("SELECT pg_backend_pid()", timeout=10))
            # Session pooling: one server connection for the whole session.
            assert len(pids) == 1
            await conn.execute("SELECT pg_sleep(0.05)", timeout=10)
            return pids.pop()
        finally:
            await asyncio.wait_for(conn.close(), 10)

    async def main():
        return await asyncio.gather(*(worker(i) for i in range(20)))

    pids = run_async(main())
    # All 20 were connected at once (pool_size 20): each had its own server connection.
    assert len(pids) == 20
    assert len(set(pids)) >= 1


def test_asyncpg_clients_beyond_pool_size_queue_up(pg_cluster, tmp_path):
    """60 clients at once against pool_size 10: all are served, in turn, none refused."""
    n, pool_size = 60, 10

    async def client(px, i):
        conn = await asyncpg.connect(**px.asyncpg_kwargs())
        try:
            await conn.execute("SELECT pg_sleep(0.05)", timeout=10)
            return await conn.fetchrow("SELECT $1::int AS i, pg_backend_pid() AS pid", i, timeout=10)
        finally:
            await asyncio.wait_for(conn.close(), 10)

    with start_proxy(pg_cluster, tmp_path, pool_size=pool_size, query_wait_timeout=30) as px:

        async def main():
            return await asyncio.gather(*(client(px, i) for i in range(n)))

        rows = run_async(main())
    assert [r["i"] for r in rows] == list(range(n))
    # Never more than pool_size server connections: the others waited for one.
    assert len({r["pid"] for r in rows}) <= pool_size


# --------------------------------------------------------------------------- pgbench


@pytest.fixture(scope="module")
def pgbench_tables(proxy):
    pgbench(proxy, "-i", "-s", "1", "-q")
    yield
    with proxy.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history")


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_select_only(proxy, pgbench_tables, mode):
    out = pgbench(proxy, "-c", "8", "-j", "2", "-T", "5", "-S", "-M", mode, "-n")
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    assert processed, out
    assert int(processed.group(1)) > 100, out
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if failed:  # PostgreSQL >= 15 prints it
        assert int(failed.group(1)) == 0, out
    assert "aborted" not in out, out
