"""Query cancellation, COPY in both directions, and bounded memory when a client stops reading."""

import asyncio
import hashlib
import os
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.proxy import RawClient, clients_waiting, wait_for

pytestmark = pytest.mark.integration


def active_query_pid(admin, fragment: str):
    """The node pid running a query containing *fragment*, or None."""
    row = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s AND pid <> pg_backend_pid()",
        (f"%{fragment}%",),
    ).fetchone()
    return row[0] if row else None


class Worker(threading.Thread):
    """Runs fn() in a thread; .result / .error afterwards."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = self.error = None
        self.finished_at = None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001
            self.error = e
        self.finished_at = time.monotonic()

    def finish(self, timeout: float):
        self.join(timeout)
        assert not self.is_alive(), f"still running after {timeout}s"
        return self


# --------------------------------------------------------------------------- cancel


def test_psycopg_cancel_interrupts_the_query_and_the_session_goes_on(proxy, admin):
    with proxy.connect() as conn:
        worker = Worker(lambda: conn.execute("SELECT pg_sleep(30) /* itest-cancel-1 */"))
        worker.start()
        node_pid = wait_for(lambda: active_query_pid(admin, "itest-cancel-1"), 10, "the query to run on the node")
        start = time.monotonic()
        try:
            if hasattr(conn, "cancel_safe"):
                conn.cancel_safe(timeout=5)
            else:
                conn.cancel()
            worker.finish(10)
        finally:
            if worker.is_alive():  # do not leave the session asleep for 30 s when the cancel failed
                admin.execute("SELECT pg_cancel_backend(%s)", (node_pid,))
                worker.join(10)
        assert isinstance(worker.error, pgerrors.QueryCanceled), worker.error
        assert worker.error.sqlstate == "57014"
        assert worker.finished_at - start < 5
        assert conn.execute("SELECT 'after cancel'").fetchone() == ("after cancel",)
        assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)


def test_asyncpg_timeout_cancels_the_query(proxy, admin):
    async def main():
        conn = await asyncpg.connect(**proxy.asyncpg_kwargs())
        try:
            start = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.execute("SELECT pg_sleep(30) /* itest-cancel-2 */", timeout=1)
            assert time.monotonic() - start < 5
            # asyncpg sent a CancelRequest on timeout; the session is usable right after.
            assert await conn.fetchval("SELECT 'ok'", timeout=10) == "ok"
        finally:
            await asyncio.wait_for(conn.close(), 10)

    asyncio.run(asyncio.wait_for(main(), 30))
    wait_for(lambda: active_query_pid(admin, "itest-cancel-2") is None, 5, "the node to stop the cancelled query")


def test_cancel_with_a_wrong_key_does_nothing(proxy, admin):
    with proxy.connect() as conn:
        pid = conn.info.backend_pid  # the proxy's key for this client
        worker = Worker(lambda: conn.execute("SELECT pg_sleep(1.5), 'done' /* itest-cancel-3 */").fetchone())
        worker.start()
        wait_for(lambda: active_query_pid(admin, "itest-cancel-3"), 10, "the query to run on the node")
        for bad_pid, bad_key in ((pid, b"\x00\x00\x00\x00"), (pid, b"\xde\xad\xbe\xef"), (pid ^ 1, b"\x01\x02\x03\x04")):
            with RawClient(proxy.host, proxy.port) as c:
                c.send(m.cancel_request(bad_pid, bad_key))
                assert c.wait_closed(5) == b""  # the proxy hangs up without a word, as PostgreSQL does
        worker.finish(10)
        assert worker.error is None, worker.error
        assert worker.result == ("", "done")


# --------------------------------------------------------------------------- COPY


def copy_payload(size: int) -> bytes:
    """~size bytes of deterministic COPY text: id, hex text, an escaped tab and backslash now and then."""
    lines = []
    total = i = 0
    while total < size:
        text = hashlib.sha256(str(i).encode()).hexdigest() * 3
        if i % 97 == 0:
            text += "\\ttab\\\\slash"
        line = f"{i}\t{text}\n".encode()
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)


def test_copy_in_and_out_is_byte_exact(proxy):
    payload = copy_payload(10 * 1024 * 1024)
    with proxy.connect() as conn:
        conn.execute("CREATE TEMP TABLE itest_copy (id int PRIMARY KEY, t text)")
        with conn.cursor() as cur:
            with cur.copy("COPY itest_copy FROM STDIN") as copy:
                for start in range(0, len(payload), 256 * 1024):
                    copy.write(payload[start : start + 256 * 1024])
            assert cur.rowcount == payload.count(b"\n")
            out = bytearray()
            with cur.copy("COPY (SELECT * FROM itest_copy ORDER BY id) TO STDOUT") as copy:
                for chunk in copy:
                    out += chunk
        assert hashlib.sha256(out).hexdigest() == hashlib.sha256(payload).hexdigest()
        # A failed COPY leaves the session usable.
        with pytest.raises(psycopg.DataError):
            with conn.cursor().copy("COPY itest_copy FROM STDIN") as copy:
                copy.write(b"not-a-number\tx\n")
        assert conn.execute("SELECT count(*) FROM itest_copy").fetchone() == (payload.count(b"\n"),)
        # A client-side failure sends CopyFail: the node aborts the COPY, the session goes on.
        with pytest.raises(RuntimeError, match="client gives up"):
            with conn.cursor().copy("COPY itest_copy FROM STDIN") as copy:
                copy.write(b"999999999\tnever\n")
                raise RuntimeError("client gives up")
        assert conn.execute("SELECT count(*) FROM itest_copy").fetchone() == (payload.count(b"\n"),)


def test_psql_backslash_copy(proxy, tmp_path):
    payload = copy_payload(1024 * 1024)
    src, dst = tmp_path / "in.tsv", tmp_path / "out.tsv"
    src.write_bytes(payload)
    env = dict(os.environ, PGPASSWORD=proxy.password, PGCONNECT_TIMEOUT="10")
    script = (
        "CREATE TEMP TABLE itest_pcopy (id int PRIMARY KEY, t text);\n"
        f"\\copy itest_pcopy FROM '{src}'\n"
        f"\\copy (SELECT * FROM itest_pcopy ORDER BY id) TO '{dst}'\n"
    )
    proc = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", proxy.dsn(password=None)],
        input=script,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == hashlib.sha256(payload).hexdigest()


# --------------------------------------------------------------------------- backpressure


def test_client_that_stops_reading_does_not_grow_the_proxy(proxy, admin):
    """~2 GB of result rows towards a client that reads nothing: the proxy must pause the node, not buffer."""
    limit_kib = 200 * 1024
    baseline = proxy.rss_kib()
    c = RawClient(proxy.host, proxy.port, timeout=10)
    try:
        c.login(proxy.user, "appdb", proxy.password, application_name="itest-backpressure")
        c.send(m.query("SELECT repeat('x', 1000) FROM generate_series(1, 2000000) /* itest-bp */"))
        # Read the start of the stream, to know it flows...
        first = c.read_message()
        assert first[0] == p.ROW_DESCRIPTION
        got = 0
        while got < 4 * 1024 * 1024:
            got += len(c.sock.recv(1 << 20))
        # ...then stop reading. The node must end up blocked writing to the proxy (ClientWrite)
        # while the proxy's memory stays flat.
        peak = baseline

        def node_blocked():
            nonlocal peak
            peak = max(peak, proxy.rss_kib())
            row = admin.execute(
                "SELECT wait_event FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
                ("%itest-bp%",),
            ).fetchone()
            return row is not None and row[0] == "ClientWrite"

        wait_for(node_blocked, 15, "the node to block on its socket to the proxy")
        # Keep not reading for a while and watch the proxy's memory.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, proxy.rss_kib())
            assert peak - baseline < limit_kib, f"proxy RSS grew by {(peak - baseline) // 1024} MB"
            time.sleep(0.1)
        assert node_blocked(), "the node kept streaming although nobody read"
    finally:
        c.close()
    assert peak - baseline < limit_kib, f"proxy RSS grew by {(peak - baseline) // 1024} MB"
    # The client left mid-result: the node stops working for it...
    wait_for(lambda: active_query_pid(admin, "itest-bp") is None, 15, "the abandoned query to stop on the node")
    # ...and the proxy serves the next client.
    with proxy.connect() as conn:
        assert conn.execute("SELECT count(*) FROM generate_series(1, 1000)").fetchone() == (1000,)


def test_client_vanishing_mid_copy_in(proxy, admin):
    with RawClient(proxy.host, proxy.port) as c:
        c.login(proxy.user, "appdb", proxy.password)
        c.query("CREATE TEMP TABLE itest_copy_gone (x int)")
        c.send(m.query("COPY itest_copy_gone FROM STDIN /* itest-copy-gone */"))
        assert c.read_message()[0] == p.COPY_IN_RESPONSE
        c.send(m.copy_data(b"1\n2\n"))
        wait_for(lambda: active_query_pid(admin, "itest-copy-gone"), 10, "the COPY to be under way")
    wait_for(lambda: active_query_pid(admin, "itest-copy-gone") is None, 10, "the node to end the abandoned COPY")
    with proxy.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_client_that_floods_a_busy_node_does_not_grow_the_proxy(proxy, admin):
    """Pipelined queries pile up while the node sleeps: the proxy must stop reading the client, not buffer."""
    limit_kib = 200 * 1024
    baseline = proxy.rss_kib()
    c = RawClient(proxy.host, proxy.port, timeout=10)
    chunk = m.query("SELECT 1 /* " + "z" * (1024 * 1024) + " */")
    sent = {"bytes": 0}

    def flood():
        c.send(m.query("SELECT pg_sleep(4) /* itest-flood */"))
        for _ in range(1000):  # up to ~1 GB, far more than any socket buffers hold
            c.send(chunk)
            sent["bytes"] += len(chunk)

    try:
        c.login(proxy.user, "appdb", proxy.password)
        sender = Worker(flood)
        sender.start()
        wait_for(lambda: active_query_pid(admin, "itest-flood"), 10, "the node to start sleeping")
        peak = baseline
        # While the node sleeps, the sender must get stuck (its bytes pile up in sockets, not in the proxy).
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, proxy.rss_kib())
            assert peak - baseline < limit_kib, f"proxy RSS grew by {(peak - baseline) // 1024} MB"
            time.sleep(0.1)
        assert sender.is_alive(), f"all {sent['bytes'] >> 20} MB went through while the node was asleep"
    finally:
        c.sock.close()
    sender.finish(15)  # the closed socket ends it
    # A paused client socket is not watched, so (like PostgreSQL itself) the proxy notices the
    # departure once the node answers and it writes to the client again: after the sleep.
    wait_for(lambda: active_query_pid(admin, "itest-flood") is None, 15, "the node to finish with the departed client")
    wait_for(
        lambda: admin.execute(
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE usename = %s AND state <> 'idle' AND query LIKE 'SELECT 1 /* zzz%%'",
            (proxy.user,),
        ).fetchone()[0],
        15,
        "the departed client's server connection to be done",
    )
    with proxy.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cancel_of_a_statement_waiting_for_the_pool_stops_it_before_it_runs(pg_cluster, admin, tmp_path):
    # Clients outnumber connections: a statement waiting for one is cancelled (a driver's
    # timeout, psql's ^C) with 57014, as PostgreSQL would, and never runs. PgBouncer 1.18 ignores
    # such a cancel and runs the statement once a connection frees (pgbouncer#1222).
    from tests.harness.proxy import start_proxy

    admin.execute("CREATE TABLE IF NOT EXISTS itest_cancel_waiting (n int)")
    admin.execute("TRUNCATE itest_cancel_waiting")
    admin.execute(f"GRANT ALL ON itest_cancel_waiting TO {pg_cluster.app_user}")
    c = pg_cluster
    users = {c.app_user: {"password": c.app_password}, c.superuser: {"password": c.superuser_password}}
    with start_proxy(c, tmp_path, pool_mode="transaction", pool_size=1, users=users, admin={"users": [c.superuser]}) as px:
        console = px.connect(dbname="pgbalance", user=c.superuser, password=c.superuser_password)

        def queued_in_pgtwist() -> bool:
            return clients_waiting(console) >= 1

        with console, px.connect() as holder, px.connect() as waiter:
            busy = Worker(lambda: holder.execute("SELECT pg_sleep(2) /* itest-cancel-wait */"))
            busy.start()
            wait_for(lambda: active_query_pid(admin, "itest-cancel-wait"), 10, "the holder's query to run")
            queued = Worker(lambda: waiter.execute("INSERT INTO itest_cancel_waiting VALUES (1)"))
            queued.start()
            wait_for(queued_in_pgtwist, 10, "the statement to be queued in pgtwist")
            started = time.monotonic()
            waiter.cancel()
            queued.finish(10)
            assert isinstance(queued.error, pgerrors.QueryCanceled), queued.error
            assert queued.finished_at - started < 1.5  # not after the holder's 2 s
            busy.finish(10)
            assert busy.error is None, busy.error
            assert waiter.execute("SELECT count(*) FROM itest_cancel_waiting").fetchone() == (0,)
    admin.execute("DROP TABLE itest_cancel_waiting")
