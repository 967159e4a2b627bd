"""What a client can tell apart from a direct connection: reported parameters, its unnamed statement, backend pids.

Real PostgreSQL (the shared LocalCluster), real drivers (psycopg 3), pgtwist under twistd.
"""

import psycopg
import pytest

from tests.harness import proxy as proxymod
from tests.harness.txhelpers import TX_CONFIG

pytestmark = pytest.mark.integration


def _users(cluster) -> dict:
    return {
        cluster.app_user: {"password": cluster.app_password},
        cluster.superuser: {"password": cluster.superuser_password},
    }


@pytest.fixture(scope="module")
def tx_proxy(pg_cluster, tmp_path_factory):
    """Transaction pooling, the app user and the superuser."""
    with proxymod.start_proxy(pg_cluster, tmp_path_factory.mktemp("tx-view"), users=_users(pg_cluster), **TX_CONFIG) as px:
        yield px


def _reported(px, user: str, password: str, **dsn) -> tuple[str | None, str | None, str]:
    with psycopg.connect(px.dsn(user=user, password=password, **dsn), autocommit=True) as conn:
        info = conn.info
        ran_as = conn.execute("SELECT current_user").fetchone()[0]
        return info.parameter_status("session_authorization"), info.parameter_status("is_superuser"), ran_as


# -- 1. what a login reports is the user's own ------------------------------------------------------


@pytest.mark.parametrize("superuser_first", [True, False])
def test_each_user_is_told_its_own_session_authorization(tx_proxy, pg_cluster, superuser_first):
    """A superuser and a plain user log in with the same startup settings, in either order: each
    is told its own session_authorization and is_superuser (psql's prompt shows # only for the
    superuser), as on a direct connection; and a second login of each (answered without a
    server connection) says the same again."""
    app = (pg_cluster.app_user, pg_cluster.app_password, "off")
    sup = (pg_cluster.superuser, pg_cluster.superuser_password, "on")
    order = [sup, app] if superuser_first else [app, sup]
    name = f"view-{superuser_first}"  # startup settings no earlier test logged in with
    for _ in range(2):
        for user, password, is_superuser in order:
            assert _reported(tx_proxy, user, password, application_name=name) == (user, is_superuser, user)


def test_login_reports_what_a_direct_login_reports(tx_proxy, pg_cluster):
    """Everything PostgreSQL reports at login, for each user, twice (the second from memory)."""
    primary = pg_cluster.nodes[0]
    for user, password in ((pg_cluster.app_user, pg_cluster.app_password), (pg_cluster.superuser, pg_cluster.superuser_password)):
        direct_dsn = pg_cluster.dsn(primary, user=user, password=password, dbname=pg_cluster.app_database, connect_timeout=10)
        with psycopg.connect(direct_dsn) as direct:
            want = {k: direct.info.parameter_status(k) for k in _REPORTED}
        for _ in range(2):
            with psycopg.connect(tx_proxy.dsn(user=user, password=password), autocommit=True) as conn:
                got = {k: conn.info.parameter_status(k) for k in _REPORTED}
            assert got == want


_REPORTED = (
    "session_authorization",
    "is_superuser",
    "server_version",
    "in_hot_standby",
    "server_encoding",
    "client_encoding",
    "integer_datetimes",
    "standard_conforming_strings",
)


# -- 2. the client's unnamed statement and portal survive what pgtwist runs for it ---------------


def _direct(pg_cluster, **kw):
    primary = pg_cluster.nodes[0]
    return psycopg.connect(pg_cluster.dsn(primary, connect_timeout=10, **kw), autocommit=True)


def _ok(result, status=None):
    want = status if status is not None else psycopg.pq.ExecStatus.COMMAND_OK
    assert result.status == want, result.error_message
    return result


def _unnamed_kept_across(conn, *setup: tuple[bytes, bytes]) -> bytes:
    """Parse the unnamed statement, run each (name, sql) of *setup* as a named prepared statement,
    then execute the unnamed one: its answer (b"42"), or the error it got."""
    pg = conn.pgconn
    _ok(pg.prepare(b"", b"select $1::int + 1"))
    for name, sql in setup:
        _ok(pg.prepare(name, sql))
        result = pg.exec_prepared(name, [])
        assert result.status in (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK), result.error_message
    result = pg.exec_prepared(b"", [b"41"])
    if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
        return result.error_message
    return result.get_value(0, 0)


SET_CONFIG = (b"s1", b"select set_config('application_name', 'x', false)")


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param([SET_CONFIG], id="set_config"),  # the reproduction
        pytest.param([(b"s2", b"set application_name = 'y'")], id="SET"),
        pytest.param([(b"s3", b"set search_path = public"), (b"s4", b"set datestyle = 'German'")], id="two-SETs"),
        pytest.param([(b"r", b"reset all")], id="RESET-ALL"),
        pytest.param([SET_CONFIG, (b"r", b"reset application_name")], id="RESET-one"),
    ],
)
def test_unnamed_statement_kept_as_on_a_direct_connection(tx_proxy, pg_cluster, setup):
    """psycopg's low-level pgconn: the unnamed statement outlives a session change that pgtwist
    reads back (or, for RESET, restores the startup value of) on the client's server connection."""
    with _direct(pg_cluster, application_name="startup") as conn:
        assert _unnamed_kept_across(conn, *setup) == b"42"
    with psycopg.connect(tx_proxy.dsn(application_name="startup"), autocommit=True) as conn:
        assert _unnamed_kept_across(conn, *setup) == b"42"
        if setup[-1][0] == b"r":  # RESET: back to the startup value, as on a direct connection
            assert conn.info.parameter_status("application_name") == "startup"
            assert conn.execute("SHOW application_name").fetchone()[0] == "startup"


def test_unnamed_portal_kept_across_a_reset_in_a_transaction(tx_proxy, pg_cluster):
    """Inside a transaction: a partly fetched unnamed portal, a RESET ALL run through a named
    statement and portal (after which pgtwist restores the startup settings), then the rest of
    the unnamed portal: as on a direct connection."""
    from pgtwist.wire import protocol as p

    from tests.harness.txhelpers import batch, bind, execute, parse, raw_login, sync

    def run(client):
        client.query("BEGIN")
        first = batch(client, parse("", "select generate_series(1, 5)"), bind(""), execute("", 2), sync())
        assert first.rows == [["1"], ["2"]] and chr(p.PORTAL_SUSPENDED) in first.types
        reset = batch(client, parse("r", "reset all"), bind("r", portal="rp"), execute("rp"), sync())
        assert reset.errors == [] and reset.status == "T"
        rest = batch(client, execute("", 0), sync())
        client.query("COMMIT")
        return rest.rows, rest.sqlstates, client.scalar("SHOW application_name")

    from tests.harness.proxy import RawClient

    primary = pg_cluster.nodes[0]
    with RawClient(primary.host, primary.port) as direct:
        direct.login(pg_cluster.app_user, pg_cluster.app_database, pg_cluster.app_password, application_name="startup")
        want = run(direct)
    assert want == ([["3"], ["4"], ["5"]], [], "startup")
    with raw_login(tx_proxy, application_name="startup") as client:
        assert run(client) == want


# -- 3. backend process ids ----------------------------------------------------------------------


def _sleep_cancelled(conn, cancel) -> None:
    import threading

    timer = threading.Timer(0.5, cancel)
    timer.start()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
    finally:
        timer.cancel()


def test_session_pooling_tells_the_servers_own_process_id(proxy, admin):
    """Session pooling: conn.info.backend_pid is the server's own, so pg_backend_pid(), a
    notification's pid and pg_stat_activity agree with the driver as on a direct connection;
    cancelling (with pgtwist's secret) still reaches that server."""
    with proxy.connect() as conn, proxy.connect() as other:
        pid = conn.info.backend_pid
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        assert other.info.backend_pid != pid
        assert admin.execute("SELECT usename FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == proxy.user
        conn.execute("LISTEN client_view")
        conn.execute("NOTIFY client_view, 'mine'")
        other.execute("NOTIFY client_view, 'theirs'")
        got = {n.payload: n.pid for n in conn.notifies(timeout=10, stop_after=2)}
        assert got == {"mine": pid, "theirs": other.info.backend_pid}
        _sleep_cancelled(conn, conn.cancel)
        _sleep_cancelled(conn, conn.cancel_safe)  # (libpq 17's cancel API: its own connection, TLS first if any)
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid


def test_session_pooling_pg_terminate_backend_of_the_drivers_pid_ends_that_session(proxy, admin):
    with proxy.connect() as conn, proxy.connect() as other:
        pid = conn.info.backend_pid
        assert other.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is True
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        assert other.execute("SELECT 1").fetchone()[0] == 1
    assert admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 0


def test_transaction_pooling_process_ids_are_pgtwists_and_end_nobody(tx_proxy):
    """Transaction pooling: the client's server connection changes between transactions, so no
    server's process id is its own. It gets one of pgtwist's, above any real pid: cancel works
    with it, and pg_terminate_backend() of it ends no backend."""
    with tx_proxy.connect() as conn, tx_proxy.connect() as other:
        pid = conn.info.backend_pid
        assert pid > 2**22 and pid != conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        _sleep_cancelled(conn, conn.cancel)
        assert other.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is False
        assert conn.execute("SELECT 1").fetchone()[0] == 1


# -- 1b. a failover: what logins are told follows the new primary -------------------------------


def test_logins_after_a_failover_are_told_the_new_primarys_values(tmp_path):
    """A private primary + replica behind a routing proxy (transaction pooling). Reads leave idle
    connections on the replica; the primary dies and the replica is promoted. Every login that
    lands on the promoted node is told in_hot_standby = off (a direct login there would be), even
    when it is served by a connection opened while that node was a replica."""
    import time

    from pgtwist.tools.localcluster import LocalCluster

    with LocalCluster.create(replicas=1) as cluster:
        primary, replica = cluster.nodes
        config = dict(TX_CONFIG, pool_size=4, health_check_interval=0.2, health_check_timeout=1.0, failover_wait=15.0)
        databases = {proxymod.DATABASE: {"dbname": cluster.app_database, "nodes": [primary.addr, replica.addr]}}
        with proxymod.start_proxy(cluster, tmp_path, databases=databases, **config) as px:

            def reads_on_replica():
                with px.connect() as conn:
                    assert conn.info.parameter_status("in_hot_standby") == "off"  # the primary's login
                    ports = {conn.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(4)}
                return replica.port in ports

            proxymod.wait_for(reads_on_replica, 20, "reads served by the replica")
            cluster.stop(primary, "immediate")
            cluster.promote(replica)
            seen: list[tuple[str, int, bool]] = []

            def login_on_promoted():
                with px.connect() as conn:
                    told = conn.info.parameter_status("in_hot_standby")
                    port, in_recovery = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
                    seen.append((told, port, in_recovery))
                    return port == replica.port and not in_recovery

            deadline = time.monotonic() + 30
            while sum(1 for _, port, rec in seen if port == replica.port and not rec) < 5:
                assert time.monotonic() < deadline, f"no logins on the promoted node: {seen}"
                try:
                    login_on_promoted()
                except psycopg.OperationalError:
                    time.sleep(0.2)  # (no primary yet)
            # A login goes to the primary pgtwist knows: none that ended up on the promoted node
            # was told it is a standby.
            after = [told for told, port, rec in seen if port == replica.port and not rec]
            assert after == ["off"] * len(after), seen
