"""Counters the proxy bumps on its non-hot paths; the views, the console and /metrics read them."""

from __future__ import annotations

from typing import Any, Final

from functools import lru_cache

from twisted.logger import Logger

from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate

log = Logger(namespace=__name__)  # (named: compiled, the module has no frame Logger could read it from)

# Upper bounds (seconds) of the duration histograms' buckets; +Inf is implied. (A list, made a
# tuple for readers: compiled, a Final tuple literal of floats is a C struct that is boxed into a
# new tuple of new floats at every use as a Python object.)
_BOUNDS: Final[list[float]] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
DURATION_BUCKETS: Final[tuple[float, ...]] = tuple(_BOUNDS)
_TX_IDLE: Final = p.TX_IDLE


def bucket_of(value: float) -> int:
    """The index of the first bucket whose bound is at least *value* (bisect_left over
    DURATION_BUCKETS; len(DURATION_BUCKETS) for +Inf): a native loop, once per query, that
    mostly stops at the first bound."""
    i = 0
    for bound in _BOUNDS:
        if value <= bound:
            return i
        i += 1
    return i


class Histogram:
    """Cumulative-at-read bucket counts, a sum and a count, as Prometheus wants them."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bucket_of(value)] += 1
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

    def __init__(self) -> None:
        self.queries = 0
        self.transactions = 0
        self.query_seconds = Histogram()


# Reasons that carry a name a client chose ("volatile function nosuch_fn_123") are reduced to
# their fixed leading words: a label value must never come from client input.
_NAMED = ("volatile function", "function", "batch with", "batch placed", "rule", "hint")
MAX_ROUTE_LABELS = 64  # a new reason phrase past this many is counted as "other" (memory stays bounded)
OTHER = "other"


@lru_cache(maxsize=256)
def route_label(reason: str) -> str:
    """The metric label for a routing reason: its leading phrase, never a name from the statement."""
    phrase = (reason or "unknown").split(";", 1)[0].split(":", 1)[0].strip() or "unknown"
    for prefix in _NAMED:
        if phrase == prefix or phrase.startswith(prefix + " "):
            # Once per distinct reason (this function is cached), not per transaction.
            log.debug("routing reason {reason!r} counted as {label!r}", reason=reason, label=prefix)
            return prefix
    return phrase


class DatabaseStats:
    """PgBouncer's SHOW STATS figures of one database (totals since start; times in microseconds).

    Bytes are added once per read (frontend: client -> pgtwist; server connection: node -> client);
    the rest once per ReadyForQuery batch, as the other counters are.
    """

    __slots__ = ("received", "sent", "queries", "xacts", "query_us", "xact_us")

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0
        self.queries = 0
        self.xacts = 0
        self.query_us = 0
        self.xact_us = 0


class Counters:
    """Monotonic totals since start. Calls come once per client, per error or per ReadyForQuery batch,
    never per forwarded message; gauges (clients, servers, pools) are computed when read instead."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.started = clock.seconds()
        self.periods: Any = None  # admin.bouncer.StatsPeriods, ticked by the janitor (stats_period)
        self.clients_accepted = 0
        self.clients_closed = 0
        self.errors: dict[str, int] = {}  # SQLSTATE -> errors pgtwist sent itself
        # (node, role) -> its Traffic: one probe per ReadyForQuery, on the hot path.
        self.traffic: dict[tuple, Traffic] = {}
        # The same, found by (id(node), role): a node's Address hashes in Python (config.py), a call
        # per ReadyForQuery. The node is kept beside its Traffic, so that an id that a reload's new
        # objects reuse finds nothing.
        self._traffic_at: dict[tuple[int, str], tuple[Any, Traffic]] = {}
        self.transaction_seconds: dict[tuple, Histogram] = {}  # (node, role) -> explicit transactions' durations
        self.routes: dict[str, int] = {}  # routing decisions by reason (route_label: a bounded set)
        self.databases: dict[str, DatabaseStats] = {}  # database name -> SHOW STATS figures
        # (node, result) -> server connection attempts: result is "ok", "connect_failed" or "login_failed".
        self.server_logins: dict[tuple[str, str], int] = {}
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

    def database(self, name: str) -> DatabaseStats:
        stats = self.databases.get(name)
        if stats is None:
            stats = self.databases[name] = DatabaseStats()
        return stats

    def server_login(self, node: str, result: str) -> None:
        key = (node, result)
        self.server_logins[key] = self.server_logins.get(key, 0) + 1

    def ready(self, client_id: str, node, role: str, status: int, latency: float | None = None, database: str | None = None) -> None:
        """A node's ReadyForQuery reached a client: one more query; a transaction ended when status is idle.

        Transaction durations run from the first ReadyForQuery that reports the transaction
        open (BEGIN done) to the one that reports it closed (COMMIT/ROLLBACK done); query
        latency (*latency*) from the client's request to that ReadyForQuery.
        """
        found = self._traffic_at.get((id(node), role))
        if found is not None and found[0] is node:
            traffic = found[1]
        else:
            known = self.traffic.get((node, role))
            traffic = self.traffic[(node, role)] = Traffic() if known is None else known
            self._traffic_at[(id(node), role)] = (node, traffic)
        traffic.queries += 1
        if latency is not None:
            latencies = traffic.query_seconds
            latencies.counts[bucket_of(latency)] += 1
            latencies.sum += latency
            latencies.count += 1
        stats = None
        latency_us = 0
        if database is not None:
            stats = self.databases.get(database) or self.database(database)
            stats.queries += 1
            if latency is not None:
                latency_us = int(latency * 1e6 + 0.5)  # (a builtin call fewer than round(); ties and a clock step back aside, the same)
                stats.query_us += latency_us
        if status == _TX_IDLE:
            traffic.transactions += 1
            opened = self._open_tx.pop(client_id, None) if self._open_tx else None
            if opened is not None:
                seconds = max(0.0, self.clock.seconds() - opened[0])
                histogram = self.transaction_seconds.get(opened[1])
                if histogram is None:
                    histogram = self.transaction_seconds[opened[1]] = Histogram()
                histogram.observe(seconds)
                if stats is not None:
                    stats.xact_us += int(seconds * 1e6 + 0.5)
            elif stats is not None:
                # An autocommit statement is a transaction of its own (as PgBouncer counts it).
                stats.xact_us += latency_us
            if stats is not None:
                stats.xacts += 1
        elif client_id not in self._open_tx:
            self._open_tx[client_id] = (self.clock.seconds(), (node, role))

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
        """One routing decision; *reason* is reduced to a label from a bounded set (route_label)."""
        routes = self.routes
        key = route_label(reason)
        if key not in routes and len(routes) >= MAX_ROUTE_LABELS:
            key = OTHER
        routes[key] = routes.get(key, 0) + 1

    def failover(self) -> None:
        self.failovers += 1

    # -- totals -------------------------------------------------------------------------------

    def total(self, table: dict) -> int:
        return sum(table.values())
