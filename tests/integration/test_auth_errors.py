"""Login failures and limits, as clients see them: SQLSTATE, message, and how fast."""

import asyncio
import socket
import time

import asyncpg
import psycopg
import pytest

from pgtwist.tools.localcluster import free_port
from pgtwist.wire import protocol as p

from tests.harness.proxy import HOST, RawClient, ServerError, error_fields_of, start_proxy

pytestmark = pytest.mark.integration


def connect_error(proxy, **overrides) -> tuple[asyncpg.PostgresError, float]:
    """Try an asyncpg login that must fail; return the error (it carries .sqlstate) and how long it took."""

    async def attempt():
        conn = await asyncpg.connect(**proxy.asyncpg_kwargs(**overrides))
        await asyncio.wait_for(conn.close(), 10)

    start = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(asyncio.wait_for(attempt(), 30))
    return info.value, time.monotonic() - start


def assert_serves(proxy) -> None:
    with proxy.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------- authentication


def test_wrong_password_is_28P01(proxy):
    e, _ = connect_error(proxy, password="wrong-password")
    assert e.sqlstate == "28P01"
    assert str(e) == f'password authentication failed for user "{proxy.user}"'
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(password="wrong-password"))
    assert_serves(proxy)


def test_unknown_user_looks_like_a_wrong_password(proxy):
    e, _ = connect_error(proxy, user="itest_nobody", password="whatever")
    assert e.sqlstate == "28P01"
    assert str(e) == 'password authentication failed for user "itest_nobody"'
    # The raw ErrorResponses carry the same fields, whoever the user.
    fields = []
    for user in (proxy.user, "itest_nobody"):
        with RawClient(proxy.host, proxy.port) as c:
            with pytest.raises(ServerError) as info:
                c.login(user, "appdb", "not-the-password")
            fields.append(info.value.fields)
            c.wait_closed(5)
    assert fields[0].keys() == fields[1].keys()
    assert fields[0]["S"] == fields[1]["S"] == "FATAL"
    assert fields[0]["M"].replace(proxy.user, "X") == fields[1]["M"].replace("itest_nobody", "X")
    assert_serves(proxy)


def test_unknown_database_is_3D000(proxy):
    e, _ = connect_error(proxy, database="itest_nodb")
    assert e.sqlstate == "3D000"
    assert 'database "itest_nodb" does not exist' in str(e)
    assert_serves(proxy)


@pytest.mark.parametrize("auth_type", ["md5", "trust"])
def test_other_auth_types(pg_cluster, tmp_path, auth_type):
    with start_proxy(pg_cluster, tmp_path, auth_type=auth_type) as px:
        with px.connect() as conn:
            assert conn.execute("SELECT current_user").fetchone() == (pg_cluster.app_user,)
        if auth_type == "md5":
            e, _ = connect_error(px, password="wrong-password")
            assert e.sqlstate == "28P01"
        else:
            e, _ = connect_error(px, user="itest_nobody")
            assert e.sqlstate in ("28000", "28P01")


# --------------------------------------------------------------------------- limits


def test_max_client_conn(pg_cluster, tmp_path):
    with start_proxy(pg_cluster, tmp_path, max_client_conn=3) as px:
        held = [px.connect() for _ in range(3)]
        try:
            e, _ = connect_error(px)
            assert e.sqlstate == "53300"
            assert "too many clients" in str(e)
            held.pop().close()
            # A slot is free again once the proxy has seen the client leave.
            with px.connect() as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            for c in held:
                c.close()


def test_pool_exhausted_client_gets_53300_after_query_wait_timeout(pg_cluster, tmp_path):
    with start_proxy(pg_cluster, tmp_path, pool_size=1, query_wait_timeout=1) as px:
        with px.connect() as first:
            assert first.execute("SELECT 1").fetchone() == (1,)
            e, elapsed = connect_error(px)
            assert e.sqlstate == "53300"
            assert "no server connection" in str(e) and "1 s" in str(e)
            assert 0.8 <= elapsed < 3, elapsed
            # The first client's session is untouched.
            assert first.execute("SELECT 2").fetchone() == (2,)
        assert_serves(px)


def test_node_down_is_08006_naming_the_node(pg_cluster, tmp_path):
    dead = f"{HOST}:{free_port()}"  # nothing listens there
    connect_timeout = 2
    with start_proxy(
        pg_cluster,
        tmp_path,
        server_connect_timeout=connect_timeout,
        databases={"appdb": {"dbname": pg_cluster.app_database, "nodes": [dead]}},
    ) as px:
        e, elapsed = connect_error(px)
        assert e.sqlstate == "08006"
        assert dead in str(e)
        assert elapsed < connect_timeout + 2, elapsed
        # Still accepting clients (and refusing them the same way).
        e, _ = connect_error(px)
        assert e.sqlstate == "08006"


def test_node_that_never_answers_times_out_with_08006(pg_cluster, tmp_path):
    # A listener that accepts TCP (in the kernel backlog) but never speaks.
    with socket.socket() as silent:
        silent.bind((HOST, free_port()))
        silent.listen(16)
        host, port = silent.getsockname()
        addr = f"{host}:{port}"
        with start_proxy(
            pg_cluster,
            tmp_path,
            server_connect_timeout=1,
            databases={"appdb": {"dbname": pg_cluster.app_database, "nodes": [addr]}},
        ) as px:
            e, elapsed = connect_error(px)
            assert e.sqlstate == "08006"
            assert addr in str(e)
            assert 0.8 <= elapsed < 3, elapsed


def test_client_login_timeout_closes_silent_sockets(pg_cluster, tmp_path):
    # (tcp_defer_accept off: with it, a socket that sends nothing never reaches pgtwist; see
    # test_sockets.py for that, and for a startup packet begun and never finished)
    with start_proxy(pg_cluster, tmp_path, client_login_timeout=1, tcp_defer_accept=False) as px:
        start = time.monotonic()
        with RawClient(px.host, px.port) as c:
            data = c.wait_closed(5)  # sends nothing at all
        elapsed = time.monotonic() - start
        assert data == b""
        assert 0.8 <= elapsed < 4, elapsed

        # Startup sent, authentication never finished: told why, then closed.
        with RawClient(px.host, px.port) as c:
            c.startup(px.user, "appdb")
            msg_type, _ = c.read_message()
            assert msg_type == p.AUTHENTICATION
            data = c.wait_closed(5)
        fields = error_fields_of(data)
        assert fields is not None and fields["C"] == "57014", data
        assert "timeout" in fields["M"]

        # A client that logs in promptly is unaffected, and stays connected past the timeout.
        with px.connect() as conn:
            assert conn.execute("SELECT pg_sleep(1.2), 1").fetchone()[1] == 1


def test_node_down_many_clients_at_once(pg_cluster, tmp_path):
    """Every waiting client hears about the failed node, each quickly: none is left hanging."""
    dead = f"{HOST}:{free_port()}"
    with start_proxy(
        pg_cluster,
        tmp_path,
        server_connect_timeout=2,
        databases={"appdb": {"dbname": pg_cluster.app_database, "nodes": [dead]}},
    ) as px:

        async def one():
            try:
                conn = await asyncpg.connect(**px.asyncpg_kwargs())
            except asyncpg.PostgresError as e:
                return e.sqlstate
            await asyncio.wait_for(conn.close(), 10)
            return "connected"

        async def main():
            return await asyncio.gather(*(one() for _ in range(10)))

        start = time.monotonic()
        codes = asyncio.run(asyncio.wait_for(main(), 30))
        assert codes == ["08006"] * 10
        assert time.monotonic() - start < 4


def test_node_refuses_the_configured_password(pg_cluster, tmp_path):
    """The proxy accepts the client, the node refuses the proxy: the node's 28P01 reaches the client."""
    with start_proxy(pg_cluster, tmp_path, users={pg_cluster.app_user: {"password": "not-what-the-node-has"}}) as px:
        e, _ = connect_error(px, password="not-what-the-node-has")
        assert e.sqlstate == "28P01"
        assert "password authentication failed" in str(e)


def test_scram_verifier_in_config_passes_the_client_key_through(pg_cluster, admin, tmp_path):
    """users.NAME.password holds the node's own SCRAM verifier: the client's proof logs the proxy in."""
    verifier = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (pg_cluster.app_user,)).fetchone()[0]
    assert verifier.startswith("SCRAM-SHA-256$")
    with start_proxy(pg_cluster, tmp_path, users={pg_cluster.app_user: {"password": verifier}}) as px:
        with px.connect() as conn:
            assert conn.execute("SELECT current_user").fetchone() == (pg_cluster.app_user,)
        # A wrong password is still refused by the proxy itself.
        e, _ = connect_error(px, password="wrong-password")
        assert e.sqlstate == "28P01"
        # Several server connections at once, all logged in with the remembered ClientKey.
        conns = [px.connect() for _ in range(3)]
        try:
            pids = {c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in conns}
            assert len(pids) == 3
        finally:
            for c in conns:
                c.close()
