"""Counters the proxy bumps on its non-hot paths; the views, the console and /metrics read them."""

from __future__ import annotations

from bisect import bisect_left
from functools import lru_cache

from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate

# Upper bounds (seconds) of the duration histograms' buckets; +Inf is implied.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TX_IDLE = p.TX_IDLE


class Histogram:
    """Cumulative-at-read bucket counts, a sum and a count, as Prometheus wants them."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self):
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        """[(upper bound, cumulative count)], ending with '+Inf'."""
        out, total = [], 0
        for bound, n in zip(DURATION_BUCKETS + (float("inf"),), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class Traffic:
    """What went through one (node, role): query round trips, completed transactions, query latency."""

    __slots__ = ("queries", "transactions", "query_seconds")

    def __init__(self):
        self.queries = 0
        self.transactions = 0
        self.query_seconds = Histogram()


@lru_cache(maxsize=256)
def _route_label(reason: str) -> str:
    # Once per transaction: the few distinct reasons are reduced once each.
    return (reason or "unknown").split(";", 1)[0].split(":", 1)[0].strip() or "unknown"


class Counters:
    """Monotonic totals since start. Calls come once per client, per error or per ReadyForQuery batch,
    never per forwarded message; gauges (clients, servers, pools) are computed when read instead."""

    def __init__(self, clock):
        self.clock = clock
        self.started = clock.seconds()
        self.clients_accepted = 0
        self.clients_closed = 0
        self.errors: dict[str, int] = {}  # SQLSTATE -> errors pgtwist sent itself
        # (node, role) -> its Traffic: one probe per ReadyForQuery, on the hot path.
        self.traffic: dict[tuple, Traffic] = {}
        self.transaction_seconds: dict[tuple, Histogram] = {}  # (node, role) -> explicit transactions' durations
        self.routes: dict[str, int] = {}  # routing decisions by reason
        self.failovers = 0
        self.reloads = 0
        self.reload_failures = 0
        self.audited = 0
        # Pool waits of pools that are gone (removed by a reload): counters never go backwards.
        self.retired_waits = 0
        self.retired_wait_seconds = 0.0
        self._open_tx: dict[str, tuple[float, tuple]] = {}  # client id -> (first seen in a transaction, key)

    # -- clients ---------------------------------------------------------------------------

    def client_connected(self) -> None:
        self.clients_accepted += 1

    def client_closed(self, client_id: str) -> None:
        self.clients_closed += 1
        if self._open_tx:
            self._open_tx.pop(client_id, None)

    def error(self, code: str | None) -> None:
        code = code or sqlstate.INTERNAL_ERROR
        self.errors[code] = self.errors.get(code, 0) + 1

    # -- per ReadyForQuery batch -------------------------------------------------------------

    def ready(self, client_id: str, node, role: str, status: int, latency: float | None = None) -> None:
        """A node's ReadyForQuery reached a client: one more query; a transaction ended when status is idle.

        Transaction durations run from the first ReadyForQuery that reports the transaction
        open (BEGIN done) to the one that reports it closed (COMMIT/ROLLBACK done); query
        latency (*latency*) from the client's request to that ReadyForQuery.
        """
        key = (node, role)
        try:
            traffic = self.traffic[key]
        except KeyError:
            traffic = self.traffic[key] = Traffic()
        traffic.queries += 1
        if latency is not None:
            histogram = traffic.query_seconds
            histogram.counts[bisect_left(DURATION_BUCKETS, latency)] += 1
            histogram.sum += latency
            histogram.count += 1
        if status == _TX_IDLE:
            traffic.transactions += 1
            if self._open_tx:
                opened = self._open_tx.pop(client_id, None)
                if opened is not None:
                    histogram = self.transaction_seconds.get(opened[1])
                    if histogram is None:
                        histogram = self.transaction_seconds[opened[1]] = Histogram()
                    histogram.observe(max(0.0, self.clock.seconds() - opened[0]))
        elif client_id not in self._open_tx:
            self._open_tx[client_id] = (self.clock.seconds(), key)

    @property
    def queries(self) -> dict[tuple, int]:
        """(node, role) -> ReadyForQuery batches relayed."""
        return {key: t.queries for key, t in self.traffic.items()}

    @property
    def transactions(self) -> dict[tuple, int]:
        """(node, role) -> ReadyForQuery 'I' relayed (transactions and autocommit statements done)."""
        return {key: t.transactions for key, t in self.traffic.items()}

    @property
    def query_seconds(self) -> dict[tuple, Histogram]:
        """(node, role) -> from a client's request to its ReadyForQuery."""
        return {key: t.query_seconds for key, t in self.traffic.items() if t.query_seconds.count}

    # -- routing and cluster ------------------------------------------------------------------

    def routed(self, reason: str) -> None:
        """One routing decision; *reason* is reduced to its leading phrase to keep label values few."""
        routes = self.routes
        key = _route_label(reason)
        routes[key] = routes.get(key, 0) + 1

    def failover(self) -> None:
        self.failovers += 1

    # -- totals -------------------------------------------------------------------------------

    def total(self, table: dict) -> int:
        return sum(table.values())
