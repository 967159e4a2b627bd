"""PgBouncer's limits and per-database / per-user settings against real PostgreSQL:
pool_mode per database and per user (user over database over global), max_db_connections,
max_user_connections, reserve_pool_size after reserve_pool_timeout."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from tests.harness.proxy import DATABASE, clients_waiting, start_proxy, wait_for

pytestmark = pytest.mark.integration

OWN_PIDS_FROM = 2**22 + 1  # pgtwist's own BackendKeyData process ids (transaction pooling) start here


def connect(px, user, password, dbname=DATABASE):
    return psycopg.connect(
        host=px.host, port=px.port, dbname=dbname, user=user, password=password, sslmode="disable", connect_timeout=10, autocommit=True
    )


def mode_of(conn) -> str:
    """Session pooling gives the node's own process id; transaction pooling one of pgtwist's."""
    node_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    if conn.info.backend_pid == node_pid:
        return "session"
    assert conn.info.backend_pid >= OWN_PIDS_FROM
    return "transaction"


def test_pool_mode_user_over_database_over_global(pg_cluster, tmp_path):
    c = pg_cluster
    node = c.nodes[0].addr
    databases = {
        DATABASE: {"dbname": c.app_database, "nodes": [node], "pool_mode": "transaction"},
        "plain": {"dbname": c.app_database, "nodes": [node]},
    }
    users = {
        c.app_user: {"password": c.app_password, "pool_mode": "session"},
        c.superuser: {"password": c.superuser_password},
    }
    with start_proxy(c, tmp_path, pool_mode="session", databases=databases, users=users) as px:
        with connect(px, c.superuser, c.superuser_password) as conn:
            assert mode_of(conn) == "transaction"  # the database's
        with connect(px, c.app_user, c.app_password) as conn:
            assert mode_of(conn) == "session"  # the user's, over the database's
        with connect(px, c.superuser, c.superuser_password, "plain") as conn:
            assert mode_of(conn) == "session"  # the global one
        with connect(px, c.app_user, c.app_password, "plain") as conn:
            assert mode_of(conn) == "session"


def test_max_db_connections_across_users_and_room_made_from_an_idle_pool(pg_cluster, admin, tmp_path):
    c = pg_cluster
    users = {c.app_user: {"password": c.app_password}, c.superuser: {"password": c.superuser_password}}
    with start_proxy(c, tmp_path, pool_size=5, max_db_connections=2, query_wait_timeout=30, users=users) as px:
        first, second = connect(px, c.app_user, c.app_password), connect(px, c.app_user, c.app_password)
        first_pid = first.execute("SELECT pg_backend_pid()").fetchone()[0]
        with ThreadPoolExecutor(1) as pool:
            third = pool.submit(connect, px, c.superuser, c.superuser_password)
            time.sleep(1.5)
            assert not third.done()  # the database has its 2 server connections
            first.close()  # its connection goes back idle: the waiting client's pool closes it and opens its own
            conn = third.result(timeout=10)
        assert conn.execute("SELECT current_user").fetchone()[0] == c.superuser
        # (The evicted connection's backend exits a moment after pgtwist hangs up.)
        # (Its own backend, by pid: the shared cluster may hold other tests' connections of the user.)
        deadline = time.monotonic() + 10
        while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (first_pid,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the evicted connection stayed"
            time.sleep(0.1)
        conn.close(), second.close()


def test_users_sharing_max_db_connections_are_all_served_under_load(pg_cluster, tmp_path):
    # Many clients of two users over a database limit of 2, transaction pooling: the pool that got
    # the connections first handed them from client to client and never let one go, and the other
    # user's clients waited in vain for query_wait_timeout. Now its pool closes one for them
    # (ConnectionLimits.yield_to) and the limit is shared.
    c = pg_cluster
    users = {c.app_user: {"password": c.app_password}, c.superuser: {"password": c.superuser_password}}
    with start_proxy(c, tmp_path, pool_mode="transaction", pool_size=2, max_db_connections=2, query_wait_timeout=3, users=users,
                     admin={"users": [c.superuser]}) as px:
        deadline = time.monotonic() + 5

        def client(user, password):
            done = 0
            with connect(px, user, password) as conn:
                while time.monotonic() < deadline:
                    assert conn.execute("SELECT current_user").fetchone()[0] == user
                    done += 1
            return user, done

        jobs = [(c.app_user, c.app_password)] * 6 + [(c.superuser, c.superuser_password)] * 6
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = [f.result(timeout=30) for f in [pool.submit(client, *job) for job in jobs]]
        by_user: dict[str, list[int]] = {}
        for user, done in results:
            by_user.setdefault(user, []).append(done)
        assert all(n > 0 for counts in by_user.values() for n in counts), by_user  # every client, of each user
        with px.connect(dbname="pgbalance", user=c.superuser, password=c.superuser_password) as console:
            cur = console.execute("SHOW NODE_POOLS")
            names = [d.name for d in cur.description]
            pools = [dict(zip(names, row)) for row in cur.fetchall()]
        assert sum(p["yielded"] for p in pools) >= 1, pools


def test_a_lower_pool_size_takes_effect_under_load(pg_cluster, admin, tmp_path):
    # SET pool_size (or a SIGHUP reload) lowered under load: the connections over it close as their
    # clients finish, as PgBouncer's janitor closes "too many servers in the pool"; pgtwist kept
    # handing them from client to client, all of them, for as long as the load went on.
    c = pg_cluster
    name = "shrink-under-load"
    users = {c.app_user: {"password": c.app_password}, c.superuser: {"password": c.superuser_password}}
    with start_proxy(c, tmp_path, pool_mode="transaction", pool_size=6, users=users, admin={"users": [c.superuser]}) as px:
        stop = time.monotonic() + 30
        failures: list = []

        def client():
            try:
                with psycopg.connect(px.dsn(application_name=name), autocommit=True) as conn:
                    while time.monotonic() < stop:
                        conn.execute("SELECT pg_sleep(0.002)")
            except Exception as e:  # noqa: BLE001 - reported below
                failures.append(e)

        def backends() -> int:
            return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)).fetchone()[0]

        with ThreadPoolExecutor(12) as pool:
            for _ in range(12):
                pool.submit(client)
            deadline = time.monotonic() + 10
            while backends() < 6:
                assert time.monotonic() < deadline, backends()
                time.sleep(0.1)
            with px.connect(dbname="pgbalance", user=c.superuser, password=c.superuser_password) as console:
                console.execute("SET pool_size = 2")
            deadline = time.monotonic() + 10
            while backends() > 2:
                assert time.monotonic() < deadline, f"{backends()} server connections stayed over pool_size 2"
                time.sleep(0.1)
            time.sleep(0.5)
            assert backends() <= 2  # (and none opened again)
            stop = time.monotonic()
        assert not failures, failures[:3]


def test_max_user_connections_across_databases(pg_cluster, tmp_path):
    c = pg_cluster
    node = c.nodes[0].addr
    databases = {DATABASE: {"dbname": c.app_database, "nodes": [node]}, "other": {"dbname": c.app_database, "nodes": [node]}}
    users = {c.app_user: {"password": c.app_password, "max_user_connections": 1}}
    with start_proxy(c, tmp_path, query_wait_timeout=2, databases=databases, users=users) as px:
        with connect(px, c.app_user, c.app_password):
            with pytest.raises(psycopg.OperationalError) as e:
                connect(px, c.app_user, c.app_password, "other").close()
            assert "max_user_connections (1)" in str(e.value)


def test_reserve_pool_after_reserve_pool_timeout(pg_cluster, tmp_path):
    c = pg_cluster
    with start_proxy(c, tmp_path, pool_size=1, reserve_pool_size=1, reserve_pool_timeout=1.0, query_wait_timeout=6) as px:
        holder = connect(px, px.user, px.password)
        started = time.monotonic()
        second = connect(px, px.user, px.password)  # waits reserve_pool_timeout, then gets a reserve connection
        waited = time.monotonic() - started
        assert 0.9 <= waited < 5, waited
        # pool_size + reserve_pool_size are in use: the next one waits query_wait_timeout for nothing.
        with pytest.raises(psycopg.OperationalError) as e:
            connect(px, px.user, px.password).close()
        assert "became free within" in str(e.value) and "reserve_pool_size 1" in str(e.value)
        holder.close(), second.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_idle_timeout_closes_a_silent_client_only(pg_cluster, tmp_path, mode):
    c = pg_cluster
    with start_proxy(c, tmp_path, pool_mode=mode, client_idle_timeout=2.0) as px:
        busy, silent = px.connect(autocommit=True), px.connect(autocommit=True)
        busy.execute("SELECT pg_sleep(3.5)")  # a statement longer than the timeout is not idleness
        for _ in range(3):
            time.sleep(1)
            busy.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError) as e:
            silent.execute("SELECT 1")
        assert "client_idle_timeout" in str(e.value)
        assert busy.execute("SELECT 1").fetchone() == (1,)
        assert "57P05 client_idle_timeout" in px.log_text()
        busy.close(), silent.close()


CHECK_FUNCTION = """
CREATE TABLE pgtwist_check_fail (pid int);
CREATE TABLE pgtwist_check_calls (pid int);
GRANT ALL ON pgtwist_check_fail, pgtwist_check_calls TO PUBLIC;
CREATE FUNCTION pgtwist_check() RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgtwist_check_calls VALUES (pg_backend_pid());
    IF EXISTS (SELECT 1 FROM pgtwist_check_fail WHERE pid = pg_backend_pid()) THEN
        RAISE EXCEPTION 'this connection is broken';
    END IF;
    RETURN 1;
END $$;
"""


def test_server_check_query_on_reuse_drops_a_bad_connection_unseen(pg_cluster, admin, tmp_path):
    c = pg_cluster
    admin.execute(CHECK_FUNCTION)
    try:
        with start_proxy(c, tmp_path, pool_size=1, server_check_delay=1.0, server_check_query="SELECT pgtwist_check()") as px:
            with px.connect() as conn:
                first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            with px.connect() as conn:  # at once (pool_size 1: after its reset): reused without a check
                assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first
            assert admin.execute("SELECT count(*) FROM pgtwist_check_calls").fetchone()[0] == 0
            time.sleep(2.5)  # idle past server_check_delay (and a janitor tick)
            with px.connect() as conn:  # checked, then handed out
                assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first
            assert admin.execute("SELECT count(*) FROM pgtwist_check_calls WHERE pid = %s", (first,)).fetchone()[0] == 1

            admin.execute("INSERT INTO pgtwist_check_fail VALUES (%s)", (first,))
            time.sleep(2.5)
            with px.connect() as conn:  # its check fails: dropped, and the client gets a new one unawares
                second = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                assert second != first and conn.execute("SELECT 1").fetchone() == (1,)
            assert "failed server_check_query" in px.log_text()
            assert wait_gone(admin, first)
    finally:
        admin.execute("DROP FUNCTION pgtwist_check(); DROP TABLE pgtwist_check_fail, pgtwist_check_calls")


def wait_gone(admin, pid: int) -> bool:
    deadline = time.monotonic() + 10
    while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_server_idle_timeout_closes_the_connection_a_quiet_client_keeps(pg_cluster, admin, tmp_path):
    # Transaction pooling lends a client its connection between transactions while nobody else
    # needs it: a client sitting idle after its work kept a backend open for as long as it stayed
    # connected. It is closed after server_idle_timeout, as an idle connection in the pool is.
    c = pg_cluster
    name = "quiet-client"
    with start_proxy(c, tmp_path, pool_mode="transaction", server_idle_timeout=2) as px:
        with psycopg.connect(px.dsn(application_name=name), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

            def backends() -> int:
                return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)).fetchone()[0]

            assert backends() == 1
            deadline = time.monotonic() + 10
            while backends():
                assert time.monotonic() < deadline, "the connection the quiet client kept stayed open"
                time.sleep(0.2)
            assert conn.execute("SELECT 2").fetchone() == (2,)  # the client goes on, on a new one


def test_an_empty_pipeline_does_not_wait_for_a_full_pool(pg_cluster, tmp_path):
    # psycopg sends a lone Sync when a pipeline block ends with nothing left to sync (an empty
    # block, or one whose statement was cancelled while it waited): PostgreSQL answers at once;
    # pgtwist waited for a server connection, query_wait_timeout on a full pool.
    with start_proxy(
        pg_cluster, tmp_path, pool_mode="transaction", pool_size=1, query_wait_timeout=20, admin={"users": [pg_cluster.app_user]},
    ) as px:
        with px.connect(autocommit=False) as holder, px.connect(autocommit=True) as other:
            holder.execute("SELECT 1")  # (in its transaction: the pool's one connection is taken)
            started = time.monotonic()
            with other.pipeline():
                pass
            assert time.monotonic() - started < 5
            # A pipeline cancelled while its statement waits: 57014, and its block ends at once.
            errors = []

            def pipeline():
                try:
                    with other.pipeline():
                        other.execute("SELECT 3")
                except psycopg.errors.QueryCanceled as e:
                    errors.append(e)

            with ThreadPoolExecutor(1) as pool:
                done = pool.submit(pipeline)
                with px.connect(dbname="pgbalance", autocommit=True) as console:
                    wait_for(lambda: clients_waiting(console), 10, "the pipeline's statement waiting", interval=0.02)
                other.cancel()
                started = time.monotonic()
                done.result(10)
            assert errors and time.monotonic() - started < 5
            holder.rollback()
            with other.pipeline():
                assert other.execute("SELECT 2").fetchone()[0] == 2
