"""PgBouncer-shaped views (SHOW POOLS, STATS, DATABASES, LISTS, ...): PgBouncer 1.18's columns first, ours after.

Tools written for PgBouncer (pgbouncer_exporter, dashboards, scripts) find the columns they
read under the names, order and units PgBouncer uses (bytes, microseconds); what only pgtwist
knows follows them. Where pgtwist has no such thing (cancel-request lists, DNS cache), the column
is there with 0 so that parsers keep working. sv_active, sv_idle, sv_used and sv_tested are
disjoint, as PgBouncer's server lists are (Pool.server_counts).
"""

from __future__ import annotations

import resource
from dataclasses import MISSING, fields
import time
from itertools import chain

from pgtwist import __version__
from pgtwist import config as configmod
from pgtwist.admin import inspect

VERSION_COLUMNS = (("version", str),)
LISTS_COLUMNS = (("list", str), ("items", int))
DATABASES_COLUMNS = (
    ("name", str),
    ("host", str),
    ("port", int),
    ("database", str),
    ("force_user", str),
    ("pool_size", int),
    ("min_pool_size", int),
    ("reserve_pool", int),
    ("pool_mode", str),
    ("max_connections", int),
    ("current_connections", int),
    ("paused", int),
    ("disabled", int),
    # ours
    ("nodes", int),
    ("current_client_connections", int),
)
USERS_COLUMNS = (("name", str), ("pool_mode", str), ("route", str))
_STAT_NAMES = ("xact_count", "query_count", "received", "sent", "xact_time", "query_time", "wait_time")
STATS_COLUMNS = (
    (("database", str),)
    + tuple((f"total_{n}", int) for n in _STAT_NAMES)
    + tuple((f"avg_{n}", int) for n in ("xact_count", "query_count", "recv", "sent", "xact_time", "query_time", "wait_time"))
)
_TOTAL_NAMES = ("xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time", "query_time", "wait_time")
STATS_TOTALS_COLUMNS = (("database", str),) + tuple((n, int) for n in _TOTAL_NAMES)
STATS_AVERAGES_COLUMNS = STATS_TOTALS_COLUMNS
POOLS_COLUMNS = (
    ("database", str),
    ("user", str),
    ("cl_active", int),
    ("cl_waiting", int),
    ("cl_active_cancel_req", int),
    ("cl_waiting_cancel_req", int),
    ("sv_active", int),
    ("sv_active_cancel", int),
    ("sv_being_canceled", int),
    ("sv_idle", int),
    ("sv_used", int),
    ("sv_tested", int),
    ("sv_login", int),
    ("maxwait", int),
    ("maxwait_us", int),
    ("pool_mode", str),
    # ours: a PgBouncer pool is (database, user); pgtwist has one per node too (SHOW NODE_POOLS)
    ("nodes", int),
    ("pool_size", int),
    ("paused", bool),
)
_CONNECTION_COLUMNS = (
    ("type", str),
    ("user", str),
    ("database", str),
    ("state", str),
    ("addr", str),
    ("port", int),
    ("local_addr", str),
    ("local_port", int),
    ("connect_time", str),
    ("request_time", str),
    ("wait", int),
    ("wait_us", int),
    ("close_needed", int),
    ("ptr", str),
    ("link", str),
    ("remote_pid", int),
    ("tls", str),
    ("application_name", str),
)
CLIENTS_COLUMNS = _CONNECTION_COLUMNS + (("id", str), ("session_state", str), ("tx", str), ("age_s", float), ("node", str), ("pinned", str))
SERVERS_COLUMNS = _CONNECTION_COLUMNS + (
    ("id", str),
    ("node", str),
    ("tx", str),
    ("age_s", float),
    ("idle_s", float),
    ("prepared", int),
)
CONFIG_COLUMNS = (("key", str), ("value", str), ("default", str), ("changeable", str))
MEM_COLUMNS = (("name", str), ("size", int), ("used", int), ("free", int), ("memtotal", int))
FDS_COLUMNS = (
    ("fd", int),
    ("task", str),
    ("user", str),
    ("database", str),
    ("addr", str),
    ("port", int),
    ("cancel", int),  # never the cancel key: a secret (always NULL here)
    ("link", int),
)


def _pool_mode(proxy, database=None, user=None) -> str:
    # A per-database / per-user pool_mode (another change adds them) wins over the global one.
    for owner in (user, database):
        mode = getattr(owner, "pool_mode", None) if owner is not None else None
        if mode:
            return mode
    return proxy.config.pool_mode


def version(proxy) -> list[dict]:
    return [{"version": f"pgtwist {__version__}"}]


def _sessions(proxy) -> list:
    return [s for s in list(proxy.clients.values()) if s.database is not None]


def lists(proxy) -> list[dict]:
    pools = inspect._all_pools(proxy)
    sessions = list(proxy.clients.values())
    login = sum(1 for s in sessions if s.state == "login")
    items = {
        "databases": len(proxy.config.databases),
        "users": len(proxy.config.users),
        "pools": len({(p.database.name, p.user) for p in pools}),
        "free_clients": 0,
        "used_clients": len(sessions) - login,
        "login_clients": login,
        "free_servers": 0,
        "used_servers": sum(p.total for p in pools),
        "dns_names": 0,
        "dns_zones": 0,
        "dns_queries": 0,
        "dns_pending": 0,
    }
    return [{"list": k, "items": v} for k, v in items.items()]


def databases(proxy) -> list[dict]:
    servers: dict[str, int] = {}
    for pool in inspect._all_pools(proxy):
        servers[pool.database.name] = servers.get(pool.database.name, 0) + pool.total
    clients: dict[str, int] = {}
    for s in _sessions(proxy):
        clients[s.database.name] = clients.get(s.database.name, 0) + 1
    disabled = getattr(proxy, "disabled", set())
    out = []
    for db in proxy.config.databases.values():
        primary = inspect.primaries_of(proxy, db)
        out.append(
            {
                "name": db.name,
                "host": primary.host if primary is not None else None,
                "port": primary.port if primary is not None else None,
                "database": db.dbname,
                "force_user": None,
                "pool_size": db.pool_size,
                "min_pool_size": proxy.config.min_pool_size,
                "reserve_pool": getattr(db, "reserve_pool_size", 0) or 0,
                "pool_mode": _pool_mode(proxy, db),
                "max_connections": getattr(db, "max_db_connections", 0) or 0,
                "current_connections": servers.get(db.name, 0),
                "paused": int(_paused(proxy, db.name)),
                "disabled": int(db.name in disabled),
                "nodes": len(db.nodes),
                "current_client_connections": clients.get(db.name, 0),
            }
        )
    return out


def _paused(proxy, name: str) -> bool:
    return "*" in proxy.paused or name in proxy.paused


def users(proxy) -> list[dict]:
    return [
        {"name": name, "pool_mode": getattr(user, "pool_mode", None), "route": getattr(user, "route", None)}
        for name, user in proxy.config.users.items()
    ]


def _stats_rows(proxy) -> list[tuple[str, dict]]:
    """(database, totals) for every configured database and any other one with figures."""
    counters = proxy.counters
    wait_s: dict[str, float] = {}
    for pool in inspect._all_pools(proxy):
        wait_s[pool.database.name] = wait_s.get(pool.database.name, 0.0) + pool.wait_seconds
    for name, seconds in getattr(counters, "retired_database_waits", {}).items():
        wait_s[name] = wait_s.get(name, 0.0) + seconds
    names = list(dict.fromkeys(chain(proxy.config.databases, counters.databases)))
    out = []
    for name in names:
        d = counters.databases.get(name)
        out.append(
            (
                name,
                {
                    "xact_count": d.xacts if d else 0,
                    "query_count": d.queries if d else 0,
                    "received": d.received if d else 0,
                    "sent": d.sent if d else 0,
                    "xact_time": d.xact_us if d else 0,
                    "query_time": d.query_us if d else 0,
                    "wait_time": int(wait_s.get(name, 0.0) * 1e6),
                },
            )
        )
    return out


def _averages(totals: dict, before: dict | None, seconds: float) -> dict:
    """What happened between two readings of the totals *seconds* apart (*before* None: the start):
    rates per second for counts and bytes, averages per item for times."""
    if before:
        totals = {k: v - before.get(k, 0) for k, v in totals.items()}
    seconds = max(1e-9, seconds)
    xacts, queries = totals["xact_count"], totals["query_count"]
    return {
        "xact_count": int(xacts / seconds),
        "query_count": int(queries / seconds),
        "received": int(totals["received"] / seconds),
        "sent": int(totals["sent"] / seconds),
        "xact_time": totals["xact_time"] // xacts if xacts > 0 else 0,
        "query_time": totals["query_time"] // queries if queries > 0 else 0,
        "wait_time": totals["wait_time"] // queries if queries > 0 else 0,
    }


class StatsPeriods:
    """PgBouncer's stats_period: the avg_* columns describe the last whole period, not the uptime.

    The janitor calls tick() each second; at each period's end the totals are read once and the
    period's averages kept (a cost per period, none per query). Before the first period ends, the
    averages run from the start.
    """

    def __init__(self):
        self.mark: float | None = None  # when the totals in self.totals were read
        self.totals: dict[str, dict] = {}
        self.averages: dict[str, dict] = {}  # database -> the last whole period's averages

    def tick(self, proxy, now: float) -> None:
        if self.mark is None:
            self.mark = now
            self.totals = dict(_stats_rows(proxy))
            return
        seconds = now - self.mark
        if seconds < proxy.config.stats_period:
            return
        rows = dict(_stats_rows(proxy))
        self.averages = {name: _averages(totals, self.totals.get(name), seconds) for name, totals in rows.items()}
        self.totals, self.mark = rows, now

    def for_database(self, proxy, name: str, totals: dict) -> dict:
        if name in self.averages:
            return self.averages[name]
        if self.averages:  # (a database new since the last period's end: nothing to average yet)
            return _averages(dict.fromkeys(totals, 0), None, 1.0)
        return _averages(totals, None, proxy.clock.seconds() - proxy.counters.started)


def stats(proxy) -> list[dict]:
    out = []
    periods = proxy.counters.periods
    for name, totals in _stats_rows(proxy):
        row = {"database": name}
        row.update({f"total_{k}": v for k, v in totals.items()})
        averages = periods.for_database(proxy, name, totals)
        row.update({("avg_recv" if k == "received" else f"avg_{k}"): v for k, v in averages.items()})
        out.append(row)
    return out


def _renamed(values: dict) -> dict:
    return {("bytes_" + k if k in ("received", "sent") else k): v for k, v in values.items()}


def stats_totals(proxy) -> list[dict]:
    return [dict(database=name, **_renamed(totals)) for name, totals in _stats_rows(proxy)]


def stats_averages(proxy) -> list[dict]:
    periods = proxy.counters.periods
    return [dict(database=name, **_renamed(periods.for_database(proxy, name, totals))) for name, totals in _stats_rows(proxy)]


def pools(proxy) -> list[dict]:
    now = proxy.clock.seconds()
    rows: dict[tuple[str, str], dict] = {}
    oldest: dict[tuple[str, str], float] = {}
    for pool in inspect._all_pools(proxy):
        key = (pool.database.name, pool.user)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {c: 0 for c, _ in POOLS_COLUMNS}
            row.update(
                database=key[0],
                user=key[1],
                pool_mode=_pool_mode(proxy, pool.database, proxy.config.users.get(pool.user)),
                paused=False,
            )
        row["cl_waiting"] += len(pool.waiters)
        counts = pool.server_counts(now)
        row["sv_active"] += counts["active"]
        row["sv_idle"] += counts["idle"]
        row["sv_used"] += counts["used"]
        row["sv_tested"] += counts["tested"]
        row["sv_login"] += pool.connecting
        row["nodes"] += 1
        row["pool_size"] += pool.size
        row["paused"] = row["paused"] or pool.paused
        started = pool.waiting_since()
        if started:
            oldest[key] = min(oldest.get(key, now), min(started))
    for s in _sessions(proxy):
        row = rows.get((s.database.name, s.user))
        if row is not None:
            row["cl_active"] += 1  # PgBouncer: linked, or idle with nothing to do (not waiting)
    for key, row in rows.items():
        row["cl_active"] = max(0, row["cl_active"] - row["cl_waiting"])
        waited = max(0.0, now - oldest[key]) if key in oldest else 0.0
        row["maxwait"] = int(waited)
        row["maxwait_us"] = int((waited - int(waited)) * 1e6)
    return list(rows.values())


def _timestamp(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _local(transport) -> tuple[str | None, int | None]:
    try:
        host = transport.getHost()
    except Exception:  # noqa: BLE001 - an in-memory transport may not say
        return None, None
    return getattr(host, "host", None), getattr(host, "port", None)


def _tls(transport) -> str | None:
    return "TLS" if getattr(transport, "TLS", False) else None


def clients(proxy) -> list[dict]:
    views = {c["id"]: c for c in inspect.clients(proxy)}
    out = []
    for session in list(proxy.clients.values()):
        view = views.get(session.id, {})
        local_addr, local_port = _local(session.transport)
        state = {"linked": "active", "waiting": "waiting", "admin": "active"}.get(session.state, "idle")
        server = session.server
        settings = getattr(session, "settings", None) or {}
        out.append(
            {
                "type": "C",
                "user": session.user,
                "database": view.get("database"),
                "state": state,
                "addr": view.get("addr"),
                "port": view.get("port"),
                "local_addr": local_addr,
                "local_port": local_port,
                "connect_time": _timestamp(session.connected_at),
                "request_time": None,
                "wait": 0,
                "wait_us": 0,
                "close_needed": 0,
                "ptr": session.id,
                "link": server.id if server is not None else None,
                "remote_pid": 0,
                "tls": _tls(session.transport),
                "application_name": settings.get("application_name"),
                "id": session.id,
                "session_state": session.state,
                "tx": view.get("tx"),
                "age_s": view.get("age_s"),
                "node": view.get("node"),
                "pinned": view.get("pinned"),
            }
        )
    return out


def servers(proxy) -> list[dict]:
    out = []
    for pool in inspect._all_pools(proxy):
        for conn in chain(list(pool.idle), list(pool.busy)):
            local_addr, local_port = _local(conn.transport) if conn.transport is not None else (None, None)
            session = conn.session
            now = proxy.clock.seconds()
            out.append(
                {
                    "type": "S",
                    "user": pool.user,
                    "database": pool.database.name,
                    # (Lent to a client between its transactions: idle, as SHOW POOLS counts it.)
                    "state": "idle" if conn in pool.lent or (session is None and conn.state == "idle") else "active",
                    "addr": pool.node.host,
                    "port": pool.node.port,
                    "local_addr": local_addr,
                    "local_port": local_port,
                    "connect_time": _timestamp(conn.created),
                    "request_time": _timestamp(conn.last_used),
                    "wait": 0,
                    "wait_us": 0,
                    "close_needed": int(bool(getattr(pool, "retired", False))),
                    "ptr": conn.id,
                    "link": session.id if session is not None else None,
                    "remote_pid": conn.backend_key[0] if conn.backend_key else 0,
                    "tls": _tls(conn.transport),
                    "application_name": (getattr(session, "settings", None) or {}).get("application_name") if session else None,
                    "id": conn.id,
                    "node": str(conn.node),
                    "tx": inspect._tx(conn.tx_status),
                    "age_s": inspect._round(now - conn.created),
                    "idle_s": inspect._round(now - conn.last_used) if conn.state == "idle" else 0.0,
                    "prepared": len(conn.statements),
                }
            )
    return out


def _show(value) -> str | None:
    return inspect._show(value)


def config(proxy) -> list[dict]:
    """key, value, default, changeable (yes/no): PgBouncer's four columns; secrets as asterisks."""
    defaults = {f.name: f.default for f in fields(configmod.Config) if f.default is not MISSING}
    defaults.update(getattr(configmod, "_DEFAULTS", {}))
    out = []
    for key, value in configmod.flatten(proxy.config).items():
        out.append(
            {
                "key": key,
                "value": _show(value),
                "default": _show(defaults.get(key)),
                "changeable": "no" if configmod.needs_restart(key) else "yes",
            }
        )
    return out


def mem(proxy) -> list[dict]:
    """What PgBouncer's slab caches show, as counts of live objects (Python has no slabs); memtotal: peak RSS."""
    pools = inspect._all_pools(proxy)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB
    rows = {
        "client_cache": len(proxy.clients),
        "server_cache": sum(len(p.idle) + len(p.busy) for p in pools),
        "pool_cache": len(pools),
        "db_cache": len(proxy.config.databases),
        "user_cache": len(proxy.config.users),
    }
    out = [{"name": k, "size": None, "used": v, "free": 0, "memtotal": None} for k, v in rows.items()]
    out.append({"name": "process_max_rss", "size": None, "used": None, "free": None, "memtotal": rss})
    return out


def _fileno(transport) -> int | None:
    try:
        fd = transport.fileno()
    except Exception:  # noqa: BLE001 - TLS or in-memory transports
        handle = getattr(transport, "getHandle", None)
        try:
            fd = handle().fileno() if handle is not None else None
        except Exception:  # noqa: BLE001
            fd = None
    return fd if isinstance(fd, int) and fd >= 0 else None


def fds(proxy) -> list[dict]:
    """Open sockets (no cancel keys, no passwords: PgBouncer shows them for its online restart, we never do)."""
    out = []
    server_fd: dict[str, int | None] = {}
    for pool in inspect._all_pools(proxy):
        for conn in chain(list(pool.idle), list(pool.busy)):
            fd = _fileno(conn.transport) if conn.transport is not None else None
            server_fd[conn.id] = fd
            out.append({"fd": fd, "task": "server", "user": pool.user, "database": pool.database.name,
                        "addr": pool.node.host, "port": pool.node.port, "cancel": None, "link": None, "_client": conn.session})
    for session in list(proxy.clients.values()):
        fd = _fileno(session.transport)
        server = session.server
        addr, port = inspect._peer(session.transport)
        out.append({"fd": fd, "task": "client", "user": session.user,
                    "database": session.database.name if session.database is not None else None,
                    "addr": addr, "port": port, "cancel": None,
                    "link": server_fd.get(server.id) if server is not None else None})
    clients_fd = {id(s): _fileno(s.transport) for s in proxy.clients.values()}
    for row in out:
        linked = row.pop("_client", None)
        if linked is not None:
            row["link"] = clients_fd.get(id(linked))
    return out
