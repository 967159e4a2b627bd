"""Helpers for the transaction-pooling integration tests (not a test module).

Every wait is bounded: sockets carry timeouts, threads are joined with a limit, and
conditions are polled against a deadline.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from .proxy import RawClient, ServerError

# A transaction-mode proxy as most tests want it.
TX_CONFIG: dict[str, Any] = {"pool_mode": "transaction", "pool_size": 4, "query_wait_timeout": 30}


def run_async(coro, timeout: float = 60):
    """Run *coro* in a fresh event loop, bounded by *timeout* seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def run_threads(fn: Callable[[int], Any], count: int, timeout: float) -> list[Any]:
    """Run fn(i) for i in range(count), one thread each; return the results, re-raising the first error."""
    results: list[Any] = [None] * count
    errors: list[BaseException | None] = [None] * count

    def body(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[i] = e

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    assert not stuck, f"{stuck} of {count} threads still running after {timeout}s"
    failed = [(i, e) for i, e in enumerate(errors) if e is not None]
    if failed:
        i, e = failed[0]
        raise AssertionError(f"{len(failed)} of {count} threads failed; thread {i}: {e!r}") from e
    return results


class Worker(threading.Thread):
    """Runs fn() in a thread; .result / .error / .finished_at afterwards."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = self.error = None
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001
            self.error = e
        self.finished_at = time.monotonic()

    def finish(self, timeout: float) -> Worker:
        self.join(timeout)
        assert not self.is_alive(), f"still running after {timeout}s"
        return self


def pgbench(proxy, *args: str, timeout: float = 60) -> str:
    """Run pgbench against the proxy's appdb; fails the test on a non-zero exit."""
    env = dict(os.environ, PGPASSWORD=proxy.password, PGCONNECT_TIMEOUT="10")
    env.pop("PGSERVICE", None)
    env.pop("PGOPTIONS", None)
    proc = subprocess.run(
        ["pgbench", "-h", proxy.host, "-p", str(proxy.port), "-U", proxy.user, *args, "appdb"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"pgbench {' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}"
    return out


def libpq_copy_in(conn, send: Callable[[], object], rows: bytes, fail: bytes | None = None) -> None:
    """One COPY FROM STDIN through libpq (psycopg's pq.PGconn *conn*): *send* starts it (a simple
    or extended query), *rows* go as one CopyData, then CopyDone (or CopyFail with *fail*)."""
    from psycopg import pq

    send()
    started = conn.get_result()
    assert started.status == pq.ExecStatus.COPY_IN, conn.get_error_message()
    assert conn.put_copy_data(rows) == 1
    assert conn.put_copy_end(fail) == 1
    done = conn.get_result()
    expected = pq.ExecStatus.FATAL_ERROR if fail else pq.ExecStatus.COMMAND_OK
    assert done.status == expected, conn.get_error_message()
    assert conn.get_result() is None


def proxy_backends(admin, user: str, datname: str) -> list[tuple]:
    """(pid, application_name, state) of the node's backends for *user* in *datname*, excluding our own."""
    return admin.execute(
        "SELECT pid, application_name, state FROM pg_stat_activity"
        " WHERE usename = %s AND datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        (user, datname),
    ).fetchall()


# --------------------------------------------------------------------------- raw extended protocol


def parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    body = name.encode() + b"\x00" + sql.encode() + b"\x00" + struct.pack("!H", len(types))
    body += b"".join(struct.pack("!I", t) for t in types)
    return _msg(p.PARSE, body)


def bind(statement: str, params: tuple[str | None, ...] = (), portal: str = "") -> bytes:
    body = portal.encode() + b"\x00" + statement.encode() + b"\x00"
    body += struct.pack("!H", 0)  # all parameters in text
    body += struct.pack("!H", len(params))
    for value in params:
        if value is None:
            body += struct.pack("!i", -1)
        else:
            data = value.encode()
            body += struct.pack("!i", len(data)) + data
    body += struct.pack("!H", 0)  # all results in text
    return _msg(p.BIND, body)


def describe(kind: str, name: str) -> bytes:
    return _msg(p.DESCRIBE, kind.encode() + name.encode() + b"\x00")


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return _msg(p.EXECUTE, portal.encode() + b"\x00" + struct.pack("!I", max_rows))


def close(kind: str, name: str) -> bytes:
    return _msg(p.CLOSE, kind.encode() + name.encode() + b"\x00")


def sync() -> bytes:
    return _msg(p.SYNC, b"")


def _msg(msg_type: int, body: bytes) -> bytes:
    return bytes((msg_type,)) + struct.pack("!I", len(body) + 4) + body


def data_row_values(body: bytes) -> list[str | None]:
    (n,) = struct.unpack_from("!H", body, 0)
    pos = 2
    out: list[str | None] = []
    for _ in range(n):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + length].decode())
            pos += length
    return out


class Reply:
    """What came back for one batch up to ReadyForQuery: message types in order, rows, errors, status."""

    def __init__(self, messages: list[tuple[int, bytes]]):
        self.messages = messages
        self.types = "".join(chr(t) for t, _ in messages)
        self.rows = [data_row_values(b) for t, b in messages if t == p.DATA_ROW]
        self.errors = [m.decode_fields(b) for t, b in messages if t == p.ERROR_RESPONSE]
        last_type, last_body = messages[-1]
        assert last_type == p.READY_FOR_QUERY, self.types
        self.status = chr(last_body[0])

    @property
    def sqlstates(self) -> list[str]:
        return [e.get("C") for e in self.errors]

    def __repr__(self) -> str:
        return f"<Reply {self.types} rows={self.rows} errors={self.sqlstates}>"


def batch(client: RawClient, *messages: bytes) -> Reply:
    """Send *messages* (ending with Sync) and read everything up to and including ReadyForQuery."""
    client.send(b"".join(messages))
    got = []
    while True:
        msg_type, body = client.read_message()
        got.append((msg_type, body))
        if msg_type == p.READY_FOR_QUERY:
            return Reply(got)


def raw_login(proxy, timeout: float = 15, **params: str) -> RawClient:
    client = RawClient(proxy.host, proxy.port, timeout=timeout)
    try:
        client.login(proxy.user, "appdb", proxy.password, **params)
    except BaseException:
        client.close()
        raise
    return client


__all__ = [
    "TX_CONFIG",
    "RawClient",
    "Reply",
    "ServerError",
    "Worker",
    "batch",
    "bind",
    "close",
    "data_row_values",
    "describe",
    "execute",
    "parse",
    "pgbench",
    "proxy_backends",
    "raw_login",
    "run_async",
    "run_threads",
    "sync",
]
