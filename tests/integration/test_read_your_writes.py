"""Read-your-writes under every way of writing: a primary and two replicas that apply WAL late.

For each way a client can write (autocommit, explicit transactions over the simple and the
extended protocol, COMMIT AND CHAIN, two-phase commit, functions that write, COPY FROM,
pipelines, multi-statement strings, ...), PAIRS write-then-read pairs go through pgtwist
(transaction pooling, read_your_writes on) and the read must see the write every time. The
replicas replay WAL APPLY_DELAY late, so any read placed on one of them right after the write
misses it: a single miss fails the test.

PGTWIST_RYW_PAIRS sets the pairs per way (300 by default, the issue's criterion).
"""

from __future__ import annotations

import itertools
import os
import threading
import time

import asyncpg
import psycopg
import pytest

from pgtwist.tools.localcluster import LocalCluster
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.proxy import DATABASE, RawClient, start_proxy, wait_for
from tests.harness.txhelpers import batch, bind, data_row_values, execute, parse, run_async, run_threads, sync
from tests.harness.workers import on_each_worker

pytestmark = pytest.mark.integration

PAIRS = int(os.environ.get("PGTWIST_RYW_PAIRS", "300"))
APPLY_DELAY = "300ms"
TIME_LIMIT = 40.0  # seconds per way, whatever PAIRS is

CONFIG: dict = {
    "pool_mode": "transaction",
    "pool_size": 6,
    "query_wait_timeout": 30,
    "health_check_interval": 0.2,
    "health_check_timeout": 2.0,
    "failover_wait": 10.0,
    "read_your_writes": True,
}

SETUP_SQL = """
CREATE TABLE ryw (k int PRIMARY KEY);
CREATE FUNCTION ryw_write(k int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ryw VALUES (k);
    RETURN k;
END $$;
"""

_keys = itertools.count(1)


@pytest.fixture(scope="module")
def cluster():
    # Two-phase commit needs prepared-transaction slots (replicas need at least the primary's).
    with LocalCluster.create(replicas=2, settings={"max_prepared_transactions": "10"}) as c:
        c.psql(c.nodes[0], SETUP_SQL, user=c.app_user, dbname=c.app_database)
        c.wait_replicas_caught_up(30)
        for replica in c.nodes[1:]:
            c.psql(replica, f"ALTER SYSTEM SET recovery_min_apply_delay = '{APPLY_DELAY}';\nSELECT pg_reload_conf();")
        for replica in c.nodes[1:]:
            with psycopg.connect(c.dsn(replica, connect_timeout=10), autocommit=True) as conn:
                wait_for(
                    lambda: conn.execute("SHOW recovery_min_apply_delay").fetchone()[0] == APPLY_DELAY,
                    10,
                    "the apply delay in effect",
                )
        yield c


@pytest.fixture(scope="module")
def px(cluster, tmp_path_factory):
    with start_proxy(
        cluster,
        tmp_path_factory.mktemp("ryw"),
        databases={DATABASE: {"dbname": cluster.app_database, "nodes": [n.addr for n in cluster.nodes]}},
        users={cluster.app_user: {"password": cluster.app_password}},
        **CONFIG,
    ) as proxy:
        replicas = {n.port for n in cluster.nodes[1:]}
        seen: set[int] = set()

        def both_replicas():
            with proxy.connect(autocommit=True) as conn:
                for _ in range(6):
                    seen.add(conn.execute("SELECT inet_server_port()").fetchone()[0])
            return replicas <= seen

        wait_for(both_replicas, 20, f"reads on both replicas (seen {seen})")
        yield proxy


def primary_port(cluster) -> int:
    return cluster.nodes[0].port


# --------------------------------------------------------------------------- the clients


def raw(px) -> RawClient:
    client = RawClient(px.host, px.port, timeout=15)
    client.login(px.user, DATABASE, px.password)
    return client


def raw_read(client: RawClient, k: int) -> tuple[bool, int]:
    rows = [data_row_values(b) for t, b in client.query(f"SELECT count(*), inet_server_port() FROM ryw WHERE k = {k}") if t == p.DATA_ROW]
    return rows[0][0] == "1", int(rows[0][1])


def psycopg_read(conn, k: int) -> tuple[bool, int]:
    count, port = conn.execute("SELECT count(*), inet_server_port() FROM ryw WHERE k = %s", (k,)).fetchone()
    return count == 1, port


def raw_replies(client: RawClient, data: bytes, readies: int) -> list[tuple[int, bytes]]:
    """Send *data* and read up to the *readies*-th ReadyForQuery; any ErrorResponse fails."""
    client.send(data)
    got = []
    while readies:
        t, body = client.read_message()
        assert t != p.ERROR_RESPONSE, m.decode_fields(body)
        got.append((t, body))
        if t == p.READY_FOR_QUERY:
            readies -= 1
    return got


class Way:
    """One way of writing: write(k) then read(k) on the same client, PAIRS times."""

    def __init__(self, px):
        self.px = px

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        pass

    def write(self, k: int) -> None:
        raise NotImplementedError

    def read(self, k: int) -> tuple[bool, int]:
        raise NotImplementedError


class RawWay(Way):
    """The simple protocol, byte by byte: what psql and many drivers' plain execute send."""

    statements: tuple[str, ...] = ()

    def __enter__(self):
        self.client = raw(self.px)
        return self

    def close(self):
        self.client.close()

    def write(self, k: int) -> None:
        for sql in self.statements:
            self.client.query(sql.format(k=k))

    def read(self, k: int) -> tuple[bool, int]:
        return raw_read(self.client, k)


class SimpleAutocommit(RawWay):
    statements = ("INSERT INTO ryw VALUES ({k})",)


class SimpleTransaction(RawWay):
    statements = ("BEGIN", "INSERT INTO ryw VALUES ({k})", "COMMIT")


class SimpleStartTransaction(RawWay):
    statements = ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ", "INSERT INTO ryw VALUES ({k})", "END")


class ReadFirstTransaction(RawWay):
    """The transaction's first statement reads; the write comes later."""

    statements = ("BEGIN", "SELECT count(*) FROM ryw", "INSERT INTO ryw VALUES ({k})", "COMMIT")


class ReadFirstInBeginString(RawWay):
    """BEGIN and a read in one string: what the transaction was placed by only reads."""

    statements = ("BEGIN; SELECT 1", "INSERT INTO ryw VALUES ({k})", "COMMIT")


class LocalAsyncCommit(RawWay):
    """A session committing synchronously whose transaction commits asynchronously (SET LOCAL):
    the commit may not be flushed when the proxy asks where the WAL ends."""

    statements = ("BEGIN", "SET LOCAL synchronous_commit = off", "INSERT INTO ryw VALUES ({k})", "COMMIT")

    def __enter__(self):
        self.client = RawClient(self.px.host, self.px.port, timeout=15)
        self.client.login(self.px.user, DATABASE, self.px.password, options="-c synchronous_commit=on")
        assert self.client.scalar("SHOW synchronous_commit") == "on"
        return self


class CommitAndChain(RawWay):
    """The write commits with COMMIT AND CHAIN; the chained transaction only reads, then ends."""

    statements = ("BEGIN", "INSERT INTO ryw VALUES ({k})", "COMMIT AND CHAIN", "SELECT 1", "COMMIT")


class TwoPhase(RawWay):
    """PREPARE TRANSACTION, then COMMIT PREPARED as a transaction of its own."""

    statements = (
        "BEGIN",
        "INSERT INTO ryw VALUES ({k})",
        "PREPARE TRANSACTION 'ryw_{k}'",
        "COMMIT PREPARED 'ryw_{k}'",
    )


class FunctionInTransaction(RawWay):
    statements = ("BEGIN", "SELECT ryw_write({k})", "COMMIT")


class FunctionAutocommit(RawWay):
    statements = ("SELECT ryw_write({k})",)


class MultiStatementWithWrite(RawWay):
    """One Query string: a read first, then the write."""

    statements = ("SELECT 1; INSERT INTO ryw VALUES ({k}); SELECT 2",)


class MultiStatementTransaction(RawWay):
    statements = ("BEGIN; SELECT 1; INSERT INTO ryw VALUES ({k}); COMMIT",)


class SimplePipelinedRead(RawWay):
    """The read goes out in the same packet as the write's COMMIT: it must not overtake it."""

    def write(self, k: int) -> None:
        self.client.query("BEGIN")
        self.client.query(f"INSERT INTO ryw VALUES ({k})")
        self.pending = raw_replies(
            self.client, m.query("COMMIT") + m.query(f"SELECT count(*), inet_server_port() FROM ryw WHERE k = {k}"), 2
        )

    def read(self, k: int) -> tuple[bool, int]:
        (count, port), = [data_row_values(b) for t, b in self.pending if t == p.DATA_ROW]
        return count == "1", int(port)


class ExtendedTransaction(RawWay):
    """BEGIN, INSERT, COMMIT as Parse/Bind/Execute/Sync batches, each waited for; then the read the same way."""

    def write(self, k: int) -> None:
        for sql, params in (("BEGIN", ()), ("INSERT INTO ryw VALUES ($1)", (str(k),)), ("COMMIT", ())):
            reply = batch(self.client, parse("", sql), bind("", params), execute(), sync())
            assert not reply.errors, reply

    def read(self, k: int) -> tuple[bool, int]:
        reply = batch(self.client, parse("", "SELECT count(*), inet_server_port() FROM ryw WHERE k = $1"), bind("", (str(k),)), execute(), sync())
        assert not reply.errors, reply
        count, port = reply.rows[0]
        return count == "1", int(port)


class ExtendedPipelinedRead(ExtendedTransaction):
    """An extended-protocol write and the read behind it in one packet, each with its own Sync."""

    def write(self, k: int) -> None:
        self.client.send(
            parse("", "INSERT INTO ryw VALUES ($1)") + bind("", (str(k),)) + execute() + sync()
            + parse("", "SELECT count(*), inet_server_port() FROM ryw WHERE k = $1") + bind("", (str(k),)) + execute() + sync()
        )
        self.pending = batch(self.client), batch(self.client)

    def read(self, k: int) -> tuple[bool, int]:
        write, read = self.pending
        assert not write.errors and not read.errors, self.pending
        count, port = read.rows[0]
        return count == "1", int(port)


class ExtendedReadThenWriteOneBatch(ExtendedTransaction):
    """A read and a write in one implicit transaction (no Sync between): one batch, one place."""

    def write(self, k: int) -> None:
        reply = batch(
            self.client,
            parse("", "SELECT count(*) FROM ryw"), bind("", ()), execute(),
            parse("", "INSERT INTO ryw VALUES ($1)"), bind("", (str(k),)), execute(),
            sync(),
        )
        assert not reply.errors, reply


class PsycopgWay(Way):
    autocommit = True

    def __enter__(self):
        self.conn = self.px.connect(autocommit=self.autocommit)
        return self

    def close(self):
        self.conn.close()

    def read(self, k: int) -> tuple[bool, int]:
        return psycopg_read(self.conn, k)


class PsycopgAutocommit(PsycopgWay):
    def write(self, k: int) -> None:
        self.conn.execute("INSERT INTO ryw VALUES (%s)", (k,))


class LocalAsyncCommitExtended(PsycopgWay):
    """The same through psycopg (extended protocol, set_config(..., true))."""

    def __enter__(self):
        self.conn = psycopg.connect(self.px.dsn(options="-c synchronous_commit=on"), autocommit=True)
        return self

    def write(self, k: int) -> None:
        with self.conn.transaction():
            self.conn.execute("SELECT set_config('synchronous_commit', %s, true)", ("off",))
            self.conn.execute("INSERT INTO ryw VALUES (%s)", (k,))


class PsycopgNonAutocommit(PsycopgWay):
    """psycopg's default: an implicit BEGIN, the write, commit(); the read in a READ ONLY transaction."""

    autocommit = False

    def write(self, k: int) -> None:
        self.conn.read_only = False
        self.conn.execute("INSERT INTO ryw VALUES (%s)", (k,))
        self.conn.commit()

    def read(self, k: int) -> tuple[bool, int]:
        self.conn.read_only = True  # BEGIN READ ONLY: may go to a replica
        try:
            return psycopg_read(self.conn, k)
        finally:
            self.conn.commit()


class PsycopgTransactionBlock(PsycopgWay):
    def write(self, k: int) -> None:
        with self.conn.transaction():
            self.conn.execute("SELECT count(*) FROM ryw")
            self.conn.execute("INSERT INTO ryw VALUES (%s)", (k,))


class PsycopgFunction(PsycopgWay):
    def write(self, k: int) -> None:
        with self.conn.transaction():
            self.conn.execute("SELECT ryw_write(%s)", (k,))


class PsycopgPrepared(PsycopgWay):
    """Named prepared statements (prepare_threshold=0) in a transaction: Bind of a kept statement."""

    def __enter__(self):
        self.conn = psycopg.connect(self.px.dsn(), autocommit=True, prepare_threshold=0)
        return self

    def write(self, k: int) -> None:
        with self.conn.transaction():
            self.conn.execute("SELECT count(*) FROM ryw WHERE k = %s", (k,))
            self.conn.execute("INSERT INTO ryw VALUES (%s)", (k,))


class PsycopgCopy(PsycopgWay):
    def write(self, k: int) -> None:
        with self.conn.cursor().copy("COPY ryw (k) FROM STDIN") as copy:
            copy.write_row((k,))


class PsycopgCopyInTransaction(PsycopgWay):
    def write(self, k: int) -> None:
        with self.conn.transaction():
            with self.conn.cursor().copy("COPY ryw (k) FROM STDIN") as copy:
                copy.write_row((k,))


class PsycopgPipeline(PsycopgWay):
    """psycopg pipeline mode, a read first and then the write, synced once at the end."""

    def write(self, k: int) -> None:
        with self.conn.pipeline():
            self.conn.execute("SELECT count(*) FROM ryw")
            self.conn.execute("INSERT INTO ryw VALUES (%s)", (k,))


class PsycopgPipelineNonAutocommit(PsycopgWay):
    autocommit = False

    def write(self, k: int) -> None:
        self.conn.read_only = False
        with self.conn.pipeline():
            self.conn.execute("SELECT count(*) FROM ryw")
            self.conn.execute("INSERT INTO ryw VALUES (%s)", (k,))
        self.conn.commit()

    def read(self, k: int) -> tuple[bool, int]:
        self.conn.read_only = True
        try:
            return psycopg_read(self.conn, k)
        finally:
            self.conn.commit()


WAYS = {
    "simple-autocommit": SimpleAutocommit,
    "simple-transaction": SimpleTransaction,
    "simple-start-transaction": SimpleStartTransaction,
    "read-first-transaction": ReadFirstTransaction,
    "read-first-in-begin-string": ReadFirstInBeginString,
    "set-local-async-commit": LocalAsyncCommit,
    "set-config-local-async-commit": LocalAsyncCommitExtended,
    "commit-and-chain": CommitAndChain,
    "two-phase-commit": TwoPhase,
    "function-in-transaction": FunctionInTransaction,
    "function-autocommit": FunctionAutocommit,
    "multi-statement-with-write": MultiStatementWithWrite,
    "multi-statement-transaction": MultiStatementTransaction,
    "simple-pipelined-read": SimplePipelinedRead,
    "extended-transaction": ExtendedTransaction,
    "extended-pipelined-read": ExtendedPipelinedRead,
    "extended-read-then-write-one-batch": ExtendedReadThenWriteOneBatch,
    "psycopg-autocommit": PsycopgAutocommit,
    "psycopg-non-autocommit": PsycopgNonAutocommit,
    "psycopg-transaction-block": PsycopgTransactionBlock,
    "psycopg-function": PsycopgFunction,
    "psycopg-prepared": PsycopgPrepared,
    "psycopg-copy": PsycopgCopy,
    "psycopg-copy-in-transaction": PsycopgCopyInTransaction,
    "psycopg-pipeline": PsycopgPipeline,
    "psycopg-pipeline-non-autocommit": PsycopgPipelineNonAutocommit,
}


def _check(way_name: str, results: list[tuple[int, bool, int]], primary: int, elapsed: float) -> None:
    misses = [(k, port) for k, seen, port in results if not seen]
    assert not misses, f"{way_name}: {len(misses)} of {len(results)} reads missed their write (key, port): {misses[:10]}"
    assert len(results) == PAIRS
    assert elapsed < TIME_LIMIT, f"{way_name}: {PAIRS} pairs took {elapsed:.1f}s"


@pytest.mark.parametrize("way", list(WAYS))
def test_every_way_of_writing_is_read_back(px, cluster, way):
    results = []
    started = time.monotonic()
    with WAYS[way](px) as w:
        for _ in range(PAIRS):
            k = next(_keys)
            w.write(k)
            seen, port = w.read(k)
            results.append((k, seen, port))
    _check(way, results, primary_port(cluster), time.monotonic() - started)


MIXED = ["simple-transaction", "psycopg-non-autocommit", "commit-and-chain", "psycopg-pipeline", "psycopg-function", "two-phase-commit"]


def test_mixed_load_of_clients_sharing_connections(px, cluster):
    """Several clients at once, each writing its own way, on the proxy's few server connections
    (pool_size 6 per node, so connections pass between writers and readers): no read misses."""
    lock = threading.Lock()

    def client(i: int) -> list:
        out = []
        with WAYS[MIXED[i]](px) as w:
            for _ in range(max(1, PAIRS // len(MIXED))):
                with lock:
                    k = next(_keys)
                w.write(k)
                seen, port = w.read(k)
                out.append((k, seen, port))
        return out

    started = time.monotonic()
    results = [r for rs in run_threads(client, len(MIXED), TIME_LIMIT + 20) for r in rs]
    misses = [(k, port) for k, seen, port in results if not seen]
    assert not misses, f"{len(misses)} of {len(results)} reads missed their write: {misses[:10]}"
    assert time.monotonic() - started < TIME_LIMIT


def test_asyncpg_transactions_are_read_back(px, cluster):
    """asyncpg: BEGIN as a simple Query, the write as a named prepared statement, the read too."""

    async def pairs():
        conn = await asyncpg.connect(**px.asyncpg_kwargs())
        out = []
        try:
            for _ in range(PAIRS):
                k = next(_keys)
                async with conn.transaction():
                    await conn.fetchval("SELECT count(*) FROM ryw WHERE k = $1", k)
                    await conn.execute("INSERT INTO ryw VALUES ($1)", k)
                count, port = await conn.fetchrow("SELECT count(*), inet_server_port() FROM ryw WHERE k = $1", k)
                out.append((k, count == 1, port))
        finally:
            await conn.close()
        return out

    async def reads():
        conn = await asyncpg.connect(**px.asyncpg_kwargs())
        try:  # (each new query: Parse, Describe, Flush, then Bind, Execute, Sync)
            return {await conn.fetchval(f"SELECT inet_server_port() + {i} - {i}") for i in range(4)}
        finally:
            await conn.close()

    started = time.monotonic()
    results = run_async(pairs(), timeout=TIME_LIMIT + 20)
    _check("asyncpg-transaction", results, primary_port(cluster), time.monotonic() - started)
    # A client that did not write still reads from replicas, its statements prepared there.
    assert run_async(reads(), timeout=20) <= {n.port for n in cluster.nodes[1:]}


def test_the_setup_would_show_misses(px, cluster):
    """Control: the replicas really are behind, and a client that did not write reads from them."""
    replicas = {n.port for n in cluster.nodes[1:]}
    with px.connect(autocommit=True) as writer, px.connect(autocommit=True) as other:
        misses = 0
        for _ in range(20):
            k = next(_keys)
            writer.execute("INSERT INTO ryw VALUES (%s)", (k,))
            seen, port = psycopg_read(other, k)
            assert port in replicas
            misses += not seen
        assert misses > 0


def test_pipeline_read_then_write_goes_to_the_primary(px, cluster):
    """A pipeline that reads first and then writes, in one implicit transaction: no 25006 from a replica."""
    primary = primary_port(cluster)
    with px.connect(autocommit=True) as conn:
        for _ in range(20):
            k = next(_keys)
            with conn.pipeline():
                first = conn.execute("SELECT inet_server_port()")
                second = conn.execute("INSERT INTO ryw VALUES (%s) RETURNING inet_server_port()", (k,))
            assert first.fetchone()[0] == primary and second.fetchone()[0] == primary
    # A pipeline of reads only, from a client that did not write, still goes to a replica.
    with px.connect(autocommit=True) as conn:
        with conn.pipeline():
            a = conn.execute("SELECT inet_server_port()")
            b = conn.execute("SELECT inet_server_port()")
        assert a.fetchone()[0] != primary and b.fetchone()[0] != primary


def test_a_table_another_client_just_created_is_there_for_every_client(px, cluster):
    """DDL bounds every session's replica reads, not only its own client's: a migration's table is
    there for the application's other connections at once (it answered 42P01 from a replica that
    had not replayed the CREATE yet)."""
    with px.connect(autocommit=True) as migrator, px.connect(autocommit=True) as other:
        new_tables_are_there_for(migrator, other, cluster)


def new_tables_are_there_for(migrator, other, cluster) -> None:
    """Tables *migrator* creates can be read at once by *other*; once replayed, reads go to replicas again."""
    replicas = {n.port for n in cluster.nodes[1:]}
    for _ in range(5):
        name = f"ryw_ddl_{next(_keys)}"
        migrator.execute(f"CREATE TABLE {name} (k int)")
        assert other.execute(f"SELECT count(*), inet_server_port() FROM {name}").fetchone()[0] == 0
        migrator.execute(f"DROP TABLE {name}")
    wait_for(lambda: other.execute("SELECT inet_server_port()").fetchone()[0] in replicas, 10, "reads on a replica again")


@pytest.mark.parametrize(
    "make",
    [
        "SELECT k INTO {name} FROM ryw LIMIT 0",
        # (EXPLAIN ANALYZE runs what it explains: the table is made, and was not counted as DDL)
        "EXPLAIN ANALYZE CREATE TABLE {name} AS SELECT k FROM ryw LIMIT 0",
    ],
    ids=["select-into", "explain-analyze-ctas"],
)
def test_a_table_made_by_select_into_is_there_for_every_client(px, cluster, make):
    """SELECT ... INTO makes a table as CREATE TABLE AS does. It was taken for a plain read's
    kin (no DDL): it bounded nobody's replica reads, and another client got 42P01 from a replica."""
    replicas = {n.port for n in cluster.nodes[1:]}
    with px.connect(autocommit=True) as maker, px.connect(autocommit=True) as other:
        wait_for(lambda: other.execute("SELECT inet_server_port()").fetchone()[0] in replicas, 10, "reads on a replica")
        for _ in range(3):
            name = f"ryw_ddl_{next(_keys)}"
            maker.execute(make.format(name=name))
            assert other.execute(f"SELECT count(*) FROM {name}").fetchone()[0] == 0


def test_a_table_a_pinned_migration_created_is_there_for_every_client(px, cluster):
    """The same with a migration tool's session advisory lock, which pins its session (no WAL
    read-back on a pinned connection): a probe of the primary after the commit bounds the reads."""
    with px.connect(autocommit=True) as migrator, px.connect(autocommit=True) as other:
        migrator.execute("SELECT pg_advisory_lock(4242)")
        for _ in range(3):
            name = f"ryw_ddl_{next(_keys)}"
            migrator.execute(f"CREATE TABLE {name} (k int)")
            assert other.execute(f"SELECT count(*) FROM {name}").fetchone()[0] == 0
        migrator.execute("SELECT pg_advisory_unlock(4242)")


def test_a_table_made_in_a_session_pinned_by_its_temporary_table_is_there_for_every_client(px, cluster):
    """A session pinned by its temporary table (an ORM's scratch table) that then makes or alters
    a permanent table: that DDL bounds every client's replica reads as any pinned session's does.
    (The pin, not the statement, said "temporary": it bounded none, and the other client read
    from a replica that had not replayed the CREATE: 42P01.)"""
    replicas = {n.port for n in cluster.nodes[1:]}
    with px.connect(autocommit=True) as session, px.connect(autocommit=True) as other:
        wait_for(lambda: other.execute("SELECT inet_server_port()").fetchone()[0] in replicas, 10, "reads on a replica")
        session.execute("CREATE TEMP TABLE ryw_scratch (k int)")
        for _ in range(3):
            name = f"ryw_ddl_{next(_keys)}"
            session.execute(f"CREATE TABLE {name} (k int)")
            assert other.execute(f"SELECT count(*) FROM {name}").fetchone()[0] == 0
            session.execute(f"INSERT INTO ryw_scratch VALUES (1); ALTER TABLE {name} ADD COLUMN v int")
            assert other.execute(f"SELECT count(v) FROM {name}").fetchone()[0] == 0
        # The temporary table's own DDL still bounds nobody: once the replicas have replayed the
        # rest, the other client reads from them right after it.
        wait_for(lambda: other.execute("SELECT inet_server_port()").fetchone()[0] in replicas, 10, "reads on a replica again")
        session.execute("ALTER TABLE ryw_scratch ADD COLUMN v int; CREATE INDEX ON ryw_scratch (k)")
        assert other.execute("SELECT inet_server_port()").fetchone()[0] in replicas


def test_ddl_on_temporary_tables_sends_no_other_clients_read_to_the_primary(px, cluster):
    """An ORM's temporary table per request (made, altered, indexed, filled, dropped) in a session
    it pins: no other client's read leaves the replicas for it."""
    replicas = {n.port for n in cluster.nodes[1:]}
    with px.connect(autocommit=True) as session, px.connect(autocommit=True) as other:
        wait_for(lambda: other.execute("SELECT inet_server_port()").fetchone()[0] in replicas, 10, "reads on a replica")
        for i in range(10):
            with session.transaction():
                session.execute("CREATE TEMP TABLE IF NOT EXISTS ryw_request (k int) ON COMMIT DROP")
                session.execute("ALTER TABLE ryw_request ADD COLUMN v int")
                session.execute("CREATE INDEX ON ryw_request (k)")
                session.execute("INSERT INTO ryw_request SELECT k, k FROM ryw LIMIT 5")
            session.execute(f"CREATE TEMP TABLE ryw_kept_{i} (k int); ALTER TABLE pg_temp.ryw_kept_{i} ADD v int")
            session.execute(f"DROP TABLE ryw_kept_{i}")
            assert other.execute("SELECT inet_server_port()").fetchone()[0] in replicas, i


def test_a_table_created_through_one_worker_is_there_through_the_others(cluster, tmp_path):
    """workers = 2: DDL through one worker bounds the other's replica reads too (each worker kept
    its own bound, so a connection on the other worker read from a replica that had not
    replayed the CREATE yet: 42P01)."""
    with start_proxy(
        cluster, tmp_path,
        databases={DATABASE: {"dbname": cluster.app_database, "nodes": [n.addr for n in cluster.nodes]}},
        users={cluster.app_user: {"password": cluster.app_password}},
        **{**CONFIG, "workers": 2, "log_connections": True},
    ) as px:
        wait_for(lambda: px.log_text().count("listening on") >= 3, 30, "both workers up")
        replicas = {n.port for n in cluster.nodes[1:]}
        migrator, other = on_each_worker(px, autocommit=True)
        with migrator, other:
            wait_for(lambda: other.execute("SELECT inet_server_port()").fetchone()[0] in replicas, 20, "reads on a replica")
            new_tables_are_there_for(migrator, other, cluster)
            # And from a session pinned by its temporary table (its pin told the others nothing).
            migrator.execute("CREATE TEMP TABLE ryw_scratch (k int)")
            new_tables_are_there_for(migrator, other, cluster)
