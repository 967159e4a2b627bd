"""Client threads through a running proxy, started and stopped together: the load under the failover drills.

ClientThreads owns the lifecycle every load shares (one daemon thread per client, a stop event,
a bounded join that fails loudly when a client is stuck); a load says only what one client does,
in run_client(i). Readers and MixedLoad are the two loads the integration tests use;
bench/drills.py builds its reconnecting read-your-writes sessions on ClientThreads too.
"""

from __future__ import annotations

import threading
import time

import psycopg

from .failover import write
from .proxy import wait_for


class ClientThreads:
    """*clients* threads, each running self.run_client(i) until self.stop is set."""

    join_timeout = 15.0
    fail_if_stuck = True  # (a benchmark reports what it measured instead)

    def __init__(self, clients: int):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run_client, args=(i,), daemon=True) for i in range(clients)]

    def run_client(self, i: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.join_timeout)
        if self.fail_if_stuck:
            assert not any(t.is_alive() for t in self.threads), "a client thread is stuck"


FAST_READ = "SELECT inet_server_port(), count(*) FROM ft"
SLOW_READ = "SELECT inet_server_port(), pg_sleep(1)"  # in flight most of the time


class Readers(ClientThreads):
    """One thread per query in *sqls*, each reading it (autocommit) through the proxy until stopped.

    Errors, warnings and (time, port) of every read are kept.
    """

    def __init__(self, px, sqls: list[str]):
        super().__init__(len(sqls))
        self.px = px
        self.sqls = sqls
        self.errors: list[tuple[float, str]] = []
        self.reads: list[list[tuple[float, int]]] = [[] for _ in sqls]
        # A node shut down under a statement warns its client (57P01) before it hangs up: a reader
        # that got this warning and then its rows had its read replayed on another node.
        self.warnings: list[str] = []

    def run_client(self, i: int) -> None:
        try:
            conn = self.px.connect()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append((time.monotonic(), f"connect: {e!r}"))
            return
        conn.add_notice_handler(lambda d: self.warnings.append(f"{d.sqlstate} {d.message_primary}"))
        with conn:
            while not self.stop.is_set():
                try:
                    port = conn.execute(self.sqls[i]).fetchone()[0]
                except Exception as e:  # noqa: BLE001
                    self.errors.append((time.monotonic(), f"reader {i}: {type(e).__name__}: {e}"))
                    if conn.broken:
                        return
                    continue
                self.reads[i].append((time.monotonic(), port))

    def wait_reads(self, since: float, n: int, timeout: float, what: str) -> None:
        """Until every fast reader has *n* reads since *since* and every slow one 1 (or an error)."""

        def enough():
            return all(
                sum(1 for t, _ in reads if t >= since) >= (n if sql is FAST_READ else 1)
                for sql, reads in zip(self.sqls, self.reads)
            )

        wait_for(lambda: enough() or self.errors, timeout, what)


class MixedLoad(ClientThreads):
    """Client threads through the proxy: autocommit readers, BEGIN READ ONLY readers, writers.

    Each outcome is kept as (started, finished, kind, sqlstate or None for a success, port).
    """

    def __init__(self, px, readers=3, ro_readers=2, writers=2):
        self.kinds = ["read"] * readers + ["read_only_tx"] * ro_readers + ["write"] * writers
        super().__init__(len(self.kinds))
        self.px = px
        self.outcomes: list[tuple[float, float, str, str | None, int | None]] = []
        self.broken: list[str] = []

    def _one(self, conn, kind: str, i: int) -> int:
        if kind == "read":
            return conn.execute("SELECT inet_server_port() FROM (SELECT count(*) FROM ft) AS c").fetchone()[0]
        if kind == "read_only_tx":
            conn.execute("BEGIN READ ONLY")
            port = conn.execute("SELECT inet_server_port()").fetchone()[0]
            conn.execute("COMMIT")
            return port
        return write(conn, 5000 + i)

    def run_client(self, i: int) -> None:
        kind = self.kinds[i]
        try:
            conn = self.px.connect()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.broken.append(f"{kind} {i}: connect: {e!r}")
            return
        with conn:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    port = self._one(conn, kind, i)
                    self.outcomes.append((started, time.monotonic(), kind, None, port))
                except psycopg.Error as e:
                    self.outcomes.append((started, time.monotonic(), kind, e.sqlstate, None))
                    if conn.broken:
                        self.broken.append(f"{kind} {i}: {e!r}")
                        return
                    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        conn.rollback()
                    time.sleep(0.05)
                time.sleep(0.02)

    def between(self, start: float, end: float, kind: str | None = None) -> list:
        return [o for o in self.outcomes if start <= o[1] <= end and (kind is None or o[2] == kind)]
