"""Which worker of a `workers = N` pgtwist serves what: from the supervisor's log."""

from __future__ import annotations

import os
import re
import socket

import psycopg

from tests.harness.proxy import wait_for


def worker_pids(px) -> dict[int, int]:
    """Worker index -> its latest pid, from the supervisor's log."""
    return {int(i): int(pid) for i, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", px.log_text())}


def local_port(conn: psycopg.Connection) -> int:
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as s:
        return s.getsockname()[1]


def worker_of(px, conn: psycopg.Connection) -> int:
    """Which worker serves *conn* (its log_connections line names the client's port)."""
    pattern = re.compile(r"worker (\d+): .*connected from 127\.0\.0\.1:%d\b" % local_port(conn))
    return int(wait_for(lambda: pattern.search(px.log_text()), 10, "the connection's log line").group(1))


def on_each_worker(px, count: int = 2, tries: int = 60, **connect) -> list[psycopg.Connection]:
    """One connection served by each of *count* workers (the kernel decides which accepts: connect until it did)."""
    by_worker: dict[int, psycopg.Connection] = {}
    for _ in range(tries):
        conn = px.connect(**connect)
        worker = worker_of(px, conn)
        if worker in by_worker:
            conn.close()
            continue
        by_worker[worker] = conn
        if len(by_worker) == count:
            return [by_worker[i] for i in range(count)]
    for conn in by_worker.values():
        conn.close()
    raise AssertionError(f"no connection served by each of {count} workers in {tries} tries (got {sorted(by_worker)})")
