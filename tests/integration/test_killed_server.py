"""A client's server connection killed under it: pg_terminate_backend(), idle_in_transaction_session_timeout.

Real PostgreSQL (the session's primary + replica, both behind pgtwist) and real drivers
(psycopg 3, asyncpg, node-postgres). What each client hears is the node's own SQLSTATE and
message, once: as an ERROR whose DETAIL says pgtwist kept the session (transaction pooling),
or as the node's FATAL alone (session pooling, on_server_loss = "close_client"). And no node
is marked down: one terminated backend, or one session's timeout, says nothing about its node.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from pgtwist.tools.localcluster import LocalCluster
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.framing import pop_messages

from tests.harness.ops import rewrite_config, start_ops_proxy
from tests.harness.proxy import DATABASE, RawClient, wait_for
from tests.harness.txhelpers import run_async

pytestmark = pytest.mark.integration

ADMIN, ADMIN_PASSWORD = "admin", "admin-secret"
NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_SCRIPT = NODE_DIR / "killed_server.js"
TABLE = "killed_server_t"
KEPT = "pgtwist kept this session"


def settings(cluster, **overrides) -> dict:
    """Both nodes behind pgtwist (so a node marked down would show), the admin console on."""
    return {
        "databases": {DATABASE: {"dbname": cluster.app_database, "nodes": [n.addr for n in cluster.nodes]}},
        "users": {cluster.app_user: {"password": cluster.app_password}, ADMIN: {"password": ADMIN_PASSWORD}},
        "pool_size": 4,
        "query_wait_timeout": 30,
        "health_check_interval": 0.5,
        **overrides,
    }


TABLES = {"admin": {"users": [ADMIN]}}


@pytest.fixture(scope="module")
def tx_proxy(pg_cluster, tmp_path_factory):
    with start_ops_proxy(pg_cluster, tmp_path_factory.mktemp("killed-tx"), TABLES, **settings(pg_cluster, pool_mode="transaction")) as px:
        with px.connect() as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (tag text)")
        # Other clients' reads go to the replica: it must have the table before any test reads it.
        pg_cluster.wait_replicas_caught_up(30)
        yield px


@pytest.fixture(scope="module")
def session_proxy(pg_cluster, tmp_path_factory):
    with start_ops_proxy(pg_cluster, tmp_path_factory.mktemp("killed-session"), TABLES, **settings(pg_cluster, pool_mode="session")) as px:
        yield px


def marker() -> str:
    return f"killed_{uuid.uuid4().hex[:12]}"


def node_dsn(cluster, node) -> str:
    return cluster.dsn(node, user=cluster.superuser, password=cluster.superuser_password, connect_timeout=10)


def terminate(cluster, tag: str, state: str, timeout: float = 15) -> int:
    """pg_terminate_backend() of the backend (on whichever node) whose statement carries *tag*; returns its pid
    once it is gone."""
    conns = [psycopg.connect(node_dsn(cluster, node), autocommit=True) for node in cluster.nodes]
    try:
        found: list = []

        def find():
            for conn in conns:
                row = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state = %s AND query LIKE %s",
                    (state, f"%{tag}%"),
                ).fetchone()
                if row:
                    found[:] = [conn, row[0]]
                    return True
            return False

        wait_for(find, timeout, f"a backend {state} with {tag}")
        conn, pid = found
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(
            lambda: conn.execute("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0],
            timeout,
            f"backend {pid} to exit",
        )
        return pid
    finally:
        for conn in conns:
            conn.close()


class Terminator(threading.Thread):
    """terminate() in a thread, while the test's client blocks on the statement it kills."""

    def __init__(self, cluster, tag: str, state: str = "active"):
        super().__init__(daemon=True)
        self.args_ = (cluster, tag, state)
        self.error: BaseException | None = None

    def run(self):
        try:
            terminate(*self.args_)
        except BaseException as e:  # noqa: BLE001 - re-raised by done()
            self.error = e

    def done(self):
        self.join(20)
        assert not self.is_alive(), "terminate() is stuck"
        if self.error is not None:
            raise self.error


def wait_lost(px, since: int, code: str) -> None:
    """Until pgtwist has seen a server connection end with *code* (the client's next statement must not race it)."""
    wait_for(lambda: f"ended: {code}" in px.log_text(since) or "closed while idle" in px.log_text(since), 10, f"pgtwist to see {code}")


def assert_nodes_up(px, since: int) -> None:
    """No node was marked down, in the log or in SHOW NODES."""
    log = px.log_text(since)
    assert "marked down" not in log and " is down:" not in log, log[-3000:]
    dsn = px.dsn(dbname="pgbalance", user=ADMIN, password=ADMIN_PASSWORD)
    with psycopg.connect(dsn, autocommit=True) as console:
        cur = console.execute("SHOW NODES")
        names = [c.name for c in cur.description]
        rows = cur.fetchall()
    assert len(rows) == 2 and all(r[names.index("up")] in (True, "t", "true") for r in rows), rows


def kept_error(e: psycopg.Error, code: str, in_transaction: bool = False) -> None:
    diag = e.diag
    assert (diag.severity, diag.sqlstate) == ("ERROR", code), (diag.severity, diag.sqlstate, diag.message_primary)
    assert KEPT in (diag.message_detail or ""), diag.message_detail
    assert ("ROLLBACK" in diag.message_detail) == in_transaction, diag.message_detail


# --------------------------------------------------------------------------- psycopg 3, transaction pooling


def test_psycopg_backend_terminated_between_transactions_goes_unnoticed(tx_proxy, pg_cluster):
    px, since = tx_proxy, tx_proxy.log_size()
    with px.connect() as conn:
        tag = marker()
        assert conn.execute(f"SELECT 1 /* {tag} */").fetchone() == (1,)
        terminate(pg_cluster, tag, "idle")
        wait_lost(px, since, "57P01")
        assert conn.execute("SELECT 2").fetchone() == (2,)
        assert not conn.broken
    assert_nodes_up(px, since)


def test_psycopg_backend_terminated_during_a_statement(tx_proxy, pg_cluster):
    px, since = tx_proxy, tx_proxy.log_size()
    with px.connect() as conn:
        tag = marker()
        killer = Terminator(pg_cluster, tag)
        killer.start()
        with pytest.raises(pgerrors.AdminShutdown) as caught:
            conn.execute(f"SELECT pg_sleep(30) /* {tag} */")
        killer.done()
        kept_error(caught.value, "57P01")
        assert caught.value.diag.message_primary == "terminating connection due to administrator command"
        assert not conn.broken
        # The session goes on, and the statement was not run again behind the client's back.
        assert conn.execute("SELECT 1").fetchone() == (1,)
        for node in pg_cluster.nodes:
            with psycopg.connect(node_dsn(pg_cluster, node), autocommit=True) as watch:
                running = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()", (f"%{tag}%",)
                ).fetchone()[0]
                assert running == 0
    assert_nodes_up(px, since)


def test_psycopg_backend_terminated_inside_a_transaction(tx_proxy, pg_cluster):
    """As the README says: the next statement gets the node's error, then 25P02 until ROLLBACK."""
    px, since = tx_proxy, tx_proxy.log_size()
    with px.connect() as conn:
        tag = marker()
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {TABLE} VALUES (%s)", (tag,))
        conn.execute(f"SELECT 1 /* {tag} */")
        terminate(pg_cluster, tag, "idle in transaction")
        wait_lost(px, since, "57P01")
        with pytest.raises(pgerrors.AdminShutdown) as caught:
            conn.execute("SELECT 2")
        kept_error(caught.value, "57P01", in_transaction=True)
        with pytest.raises(pgerrors.InFailedSqlTransaction):
            conn.execute("SELECT 3")
        conn.execute("ROLLBACK")
        assert not conn.broken
        assert conn.execute(f"SELECT count(*) FROM {TABLE} WHERE tag = %s", (tag,)).fetchone() == (0,)  # it died with its backend
    assert_nodes_up(px, since)


def test_psycopg_idle_in_transaction_session_timeout(tx_proxy):
    px, since = tx_proxy, tx_proxy.log_size()
    with px.connect() as conn:
        conn.execute("SET idle_in_transaction_session_timeout = '200ms'")
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        wait_lost(px, since, "25P03")
        with pytest.raises(pgerrors.IdleInTransactionSessionTimeout) as caught:
            conn.execute("SELECT 2")
        kept_error(caught.value, "25P03", in_transaction=True)
        assert "idle-in-transaction timeout" in caught.value.diag.message_primary
        with pytest.raises(pgerrors.InFailedSqlTransaction):
            conn.execute("SELECT 3")
        conn.execute("ROLLBACK")
        # Its settings were carried: the next transaction runs with the same timeout, on a new backend.
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("200ms",)
        conn.execute("SET idle_in_transaction_session_timeout = 0")
    log = px.log_text(since)
    assert "probing it now" not in log  # a session's own timeout is not even a question about the node
    assert_nodes_up(px, since)


def test_psycopg_pinned_session_is_closed_with_the_nodes_fatal_alone(tx_proxy, pg_cluster):
    """LISTEN pins the session to its server connection: that state dies with it, and so does the session."""
    px, since = tx_proxy, tx_proxy.log_size()
    with px.connect() as conn:
        conn.execute("LISTEN killed_server_channel")
        tag = marker()
        conn.execute(f"SELECT 1 /* {tag} */")
        terminate(pg_cluster, tag, "idle")
        wait_for(lambda: "closed: 57P01" in px.log_text(since), 10, "pgtwist to close the pinned client")
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("SELECT 2")
        assert "terminating connection due to administrator command" in str(caught.value)
        assert "lost the connection" not in str(caught.value)
        assert conn.broken
    assert_nodes_up(px, since)


# --------------------------------------------------------------------------- asyncpg, transaction pooling


def test_asyncpg_backend_terminated_during_a_statement_and_inside_a_transaction(tx_proxy, pg_cluster):
    px, since = tx_proxy, tx_proxy.log_size()

    async def scenario():
        conn = await asyncpg.connect(**px.asyncpg_kwargs())
        try:
            tag = marker()
            killer = Terminator(pg_cluster, tag)
            killer.start()
            with pytest.raises(asyncpg.exceptions.AdminShutdownError) as caught:
                await conn.fetchval(f"SELECT pg_sleep(30) /* {tag} */")
            await asyncio.to_thread(killer.done)
            assert caught.value.severity == "ERROR" and KEPT in caught.value.detail
            assert await conn.fetchval("SELECT 41 + 1") == 42
            assert not conn.is_closed()

            tag = marker()
            await conn.execute("BEGIN")
            assert await conn.fetchval(f"SELECT 1 /* {tag} */") == 1
            await asyncio.to_thread(terminate, pg_cluster, tag, "idle in transaction")
            await asyncio.to_thread(wait_lost, px, since, "57P01")
            with pytest.raises(asyncpg.exceptions.AdminShutdownError) as caught:
                await conn.fetchval("SELECT 2")
            assert caught.value.severity == "ERROR" and "ROLLBACK" in caught.value.detail
            with pytest.raises(asyncpg.exceptions.InFailedSQLTransactionError):
                await conn.fetchval("SELECT 3")
            await conn.execute("ROLLBACK")
            assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
        finally:
            await conn.close()

    run_async(scenario())
    assert_nodes_up(px, since)


# --------------------------------------------------------------------------- session pooling: the node's FATAL alone


def raw_login(px) -> RawClient:
    c = RawClient(px.host, px.port)
    c.login(px.user, DATABASE, px.password)
    return c


def errors_in(data: bytes) -> list[dict]:
    out = []
    buf = bytearray(data)
    for msg_type, body in pop_messages(buf, p.MAX_PROTOCOL_MESSAGE):
        if msg_type == p.ERROR_RESPONSE:
            out.append(m.decode_fields(body))
    return out


def terminated_mid_statement(c: RawClient, cluster) -> None:
    tag = marker()
    c.send(m.query(f"SELECT pg_sleep(30) /* {tag} */"))
    terminate(cluster, tag, "active")


def idle_in_transaction_too_long(c: RawClient, cluster) -> None:
    c.query("SET idle_in_transaction_session_timeout = '200ms'")
    c.query("BEGIN")


@pytest.mark.parametrize(
    "provoke, code, words",
    [
        (terminated_mid_statement, "57P01", "terminating connection due to administrator command"),
        (idle_in_transaction_too_long, "25P03", "idle-in-transaction timeout"),
    ],
    ids=["terminated", "idle-in-transaction-timeout"],
)
def test_session_mode_the_nodes_fatal_is_the_one_error(session_proxy, pg_cluster, provoke, code, words):
    px, since = session_proxy, session_proxy.log_size()
    with raw_login(px) as c:
        provoke(c, pg_cluster)
        (fatal,) = errors_in(c.wait_closed(10))
        assert (fatal["S"], fatal["C"]) == ("FATAL", code)
        assert words in fatal["M"], fatal["M"]
    with px.connect() as conn:  # the pool's slot came back
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert_nodes_up(px, since)


def test_session_mode_psycopg_hears_only_the_nodes_fatal(session_proxy, pg_cluster):
    px, since = session_proxy, session_proxy.log_size()
    with px.connect() as conn:
        tag = marker()
        killer = Terminator(pg_cluster, tag)
        killer.start()
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute(f"SELECT pg_sleep(30) /* {tag} */")
        killer.done()
        assert "terminating connection due to administrator command" in str(caught.value)
        assert "lost the connection" not in str(caught.value)
        assert conn.broken
    assert_nodes_up(px, since)


# --------------------------------------------------------------------------- node-postgres

NODE = shutil.which("node")
_node_missing = (
    "node is not installed" if NODE is None
    else None if (NODE_DIR / "node_modules" / "pg" / "package.json").is_file()
    else "node-postgres is not installed: run ./dev setup (npm install --prefix tests/integration/node)"
)


def run_node(cluster, target: dict, scenario: str) -> list[dict]:
    if _node_missing:
        pytest.skip(_node_missing)
    admins = [
        {"host": node.host, "port": node.port, "user": cluster.superuser, "password": cluster.superuser_password, "database": "postgres"}
        for node in cluster.nodes
    ]
    env = dict(os.environ, PGTWIST_TARGET=json.dumps(target), PGTWIST_ADMINS=json.dumps(admins))
    proc = subprocess.run(
        [NODE, str(NODE_SCRIPT), scenario, marker()],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(NODE_DIR),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def through(px) -> dict:
    return {"host": px.host, "port": px.port, "user": px.user, "password": px.password, "database": DATABASE}


def direct(cluster) -> dict:
    node = cluster.nodes[0]
    return {"host": node.host, "port": node.port, "user": cluster.app_user, "password": cluster.app_password, "database": cluster.app_database}


def test_node_postgres_transaction_mode_keeps_the_session(tx_proxy, pg_cluster):
    px, since = tx_proxy, tx_proxy.log_size()
    events = run_node(pg_cluster, through(px), "during")
    sleep, after = events
    assert not sleep["ok"] and (sleep["error"]["code"], sleep["error"]["severity"]) == ("57P01", "ERROR")
    assert KEPT in sleep["error"]["detail"]
    assert after == {"step": "after", "ok": True, "rows": [{"one": 1}]}

    events = run_node(pg_cluster, through(px), "in_tx")
    steps = {e["step"]: e for e in events}
    assert [e["step"] for e in events] == ["begin", "in tx", "next", "again", "rollback", "after"], events
    assert (steps["next"]["error"]["code"], steps["next"]["error"]["severity"]) == ("57P01", "ERROR")
    assert "ROLLBACK" in steps["next"]["error"]["detail"]
    assert steps["again"]["error"]["code"] == "25P02"
    assert steps["rollback"]["ok"] and steps["after"]["rows"] == [{"one": 1}]
    assert_nodes_up(px, since)


def test_node_postgres_session_mode_gets_what_a_direct_connection_gets(session_proxy, pg_cluster):
    """No second FATAL after the node's: node-postgres raised it as an unhandled 'error' event."""
    px, since = session_proxy, session_proxy.log_size()

    def shape(events):
        return [(e["step"], e.get("ok"), (e.get("error") or {}).get("code"), (e.get("error") or {}).get("severity")) for e in events]

    through_pgtwist = run_node(pg_cluster, through(px), "during")
    straight = run_node(pg_cluster, direct(pg_cluster), "during")
    assert shape(through_pgtwist) == shape(straight), (through_pgtwist, straight)
    assert through_pgtwist[0]["error"]["code"] == "57P01" and through_pgtwist[0]["error"]["severity"] == "FATAL"
    assert not any((e.get("error") or {}).get("code") == "08006" for e in through_pgtwist)
    assert_nodes_up(px, since)


# --------------------------------------------------------------------------- on_server_loss = "close_client"


def test_close_client_setting_reloaded_live(pg_cluster, tmp_path):
    overrides = settings(pg_cluster, pool_mode="transaction")
    with start_ops_proxy(pg_cluster, tmp_path, TABLES, **overrides) as px:
        since = px.log_size()
        with px.connect() as conn:  # keep_session (the default)
            tag = marker()
            killer = Terminator(pg_cluster, tag)
            killer.start()
            with pytest.raises(pgerrors.AdminShutdown):
                conn.execute(f"SELECT pg_sleep(30) /* {tag} */")
            killer.done()
            assert not conn.broken and conn.execute("SELECT 1").fetchone() == (1,)

            offset = px.log_size()
            rewrite_config(px, TABLES, **{**overrides, "on_server_loss": "close_client"})
            os.kill(px.pid, signal.SIGHUP)
            wait_for(lambda: "applied" in px.log_text(offset), 10, "the reload to be applied")

            # An open session follows the new setting: its killed statement closes it, with the node's FATAL.
            tag = marker()
            killer = Terminator(pg_cluster, tag)
            killer.start()
            with pytest.raises(psycopg.OperationalError) as caught:
                conn.execute(f"SELECT pg_sleep(30) /* {tag} */")
            killer.done()
            assert "terminating connection due to administrator command" in str(caught.value)
            assert conn.broken

        with px.connect() as conn:
            # A client between transactions holds no server connection: it is left alone, as by PgBouncer.
            tag = marker()
            assert conn.execute(f"SELECT 1 /* {tag} */").fetchone() == (1,)
            mark = px.log_size()
            terminate(pg_cluster, tag, "idle")
            wait_lost(px, mark, "57P01")
            assert conn.execute("SELECT 2").fetchone() == (2,)

            # Inside a transaction it is closed, with the node's FATAL alone.
            with raw_login(px) as c:
                c.query("BEGIN")
                tag = marker()
                c.query(f"SELECT 1 /* {tag} */")
                terminate(pg_cluster, tag, "idle in transaction")
                (fatal,) = errors_in(c.wait_closed(10))
                assert (fatal["S"], fatal["C"]) == ("FATAL", "57P01")
        assert_nodes_up(px, since)


# --------------------------------------------------------------------------- no client can take a node down


def test_no_client_can_take_a_node_down_or_provoke_a_promotion(tmp_path):
    """A client's bad frame (the node's FATAL 08P01), a client terminating every other backend of
    its user (57P01 for them all, the health probe's too) and a session's timeout (25P03), again
    and again, with auto_promote on and a short failover_timeout: no node is marked down, nothing
    is promoted, and the other clients keep working."""
    with LocalCluster.create(replicas=1) as cluster:
        overrides = settings(cluster, pool_mode="transaction", auto_promote=True, failover_timeout=0.5, health_check_interval=0.2)
        with start_ops_proxy(cluster, tmp_path, TABLES, **overrides) as px:
            since = px.log_size()
            others = [px.connect() for _ in range(3)]
            try:
                for _ in range(4):
                    with raw_login(px) as c:
                        c.send(b"z" + struct.pack("!I", 8) + b"junk")  # no such message type
                        assert [(e["S"], e["C"]) for e in errors_in(c.wait_closed(10))] == [("FATAL", "08P01")]
                    with px.connect() as bully:
                        bully.execute("BEGIN")  # (on the primary)
                        bully.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE usename = current_user AND pid <> pg_backend_pid()"
                        )
                        bully.execute("COMMIT")
                    with px.connect() as idler:
                        idler.execute("SET idle_in_transaction_session_timeout = '50ms'")
                        idler.execute("BEGIN")
                        idler.execute("SELECT 1")
                        time.sleep(0.3)
                        with pytest.raises(pgerrors.IdleInTransactionSessionTimeout):
                            idler.execute("SELECT 2")
                        idler.execute("ROLLBACK")
                    for conn in others:
                        try:
                            assert conn.execute("SELECT 1").fetchone() == (1,)
                        except pgerrors.AdminShutdown:
                            # Its kept connection was killed just as it spoke: told so, the session goes on.
                            assert conn.execute("SELECT 1").fetchone() == (1,)
                time.sleep(1.0)  # longer than failover_timeout
                assert_nodes_up(px, since)
                assert "promoting" not in px.log_text(since)
                with psycopg.connect(node_dsn(cluster, cluster.nodes[1]), autocommit=True) as replica:
                    assert replica.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            finally:
                for conn in others:
                    conn.close()
