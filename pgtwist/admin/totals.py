"""PgBouncer's views under ``workers = N``: every worker's rows merged into the one row per key that one PgBouncer would show.

Tools written for PgBouncer (prometheus-community's pgbouncer_exporter, dashboards, scripts)
read SHOW POOLS, STATS, STATS_TOTALS, STATS_AVERAGES, LISTS and DATABASES as one row per
database (and user): a row per worker would be a duplicate to them (the exporter refuses the
whole scrape), and one worker's rows alone would undercount. So those views add the workers'
counts up; what is the same on every worker (the config: pool_size, pool_mode, ...) is shown
once, as a worker reports it; a time averaged per item is averaged again, weighted by the items.
(SHOW CLIENTS, SERVERS and pgtwist's own views list every worker's rows with a worker column
instead: admin.console.PER_WORKER.) Pure functions of the rows the workers sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

# Averages per item and the rate of those items they are weighted by (SHOW STATS / STATS_AVERAGES).
_STATS_WEIGHTS = {
    "avg_xact_time": "avg_xact_count",
    "avg_query_time": "avg_query_count",
    "avg_wait_time": "avg_query_count",
}
_AVERAGES_WEIGHTS = {"xact_time": "xact_count", "query_time": "query_count", "wait_time": "query_count"}


def _merge(rows: Iterable[dict], key: Callable[[dict], object], add: frozenset[str], weighted: dict[str, str] | None = None) -> list[dict]:
    """One row per *key*, in the order keys first appear (the views then sort them):
    the columns in *add* summed, those in
    *weighted* averaged weighted by the column named, the others as the first row has them."""
    merged: dict = {}
    weights: dict = {}
    for row in rows:
        row = {k: v for k, v in row.items() if k != "worker"}
        k = key(row)
        into = merged.get(k)
        if into is None:
            merged[k] = into = dict(row)
            if weighted:
                weights[k] = {c: [(row.get(c) or 0, row.get(w) or 0)] for c, w in weighted.items()}
            continue
        for column in add:
            if column in row:
                into[column] = (into.get(column) or 0) + (row[column] or 0)
        if weighted:
            for c, w in weighted.items():
                weights[k][c].append((row.get(c) or 0, row.get(w) or 0))
    if weighted:
        for k, into in merged.items():
            for c, pairs in weights[k].items():
                total = sum(w for _, w in pairs)
                into[c] = round(sum(v * w for v, w in pairs) / total) if total else 0
    return list(merged.values())


_POOLS_ADD = frozenset(
    (
        "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active", "sv_active_cancel",
        "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login", "nodes", "pool_size",
    )
)  # fmt: skip


def pools(rows: Iterable[dict]) -> list[dict]:
    """SHOW POOLS: counts summed, maxwait the longest wait of any worker, paused if any worker is."""
    rows = list(rows)
    out = sorted(_merge(rows, lambda r: (r["database"], r["user"]), _POOLS_ADD), key=lambda r: (r["database"], r["user"]))
    waited: dict = {}
    paused: dict = {}
    for r in rows:
        k = (r["database"], r["user"])
        waited[k] = max(waited.get(k, 0), (r.get("maxwait") or 0) * 1_000_000 + (r.get("maxwait_us") or 0))
        paused[k] = paused.get(k, False) or bool(r.get("paused"))
    for r in out:
        k = (r["database"], r["user"])
        r["maxwait"], r["maxwait_us"] = divmod(waited[k], 1_000_000)
        if "paused" in r:
            r["paused"] = paused[k]
    return out


_STATS_ADD = frozenset(
    (
        "total_xact_count", "total_query_count", "total_received", "total_sent", "total_xact_time",
        "total_query_time", "total_wait_time", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
    )
)  # fmt: skip


def stats(rows: Iterable[dict]) -> list[dict]:
    """SHOW STATS: totals and rates summed; times per transaction or query weighted by their rates."""
    return sorted(_merge(rows, lambda r: r["database"], _STATS_ADD, _STATS_WEIGHTS), key=lambda r: r["database"])


_TOTALS_ADD = frozenset(("xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time", "query_time", "wait_time"))


def stats_totals(rows: Iterable[dict]) -> list[dict]:
    return sorted(_merge(rows, lambda r: r["database"], _TOTALS_ADD), key=lambda r: r["database"])


def stats_averages(rows: Iterable[dict]) -> list[dict]:
    rates = frozenset(("xact_count", "query_count", "bytes_received", "bytes_sent"))
    return sorted(_merge(rows, lambda r: r["database"], rates, _AVERAGES_WEIGHTS), key=lambda r: r["database"])


# LISTS items that count connections (each worker has its own); the others count the config.
_LISTS_ADD = frozenset(("free_clients", "used_clients", "login_clients", "free_servers", "used_servers"))


def lists(rows: Iterable[dict]) -> list[dict]:
    rows = list(rows)
    out = _merge(rows, lambda r: r["list"], frozenset())
    counted: dict = {}
    for r in rows:
        if r["list"] in _LISTS_ADD:
            counted[r["list"]] = counted.get(r["list"], 0) + (r["items"] or 0)
    for r in out:
        if r["list"] in counted:
            r["items"] = counted[r["list"]]
    return out


def databases(rows: Iterable[dict]) -> list[dict]:
    """SHOW DATABASES: connections summed; paused if any worker is (PAUSE reaches every worker)."""
    rows = list(rows)
    out = sorted(_merge(rows, lambda r: r["name"], frozenset(("current_connections", "current_client_connections"))), key=lambda r: r["name"])
    paused: dict = {}
    for r in rows:
        paused[r["name"]] = max(paused.get(r["name"], 0), r.get("paused") or 0)
    for r in out:
        r["paused"] = paused[r["name"]]
    return out


# SHOW name -> (the view a worker serves, how the workers' rows are merged).
MERGED: dict[str, tuple[str, Callable[[list[dict]], list[dict]]]] = {
    "POOLS": ("bouncer.pools", pools),
    "STATS": ("bouncer.stats", stats),
    "STATS_TOTALS": ("bouncer.stats_totals", stats_totals),
    "STATS_AVERAGES": ("bouncer.stats_averages", stats_averages),
    "LISTS": ("bouncer.lists", lists),
    "DATABASES": ("bouncer.databases", databases),
}
