"""Shared prepared statements and schema changes in transaction pooling: what a client sees is what it would see directly.

Each scenario runs twice, straight against PostgreSQL and through a transaction-mode pgtwist
whose pool holds one (or two) server connections, so that every client really uses the same
server-side statement; the outcomes (rows, or the SQLSTATE of the error) must agree. Where
PostgreSQL would fail a client whose own statement went stale outside a transaction, pgtwist
does better: it prepares the statement again and retries, which the README promises.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import asyncpg
import psycopg
import pytest

from tests.harness.proxy import ServerError, start_proxy
from tests.harness.txhelpers import TX_CONFIG, batch, bind, describe, execute, parse, raw_login, run_async, sync

pytestmark = pytest.mark.integration

_names = itertools.count()


def fresh(prefix: str) -> str:
    return f"{prefix}_{next(_names)}"


class Direct:
    """PostgreSQL itself, as the app user: the reference."""

    name = "direct"

    def __init__(self, cluster):
        self.cluster = cluster
        self.node = cluster.nodes[0]

    def dsn(self, **overrides) -> str:
        return self.cluster.dsn(self.node, connect_timeout=10, **overrides)

    def asyncpg_kwargs(self, **overrides) -> dict:
        params = dict(
            host=self.node.host,
            port=self.node.port,
            database=self.cluster.app_database,
            user=self.cluster.app_user,
            password=self.cluster.app_password,
            timeout=10,
            command_timeout=30,
        )
        params.update(overrides)
        return params


class Proxied:
    name = "pgtwist"

    def __init__(self, proxy):
        self.proxy = proxy

    def dsn(self, **overrides) -> str:
        return self.proxy.dsn(**overrides)

    def asyncpg_kwargs(self, **overrides) -> dict:
        return self.proxy.asyncpg_kwargs(**overrides)


@pytest.fixture(scope="module")
def one(pg_cluster, tmp_path_factory):
    """pgtwist with a single server connection: every client shares every server-side statement."""
    with start_proxy(pg_cluster, tmp_path_factory.mktemp("schema1"), **dict(TX_CONFIG, pool_size=1)) as px:
        yield px


@pytest.fixture(scope="module")
def two(pg_cluster, tmp_path_factory):
    with start_proxy(pg_cluster, tmp_path_factory.mktemp("schema2"), **dict(TX_CONFIG, pool_size=2)) as px:
        yield px


@pytest.fixture
def owner(pg_cluster):
    """The app user straight to the primary (DDL not seen by pgtwist), autocommit."""
    with psycopg.connect(Direct(pg_cluster).dsn(), autocommit=True) as conn:
        yield conn


def outcome(fn):
    """fn() -> ("ok", value) or ("error", SQLSTATE)."""
    try:
        return ("ok", fn())
    except psycopg.Error as e:
        return ("error", e.sqlstate)
    except asyncpg.PostgresError as e:
        return ("error", e.sqlstate)


def both(pg_cluster, proxy, scenario):
    """Run scenario(target) directly and through *proxy*; return (direct, proxied) outcomes."""
    return scenario(Direct(pg_cluster)), scenario(Proxied(proxy))


def connect(target, **kw):
    return psycopg.connect(target.dsn(), autocommit=True, prepare_threshold=0, **kw)


# --------------------------------------------------------------------------- scenarios run directly and through pgtwist


def add_column_then_a_new_client(ctx, target):
    t = fresh("sc_add")
    ctx.owner.execute(f"CREATE TABLE {t} (x int)")
    ctx.owner.execute(f"INSERT INTO {t} VALUES (1)")
    with connect(target) as a:
        assert a.execute(f"SELECT * FROM {t}").fetchall() == [(1,)]
        assert a.execute(f"SELECT * FROM {t}").fetchall() == [(1,)]  # (prepared now)
    if ctx.param == "pgtwist":
        with psycopg.connect(target.dsn(), autocommit=True) as c:
            c.execute(f"ALTER TABLE {t} ADD COLUMN y int")
    else:
        ctx.owner.execute(f"ALTER TABLE {t} ADD COLUMN y int")
    with connect(target) as b:  # a NEW client
        got = [outcome(lambda: b.execute(f"SELECT * FROM {t}").fetchall()) for _ in range(3)]
    ctx.owner.execute(f"DROP TABLE {t}")
    return got


def enum_dropped_deallocated_and_created_again(ctx, target):
    e = fresh("sc_enum")
    with connect(target) as c:
        c.execute(f"CREATE TYPE {e} AS ENUM ('foo')")
        first = c.execute(f"SELECT %s::{e}[]", (["foo"],)).fetchone()
        c.execute(f"DROP TYPE {e}")  # psycopg answers this with DEALLOCATE ALL
        c.execute(f"CREATE TYPE {e} AS ENUM ('foo')")
        again = outcome(lambda: c.execute(f"SELECT %s::{e}[]", (["foo"],)).fetchone())
        c.execute(f"DROP TYPE {e}")
    return first, again


def enum_recreated_outside_then_a_new_client(ctx, target):
    e = fresh("sc_enum_out")
    ctx.owner.execute(f"CREATE TYPE {e} AS ENUM ('foo')")
    with connect(target) as c:
        c.execute(f"SELECT %s::{e}[]", (["foo"],)).fetchone()
    ctx.owner.execute(f"DROP TYPE {e}")
    ctx.owner.execute(f"CREATE TYPE {e} AS ENUM ('foo', 'bar')")
    with connect(target) as c:
        got = outcome(lambda: c.execute(f"SELECT %s::{e}[]", (["bar"],)).fetchone())
    ctx.owner.execute(f"DROP TYPE {e}")
    return got


def asyncpg_after_a_stale_statement(ctx, target):
    """asyncpg's own recovery (InvalidCachedStatementError: re-prepare, retry) or pgtwist's: the rows are right."""
    t = fresh("sc_apg")
    ctx.owner.execute(f"CREATE TABLE {t} (x int)")
    ctx.owner.execute(f"INSERT INTO {t} VALUES (1)")

    async def main():
        conn = await asyncpg.connect(**target.asyncpg_kwargs())
        other = await asyncpg.connect(**target.asyncpg_kwargs())
        try:
            assert [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t}")] == [(1,)]
            assert [tuple(r) for r in await other.fetch(f"SELECT * FROM {t}")] == [(1,)]
            if ctx.param == "pgtwist":
                await other.execute(f"ALTER TABLE {t} ADD COLUMN y int")
            else:
                ctx.owner.execute(f"ALTER TABLE {t} ADD COLUMN y int")
            rows = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t}")]
            again = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t}")]
            return rows, again
        finally:
            await conn.close()
            await other.close()

    try:
        return run_async(main(), timeout=30)
    finally:
        ctx.owner.execute(f"DROP TABLE {t}")


def asyncpg_stale_inside_a_transaction(ctx, target):
    t = fresh("sc_apg_tx")
    ctx.owner.execute(f"CREATE TABLE {t} (x int)")
    ctx.owner.execute(f"INSERT INTO {t} VALUES (1)")

    async def main():
        conn = await asyncpg.connect(**target.asyncpg_kwargs())
        try:
            await conn.fetch(f"SELECT * FROM {t}")
            ctx.owner.execute(f"ALTER TABLE {t} ADD COLUMN y int")
            try:
                async with conn.transaction():
                    await conn.fetch(f"SELECT * FROM {t}")
                first = "ok"
            except asyncpg.exceptions.InvalidCachedStatementError as e:
                first = ("error", e.sqlstate)
            after = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t}")]
            return first, after
        finally:
            await conn.close()

    try:
        return run_async(main(), timeout=30)
    finally:
        ctx.owner.execute(f"DROP TABLE {t}")


def ddl_inside_an_explicit_transaction(ctx, target):
    t = fresh("sc_tx")
    ctx.owner.execute(f"CREATE TABLE {t} (x int)")
    ctx.owner.execute(f"INSERT INTO {t} VALUES (1)")
    with connect(target) as warm:
        warm.execute(f"SELECT * FROM {t}").fetchall()
        warm.execute(f"SELECT * FROM {t}").fetchall()
    got = []
    with connect(target) as c:
        with c.transaction():
            c.execute(f"ALTER TABLE {t} ADD COLUMN y int DEFAULT 7")
            got.append(outcome(lambda: c.execute(f"SELECT * FROM {t}").fetchall()))
            got.append(outcome(lambda: c.execute(f"SELECT * FROM {t}").fetchall()))
        got.append(outcome(lambda: c.execute(f"SELECT * FROM {t}").fetchall()))
    with connect(target) as d:
        with d.transaction():
            got.append(outcome(lambda: d.execute(f"SELECT * FROM {t}").fetchall()))
    ctx.owner.execute(f"DROP TABLE {t}")
    return got


def table_dropped_and_created_again_with_other_columns(ctx, target):
    t = fresh("sc_recreate")
    ctx.owner.execute(f"CREATE TABLE {t} (x int)")
    ctx.owner.execute(f"INSERT INTO {t} VALUES (1)")
    with connect(target) as a:
        a.execute(f"SELECT * FROM {t}").fetchall()
        a.execute(f"SELECT * FROM {t}").fetchall()
    ddl = f"DROP TABLE {t}; CREATE TABLE {t} (a text, b text); INSERT INTO {t} VALUES ('p', 'q')"
    if ctx.param == "pgtwist":
        with psycopg.connect(target.dsn(), autocommit=True) as c:
            c.execute(ddl)
    else:
        ctx.owner.execute(ddl)
    with connect(target) as b:
        got = [outcome(lambda: b.execute(f"SELECT * FROM {t}").fetchall())]
        with b.transaction():
            got.append(outcome(lambda: b.execute(f"SELECT * FROM {t}").fetchall()))
    ctx.owner.execute(f"DROP TABLE {t}")
    return got


def alter_column_type_under_an_old_client(ctx, target):
    """The client's own statement went stale (DDL outside pgtwist): PostgreSQL fails it with 0A000.
    pgtwist retries it transparently outside a transaction; inside one the client gets 0A000 as directly."""
    t = fresh("sc_type")
    ctx.owner.execute(f"CREATE TABLE {t} (x int)")
    ctx.owner.execute(f"INSERT INTO {t} VALUES (1)")
    with connect(target) as a:
        a.execute(f"SELECT * FROM {t}").fetchall()
        ctx.owner.execute(f"ALTER TABLE {t} ALTER COLUMN x TYPE text")
        outside = outcome(lambda: a.execute(f"SELECT * FROM {t}").fetchall())
        ctx.owner.execute(f"ALTER TABLE {t} ALTER COLUMN x TYPE bigint USING x::bigint")
        a.execute("BEGIN")
        inside = outcome(lambda: a.execute(f"SELECT * FROM {t}").fetchall())
        a.execute("ROLLBACK")
        later = outcome(lambda: a.execute("SELECT 1").fetchall())
    ctx.owner.execute(f"DROP TABLE {t}")
    return outside, inside, later


def deallocate_all_in_a_failed_transaction(ctx, target):
    with connect(target) as c:
        c.execute("SELECT %s::int", (1,))
        c.execute("BEGIN")
        first = outcome(lambda: c.execute("SELECT 1/0"))
        dealloc = outcome(lambda: c.execute("DEALLOCATE ALL"))
        c.execute("ROLLBACK")
        after = outcome(lambda: c.execute("SELECT %s::int", (2,)).fetchone())
        return first, dealloc, after


def asyncpg_on_a_connection_that_must_prepare_afresh(ctx, target):
    """asyncpg decodes by the description it got when it prepared. Its next run lands on a server
    connection with no copy (DISCARD ALL by another client dropped them): the copy made there
    has the new result type, so the run must fail as PostgreSQL fails the client's own statement
    (0A000, which asyncpg recovers from by itself outside a transaction), not return rows of
    another shape."""
    t = fresh("sc_apg_fresh")
    ctx.owner.execute(f"CREATE TABLE {t} (x int)")
    ctx.owner.execute(f"INSERT INTO {t} VALUES (1)")

    async def main():
        conn = await asyncpg.connect(**target.asyncpg_kwargs())
        other = await asyncpg.connect(**target.asyncpg_kwargs())
        try:
            assert [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t}")] == [(1,)]
            await other.execute("DISCARD ALL")
            ctx.owner.execute(f"ALTER TABLE {t} ADD COLUMN y int DEFAULT 2")
            if ctx.param:
                try:
                    async with conn.transaction():
                        await conn.fetch(f"SELECT * FROM {t}")
                    first = "ok"
                except asyncpg.exceptions.InvalidCachedStatementError as e:
                    first = ("error", e.sqlstate)
            else:
                first = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t}")]
            after = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t}")]
            return first, after
        finally:
            await conn.close()
            await other.close()

    try:
        return run_async(main(), timeout=30)
    finally:
        ctx.owner.execute(f"DROP TABLE {t}")


def discard_all_refused_inside_a_transaction(ctx, target):
    with connect(target) as c:
        first = c.execute("SELECT %s::int + 1", (1,)).fetchone()
        c.execute("BEGIN")
        refused = outcome(lambda: c.execute("DISCARD ALL"))
        c.execute("ROLLBACK")
        again = outcome(lambda: c.execute("SELECT %s::int + 1", (2,)).fetchone())
        twice = outcome(lambda: c.execute("SELECT %s::int + 1", (3,)).fetchone())
        return first, refused, again, twice

class Ctx(NamedTuple):
    owner: psycopg.Connection  # the app user straight to the primary: DDL pgtwist does not see
    param: str | bool | None  # the case's variant (ddl_via, in_transaction), if it has one


SAME = "as directly"


def case(scenario, direct, proxied=SAME, param=None):
    """One run of *scenario* directly and through pgtwist: what PostgreSQL answers (a value, or a
    check of it), and what pgtwist must answer (SAME: exactly that)."""
    name = scenario.__name__ if param is None else f"{scenario.__name__}-{param}"
    return pytest.param(scenario, param, direct, proxied, id=name)


CASES = [
    # The reproductions.
    case(add_column_then_a_new_client, [("ok", [(1, None)])] * 3, param="pgtwist"),
    case(add_column_then_a_new_client, [("ok", [(1, None)])] * 3, param="outside"),
    case(enum_dropped_deallocated_and_created_again, lambda d: d[1][0] == "ok"),
    case(enum_recreated_outside_then_a_new_client, lambda d: d[0] == "ok"),
    case(asyncpg_after_a_stale_statement, ([(1, None)], [(1, None)]), param="pgtwist"),
    case(asyncpg_after_a_stale_statement, ([(1, None)], [(1, None)]), param="outside"),
    case(asyncpg_stale_inside_a_transaction, (("error", "0A000"), [(1, None)])),
    # Variants.
    case(ddl_inside_an_explicit_transaction, [("ok", [(1, 7)])] * 4),
    case(table_dropped_and_created_again_with_other_columns, [("ok", [("p", "q")])] * 2, param="pgtwist"),
    case(table_dropped_and_created_again_with_other_columns, [("ok", [("p", "q")])] * 2, param="outside"),
    # pgtwist retries the client's stale statement outside a transaction (PostgreSQL fails it):
    case(
        alter_column_type_under_an_old_client,
        (("error", "0A000"), ("error", "0A000"), ("ok", [(1,)])),
        proxied=(("ok", [("1",)]), ("error", "0A000"), ("ok", [(1,)])),
    ),
    case(deallocate_all_in_a_failed_transaction, (("error", "22012"), ("error", "25P02"), ("ok", (2,)))),
    case(asyncpg_on_a_connection_that_must_prepare_afresh, ([(1, 2)], [(1, 2)]), param=False),
    case(asyncpg_on_a_connection_that_must_prepare_afresh, (("error", "0A000"), [(1, 2)]), param=True),
    case(discard_all_refused_inside_a_transaction, ((2,), ("error", "25001"), ("ok", (3,)), ("ok", (4,)))),
]


@pytest.mark.parametrize("scenario, param, direct_expected, proxied_expected", CASES)
def test_pgtwist_answers_as_postgresql_does(pg_cluster, one, owner, scenario, param, direct_expected, proxied_expected):
    ctx = Ctx(owner, param)
    direct, proxied = both(pg_cluster, one, lambda target: scenario(ctx, target))
    if callable(direct_expected):
        assert direct_expected(direct), direct
    else:
        assert direct == direct_expected
    assert proxied == (direct if proxied_expected is SAME else proxied_expected)



@pytest.mark.parametrize("how", ["startup", "set"])
def test_clients_with_different_search_paths_never_share_a_statement(pg_cluster, one, owner, admin, how):
    sa, sb = fresh("sc_sp_a"), fresh("sc_sp_b")
    admin.execute(f"CREATE SCHEMA {sa} AUTHORIZATION {pg_cluster.app_user}")
    admin.execute(f"CREATE SCHEMA {sb} AUTHORIZATION {pg_cluster.app_user}")
    owner.execute(f"CREATE TABLE {sa}.t (x int)")
    owner.execute(f"INSERT INTO {sa}.t VALUES (1)")
    owner.execute(f"CREATE TABLE {sb}.t (name text, n bigint)")
    owner.execute(f"INSERT INTO {sb}.t VALUES ('b', 2)")

    def scenario(target):
        def client(schema):
            if how == "startup":
                return psycopg.connect(target.dsn(options=f"-c search_path={schema}"), autocommit=True, prepare_threshold=0)
            c = connect(target)
            c.execute(f"SET search_path = {schema}")
            return c

        with client(sa) as a, client(sb) as b:
            got = []
            for _ in range(3):
                got.append(outcome(lambda: a.execute("SELECT * FROM t").fetchall()))
                got.append(outcome(lambda: b.execute("SELECT * FROM t").fetchall()))
            return got

    try:
        direct, proxied = both(pg_cluster, one, scenario)
        assert direct == [("ok", [(1,)]), ("ok", [("b", 2)])] * 3
        assert proxied == direct
    finally:
        admin.execute(f"DROP SCHEMA {sa} CASCADE")
        admin.execute(f"DROP SCHEMA {sb} CASCADE")


# --------------------------------------------------------------------------- variants


def test_ddl_through_pgtwist_reaches_every_server_connection(pg_cluster, two):
    """Two server connections both hold the statement; DDL on one makes the other prepare it again,
    even for a client already inside a transaction (where no retry is possible)."""
    t = fresh("sc_two")
    with two.connect() as setup:
        setup.execute(f"CREATE TABLE {t} (x int)")
        setup.execute(f"INSERT INTO {t} VALUES (1)")
    with connect(Proxied(two)) as a, connect(Proxied(two)) as holder, two.connect() as ddl:
        pids = set()
        for _ in range(2):  # a prepares it on both connections: holder keeps one busy in turn
            holder.execute("BEGIN")
            pids.add(holder.execute("SELECT pg_backend_pid()").fetchone()[0])
            assert a.execute(f"SELECT * FROM {t}").fetchall() == [(1,)]
            holder.execute("COMMIT")
            if len(pids) == 1:
                holder.execute("BEGIN")
                holder.execute("SELECT 1")
                ddl.execute("SELECT 1")  # (moves the connections around)
                holder.execute("COMMIT")
        ddl.execute(f"ALTER TABLE {t} ADD COLUMN y int DEFAULT 5")
        for _ in range(4):
            with a.transaction():
                assert a.execute(f"SELECT * FROM {t}").fetchall() == [(1, 5)]
            with holder.transaction():
                holder.execute("SELECT 1")
                with a.transaction():
                    pass
        with two.connect() as cleanup:
            cleanup.execute(f"DROP TABLE {t}")


def test_extended_protocol_describe_after_a_schema_change(pg_cluster, one, owner):
    t = fresh("sc_describe")
    owner.execute(f"CREATE TABLE {t} (x int)")
    try:
        with raw_login(one) as a:
            r = batch(a, parse("s", f"SELECT * FROM {t}"), describe("S", "s"), sync())
            assert r.types == "1tTZ", r
            owner.execute(f"ALTER TABLE {t} ADD COLUMN y int, ADD COLUMN z int")
            with raw_login(one) as b:
                r = batch(b, parse("s", f"SELECT * FROM {t}"), describe("S", "s"), sync())
                assert r.types == "1tTZ", r
                (row_description,) = [body for typ, body in r.messages if typ == ord("T")]
                assert int.from_bytes(row_description[:2], "big") == 3
            # a's own statement is stale: outside a transaction, pgtwist prepares it again.
            r = batch(a, describe("S", "s"), sync())
            assert r.types == "tTZ", r
            r = batch(a, bind("s"), execute(), sync())
            assert r.types == "2CZ", r
    finally:
        owner.execute(f"DROP TABLE {t}")


def test_many_clients_over_two_connections_while_the_schema_changes_outside(pg_cluster, two, owner):
    """Eight psycopg clients run a prepared SELECT * in a loop over two server connections while
    columns are added directly on the node: each sees the table as it is, and never an error."""
    import threading
    import time

    from tests.harness.txhelpers import run_threads

    t = fresh("sc_many")
    owner.execute(f"CREATE TABLE {t} (c0 int)")
    owner.execute(f"INSERT INTO {t} VALUES (0)")
    done = threading.Event()

    def client(i: int) -> int:
        widths = []
        with connect(Proxied(two)) as c:
            while not done.is_set() or len(widths) < 5:
                (row,) = c.execute(f"SELECT * FROM {t}").fetchall()
                widths.append(len(row))
        assert widths == sorted(widths), widths  # never an older shape after a newer one
        return widths[-1]

    def alter() -> None:
        try:
            for k in range(1, 5):
                time.sleep(0.3)
                owner.execute(f"ALTER TABLE {t} ADD COLUMN c{k} int DEFAULT {k}")
            time.sleep(0.3)
        finally:
            done.set()

    changer = threading.Thread(target=alter, daemon=True)
    changer.start()
    try:
        assert run_threads(client, 8, timeout=60) == [5] * 8
    finally:
        changer.join(10)
        owner.execute(f"DROP TABLE {t}")


def test_discard_all_refused_inside_a_transaction_keeps_the_statements_raw(one):
    with raw_login(one) as c:
        assert batch(c, parse("keep", "SELECT $1::int + 1"), sync()).types == "1Z"
        c.query("BEGIN")
        with pytest.raises(ServerError) as refused:
            c.query("DISCARD ALL")
        assert refused.value.sqlstate == "25001"
        c.query("ROLLBACK")
        r = batch(c, bind("keep", ("41",)), execute(), sync())
        assert r.rows == [["42"]], r


def test_pgjdbc_server_prepared_statements_across_schema_changes(pg_cluster, one, tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    jar = Path("/usr/share/java/postgresql.jar")
    if not (shutil.which("javac") and shutil.which("java") and jar.is_file()):
        pytest.skip("pgjdbc test needs javac, java and libpostgresql-jdbc-java: run ./dev setup")
    source = Path(__file__).resolve().parent / "java" / "PgjdbcSchema.java"
    proc = subprocess.run(["javac", "-nowarn", "-cp", str(jar), "-d", str(tmp_path), str(source)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    node = pg_cluster.nodes[0]
    direct_url = f"jdbc:postgresql://{node.host}:{node.port}/{pg_cluster.app_database}"

    def run(url: str) -> list[str]:
        t = fresh("sc_jdbc")
        with psycopg.connect(Direct(pg_cluster).dsn(), autocommit=True) as owner:
            owner.execute(f"CREATE TABLE {t} (x int)")
            owner.execute(f"INSERT INTO {t} VALUES (1)")
            try:
                out = subprocess.run(
                    ["java", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", f"{jar}:{tmp_path}", "PgjdbcSchema",
                     url, direct_url, pg_cluster.app_user, pg_cluster.app_password, t],
                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                )
            finally:
                owner.execute(f"DROP TABLE {t}")
        assert out.returncode == 0, out.stdout + out.stderr
        return [line for line in out.stdout.splitlines() if line.startswith("STEP ")]

    direct = run(direct_url)
    proxied = run(f"jdbc:postgresql://{one.host}:{one.port}/appdb")
    assert len(direct) == 10, direct
    assert proxied == direct, "\n".join(f"{a}  |  {b}" for a, b in zip(direct, proxied))


def test_set_local_search_path_inside_a_transaction_shares_nothing(pg_cluster, one, owner, admin):
    sb = fresh("sc_local_b")
    t = fresh("sc_local_t")
    admin.execute(f"CREATE SCHEMA {sb} AUTHORIZATION {pg_cluster.app_user}")
    owner.execute(f"CREATE TABLE public.{t} (x int)")
    owner.execute(f"INSERT INTO public.{t} VALUES (1)")
    owner.execute(f"CREATE TABLE {sb}.{t} (name text, n bigint)")
    owner.execute(f"INSERT INTO {sb}.{t} VALUES ('b', 2)")

    def scenario(target):
        with connect(target) as a, connect(target) as b:
            got = [outcome(lambda: a.execute(f"SELECT * FROM {t}").fetchall())]
            with b.transaction():
                b.execute(f"SET LOCAL search_path = {sb}")
                got.append(outcome(lambda: b.execute(f"SELECT * FROM {t}").fetchall()))
                got.append(outcome(lambda: b.execute(f"SELECT * FROM {t}").fetchall()))
            got.append(outcome(lambda: a.execute(f"SELECT * FROM {t}").fetchall()))
            with a.transaction():
                got.append(outcome(lambda: a.execute(f"SELECT * FROM {t}").fetchall()))
            got.append(outcome(lambda: b.execute(f"SELECT * FROM {t}").fetchall()))
            return got

    try:
        direct, proxied = both(pg_cluster, one, scenario)
        # b's own statement was made under its SET LOCAL path: once that is gone PostgreSQL
        # analyses it again under the default path and fails it (new result type); pgtwist,
        # outside a transaction, prepares it again and retries.
        assert direct == [("ok", [(1,)]), ("ok", [("b", 2)]), ("ok", [("b", 2)]), ("ok", [(1,)]), ("ok", [(1,)]), ("error", "0A000")]
        assert proxied == direct[:5] + [("ok", [(1,)])]
    finally:
        owner.execute(f"DROP TABLE public.{t}")
        admin.execute(f"DROP SCHEMA {sb} CASCADE")
