"""A database dropped, renamed or copied through pgtwist: its pooled connections are not in the way.

PostgreSQL refuses DROP DATABASE (ALTER DATABASE ... RENAME TO, CREATE DATABASE ... TEMPLATE)
with 55006 while another session is in the database; a pooler's idle server connections are
such sessions, which a direct client would not have met (Rails' db:drop and test runners hit
this through PgBouncer). On that refusal pgtwist lets its unused connections there go and sends
a lone simple Query again (PostgreSQL waits 5 s before it refuses: these tests take that long).
Connections in use stay, and PostgreSQL's 55006 then says so.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from pgtwist.tools.localcluster import LocalCluster

from tests.harness.proxy import start_proxy, wait_for
from tests.harness.workers import on_each_worker

pytestmark = pytest.mark.integration


def backends_in(admin, name: str) -> int:
    return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()[0]


def exists(admin, name: str) -> bool:
    return admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone()[0] == 1


@pytest.fixture
def scratch(pg_cluster, admin, request):
    """A database the app user owns (and may drop, rename or copy), gone again afterwards."""
    name = f"scratch_{abs(hash(request.node.name)) % 10**8}"
    made = [name]
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {name} OWNER {pg_cluster.app_user}")
    admin.execute(f"ALTER ROLE {pg_cluster.app_user} CREATEDB")
    try:
        yield name, made
    finally:
        admin.execute(f"ALTER ROLE {pg_cluster.app_user} NOCREATEDB")
        for db in made:
            admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def pooled_proxy(pg_cluster, tmp_path, name: str, pool_mode: str):
    primary = pg_cluster.nodes[0].addr
    databases = {
        "appdb": {"dbname": pg_cluster.app_database, "nodes": [primary]},
        "scratch": {"dbname": name, "nodes": [primary]},
    }
    return start_proxy(pg_cluster, tmp_path, databases=databases, pool_mode=pool_mode)


def leave_idle_connections(px, admin, name: str) -> None:
    """Two clients used the database at once and left: two server connections stay, idle."""
    a, b = px.connect(dbname="scratch"), px.connect(dbname="scratch")
    with a, b, a.transaction(), b.transaction():
        a.execute("SELECT 1")
        b.execute("SELECT 1")
    assert backends_in(admin, name) == 2


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_drop_database_through_pgtwist_is_not_refused_for_pgtwists_idle_connections(pg_cluster, tmp_path, admin, scratch, pool_mode):
    name, _ = scratch
    with pooled_proxy(pg_cluster, tmp_path, name, pool_mode) as px:
        leave_idle_connections(px, admin, name)
        with px.connect() as app:
            psycopg.ClientCursor(app).execute(f"DROP DATABASE {name}")  # (one simple Query, as psql and Rails send it)
        assert not exists(admin, name)
        assert "needs databases" in px.log_text() and "Traceback" not in px.log_text()
        with pytest.raises(psycopg.OperationalError, match="does not exist"):
            px.connect(dbname="scratch").close()
        with px.connect() as app:
            assert app.execute("SELECT 1").fetchone() == (1,)  # nobody else noticed


def test_a_client_using_the_database_still_stops_the_drop_as_postgresql_says(pg_cluster, tmp_path, admin, scratch):
    name, _ = scratch
    with pooled_proxy(pg_cluster, tmp_path, name, "transaction") as px:
        leave_idle_connections(px, admin, name)
        with px.connect(dbname="scratch", autocommit=False) as user, px.connect() as app:
            user.execute("SELECT 1")  # inside its transaction: its server connection is in use
            with pytest.raises(psycopg.errors.ObjectInUse, match="1 other session"):
                psycopg.ClientCursor(app).execute(f"DROP DATABASE {name}")
            user.rollback()
            psycopg.ClientCursor(app).execute(f"DROP DATABASE {name}")  # between its transactions: free
        assert not exists(admin, name)


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_an_extended_protocol_drop_finds_the_database_free_at_its_next_attempt(pg_cluster, tmp_path, admin, scratch, pool_mode):
    # Its refusal went to the client with the answers before it (ParseComplete, ...): it cannot
    # be sent again unseen, but pgtwist's connections in the way are gone by then.
    name, _ = scratch
    with pooled_proxy(pg_cluster, tmp_path, name, pool_mode) as px:
        leave_idle_connections(px, admin, name)
        with px.connect(dbname="scratch") as idle_client:
            idle_client.execute("SELECT 1")  # connected, between transactions (transaction pooling: a lent connection)
            if pool_mode == "session":
                idle_client.close()  # (its session is its server connection: it must leave)
            with px.connect() as app:
                with pytest.raises(psycopg.errors.ObjectInUse):
                    app.execute(f"DROP DATABASE {name}", binary=True)  # (binary: Parse/Bind/Describe/Execute/Sync)
                app.execute(f"DROP DATABASE {name}", binary=True)
            assert not exists(admin, name)


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_rename_and_copy_of_a_pooled_database(pg_cluster, tmp_path, admin, scratch, pool_mode):
    name, made = scratch
    copy, renamed = f"{name}_copy", f"{name}_renamed"
    made += [copy, renamed]
    with pooled_proxy(pg_cluster, tmp_path, name, pool_mode) as px:
        leave_idle_connections(px, admin, name)
        with px.connect() as app:
            psycopg.ClientCursor(app).execute(f"CREATE DATABASE {copy} TEMPLATE {name}")
        leave_idle_connections(px, admin, name)
        with px.connect() as app:
            psycopg.ClientCursor(app).execute(f"ALTER DATABASE {name} RENAME TO {renamed}")
        assert exists(admin, copy) and exists(admin, renamed) and not exists(admin, name)


def test_drop_database_under_workers_frees_every_workers_idle_connections(pg_cluster, tmp_path, admin, scratch):
    # Each worker has its own pools: the worker that met the refusal let its idle connections
    # go, the other's stayed, and the statement sent again was refused once more.
    name, _ = scratch
    primary = pg_cluster.nodes[0].addr
    databases = {
        "appdb": {"dbname": pg_cluster.app_database, "nodes": [primary]},
        "scratch": {"dbname": name, "nodes": [primary]},
    }
    with start_proxy(pg_cluster, tmp_path, databases=databases, pool_mode="transaction", workers=2, log_connections=True) as px:
        wait_for(lambda: px.log_text().count("listening on") >= 3, 30, "both workers up")
        for conn in on_each_worker(px, dbname="scratch"):
            with conn:
                conn.execute("SELECT 1")
                conn.commit()
        assert backends_in(admin, name) == 2
        with px.connect() as app:
            psycopg.ClientCursor(app).execute(f"DROP DATABASE {name}")
        assert not exists(admin, name)


def test_drop_database_of_a_monitored_database_is_not_refused_for_the_health_probe(tmp_path):
    # A database with several nodes has a health monitor, whose probe connection to each node
    # is a session in it: DROP DATABASE through pgtwist was refused (55006) however idle pgtwist was.
    with LocalCluster.create(replicas=1) as cluster:
        primary = cluster.nodes[0]
        name = "monitored_scratch"
        cluster.psql(primary, f"CREATE DATABASE {name} OWNER {cluster.app_user}")
        cluster.psql(primary, f"ALTER ROLE {cluster.app_user} CREATEDB")
        cluster.psql(primary, f"GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO {cluster.app_user};")
        cluster.wait_replicas_caught_up(30)
        nodes = [n.addr for n in cluster.nodes]
        databases = {"appdb": {"dbname": cluster.app_database, "nodes": nodes}, "scratch": {"dbname": name, "nodes": nodes}}
        with start_proxy(
            cluster, tmp_path, databases=databases, pool_mode="transaction", health_check_interval=0.2,
            auto_promote=True, failover_timeout=1.0,
        ) as px:
            with psycopg.connect(cluster.dsn(primary, connect_timeout=10), autocommit=True) as direct:
                wait_for(lambda: backends_in(direct, name) >= 1, 10, "the health probe in the database")
                with px.connect(dbname="scratch") as conn:
                    conn.execute("SELECT 1")
                # A replica that has not replayed the DROP (replay paused, or a delayed replica)
                # still has the database: the one auto_promote would have chosen.
                cluster.psql(cluster.nodes[1], "SELECT pg_wal_replay_pause()")
                with px.connect() as app:
                    psycopg.ClientCursor(app).execute(f"DROP DATABASE {name}")
                assert not exists(direct, name)
                with px.connect() as app:
                    assert app.execute("SELECT 1").fetchone() == (1,)  # appdb's own monitor untouched
                # Once the monitor is back (5 s), its login for the dropped database answers 3D000:
                # the primary is not dead, and no replica is promoted for it.
                wait_for(lambda: "does not exist" in px.log_text(), 15, "the probe finding the database gone")
                time.sleep(2.0)  # (failover_timeout twice over)
                assert "promoting" not in px.log_text()
                with psycopg.connect(cluster.dsn(cluster.nodes[1], connect_timeout=10), autocommit=True) as replica:
                    assert replica.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
                cluster.psql(cluster.nodes[1], "SELECT pg_wal_replay_resume()")
