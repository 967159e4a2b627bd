"""PgBouncer-shaped views (SHOW POOLS, STATS, DATABASES, LISTS, ...): PgBouncer 1.18's columns first, ours after.

Tools written for PgBouncer (pgbouncer_exporter, dashboards, scripts) find the columns they
read under the names, order, types (int4, numeric: admin.columns) and units PgBouncer uses
(bytes, microseconds), and rows sorted by name as PgBouncer keeps its lists; what only pgtwist
knows follows them. Where pgtwist has no such thing (cancel-request lists, DNS cache, slab
caches' free objects), the column is there with what PgBouncer shows when it has none: 0, '' or
NULL. sv_active, sv_idle, sv_used and sv_tested are disjoint, as PgBouncer's server lists are
(Pool.server_counts), and SHOW SERVERS' state says which of them each connection is in.

The admin console is PgBouncer's pseudo-database `pgbouncer` here, whichever of its names
(`pgbalance`, `pgbouncer`) a client used: a row in SHOW DATABASES, STATS and LISTS, a pool of
the pseudo-user `pgbouncer` (its force_user) in SHOW POOLS, USERS and LISTS, as PgBouncer shows
them, so that dashboards which leave `database="pgbouncer"` out leave out the same rows.
"""

from __future__ import annotations

import resource
import time
from dataclasses import MISSING, fields
from itertools import chain

from pgtwist import __version__
from pgtwist import config as configmod
from pgtwist.admin import inspect
from pgtwist.admin.columns import Bytea, Int4, Numeric

# PgBouncer's admin pseudo-database, its force_user, and what SHOW DATABASES / POOLS say of it.
ADMIN_NAME = "pgbouncer"
_ADMIN_POOL_SIZE = 2  # (PgBouncer's pool_size for it: it never opens a server connection)
_ADMIN_POOL_MODE = "statement"

VERSION_COLUMNS = (("version", str),)
LISTS_COLUMNS = (("list", str), ("items", Int4))
DATABASES_COLUMNS = (
    ("name", str),
    ("host", str),
    ("port", Int4),
    ("database", str),
    ("force_user", str),
    ("pool_size", Int4),
    ("min_pool_size", Int4),
    ("reserve_pool", Int4),
    ("pool_mode", str),  # the database's own pool_mode (NULL: none, the global one applies), as PgBouncer
    ("max_connections", Int4),
    ("current_connections", Int4),
    ("paused", Int4),
    ("disabled", Int4),
    # ours
    ("nodes", int),
    ("current_client_connections", int),
)
USERS_COLUMNS = (("name", str), ("pool_mode", str), ("route", str))
_STAT_NAMES = ("xact_count", "query_count", "received", "sent", "xact_time", "query_time", "wait_time")
STATS_COLUMNS = (
    (("database", str),)
    + tuple((f"total_{n}", Numeric) for n in _STAT_NAMES)
    + tuple((f"avg_{n}", Numeric) for n in ("xact_count", "query_count", "recv", "sent", "xact_time", "query_time", "wait_time"))
)
_TOTAL_NAMES = ("xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time", "query_time", "wait_time")
STATS_TOTALS_COLUMNS = (("database", str),) + tuple((n, Numeric) for n in _TOTAL_NAMES)
STATS_AVERAGES_COLUMNS = STATS_TOTALS_COLUMNS
POOLS_COLUMNS = (
    ("database", str),
    ("user", str),
    ("cl_active", Int4),
    ("cl_waiting", Int4),
    ("cl_active_cancel_req", Int4),
    ("cl_waiting_cancel_req", Int4),
    ("sv_active", Int4),
    ("sv_active_cancel", Int4),
    ("sv_being_canceled", Int4),
    ("sv_idle", Int4),
    ("sv_used", Int4),
    ("sv_tested", Int4),
    ("sv_login", Int4),
    ("maxwait", Int4),
    ("maxwait_us", Int4),
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
    ("port", Int4),
    ("local_addr", str),
    ("local_port", Int4),
    ("connect_time", str),
    ("request_time", str),
    ("wait", Int4),
    ("wait_us", Int4),
    ("close_needed", Int4),
    ("ptr", str),
    ("link", str),
    ("remote_pid", Int4),
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
MEM_COLUMNS = (("name", str), ("size", Int4), ("used", Int4), ("free", Int4), ("memtotal", Int4))
FDS_COLUMNS = (
    ("fd", Int4),
    ("task", str),
    ("user", str),
    ("database", str),
    ("addr", str),
    ("port", Int4),
    ("cancel", int),  # never the cancel key: a secret (always NULL here)
    ("link", Int4),
    ("client_encoding", str),
    ("std_strings", str),
    ("datestyle", str),
    ("timezone", str),
    # PgBouncer's online restart (-R) hands these to its successor; pgtwist has none: always NULL.
    ("password", str),
    ("scram_client_key", Bytea),
    ("scram_server_key", Bytea),
)


def _pool_mode(proxy, database: str, user: str) -> str:
    """The pool_mode a (database, user) pool runs in: the user's, the database's or the global one."""
    mode_for = getattr(proxy.config, "pool_mode_for", None)
    return mode_for(database, user) if mode_for is not None else proxy.config.pool_mode


def version(proxy) -> list[dict]:
    return [{"version": f"pgtwist {__version__}"}]


def _sessions(proxy) -> list:
    return [s for s in list(proxy.clients.values()) if s.database is not None]


def _admins(proxy) -> list:
    """The admin console's clients: PgBouncer's pseudo-database `pgbouncer`'s."""
    return [s for s in list(proxy.clients.values()) if s.state == "admin"]


def _user_names(proxy) -> list[str]:
    """Configured users and the admin pseudo-database's force_user, sorted as PgBouncer's user list."""
    return sorted(set(proxy.config.users) | {ADMIN_NAME})


def _pool_keys(proxy) -> set:
    return {(p.database.name, p.user) for p in inspect._all_pools(proxy)}


def lists(proxy) -> list[dict]:
    pools = inspect._all_pools(proxy)
    sessions = list(proxy.clients.values())
    items = {
        "databases": len(proxy.config.databases) + 1,  # (+ the admin pseudo-database)
        "users": len(_user_names(proxy)),
        "pools": len(_pool_keys(proxy) | {(ADMIN_NAME, ADMIN_NAME)}),
        # PgBouncer's free_* are its slab caches' free objects (memory of closed connections kept
        # for reuse, SHOW MEM's free); Python keeps none, so 0 is the truth, not a placeholder.
        "free_clients": 0,
        "used_clients": len(sessions),  # (PgBouncer's: every client object, logging in or not)
        "login_clients": sum(1 for s in sessions if s.state == "login"),
        "free_servers": 0,
        "used_servers": sum(p.total for p in pools),  # (logging in included, as PgBouncer's)
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
                "pool_mode": getattr(db, "pool_mode", None),
                "max_connections": getattr(db, "max_db_connections", 0) or 0,
                "current_connections": servers.get(db.name, 0),
                "paused": int(_paused(proxy, db.name)),
                "disabled": int(db.name in disabled),
                "nodes": len(db.nodes),
                "current_client_connections": clients.get(db.name, 0),
            }
        )
    # (A database may not be called pgbouncer: config.ADMIN_DATABASES are reserved.)
    out.append(
        {
            "name": ADMIN_NAME,
            "host": None,
            "port": proxy.config.listen.port,
            "database": ADMIN_NAME,
            "force_user": ADMIN_NAME,
            "pool_size": _ADMIN_POOL_SIZE,
            "min_pool_size": 0,
            "reserve_pool": 0,
            "pool_mode": _ADMIN_POOL_MODE,
            "max_connections": 0,
            "current_connections": 0,
            "paused": 0,
            "disabled": 0,
            "nodes": 0,
            "current_client_connections": len(_admins(proxy)),
        }
    )
    return sorted(out, key=lambda row: row["name"])


def _paused(proxy, name: str) -> bool:
    return "*" in proxy.paused or name in proxy.paused


def users(proxy) -> list[dict]:
    configured = proxy.config.users
    out = []
    for name in _user_names(proxy):
        user = configured.get(name)
        out.append({"name": name, "pool_mode": getattr(user, "pool_mode", None), "route": getattr(user, "route", None)})
    return out


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


def _with_admin_row(rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """SHOW STATS' rows sorted by database, with the admin pseudo-database's (zeros: it reaches no node).
    (PgBouncer counts each admin login there as a transaction and a query, and nothing else.)"""
    rows = [(name, totals) for name, totals in rows if name != ADMIN_NAME]
    rows.append((ADMIN_NAME, dict.fromkeys(_STAT_NAMES, 0)))
    return sorted(rows, key=lambda row: row[0])


def stats(proxy) -> list[dict]:
    out = []
    periods = proxy.counters.periods
    for name, totals in _with_admin_row(_stats_rows(proxy)):
        row = {"database": name}
        row.update({f"total_{k}": v for k, v in totals.items()})
        averages = periods.for_database(proxy, name, totals) if name != ADMIN_NAME else totals
        row.update({("avg_recv" if k == "received" else f"avg_{k}"): v for k, v in averages.items()})
        out.append(row)
    return out


def _renamed(values: dict) -> dict:
    return {("bytes_" + k if k in ("received", "sent") else k): v for k, v in values.items()}


def stats_totals(proxy) -> list[dict]:
    return [dict(database=name, **_renamed(totals)) for name, totals in _with_admin_row(_stats_rows(proxy))]


def stats_averages(proxy) -> list[dict]:
    periods = proxy.counters.periods
    return [
        dict(database=name, **_renamed(periods.for_database(proxy, name, totals) if name != ADMIN_NAME else totals))
        for name, totals in _with_admin_row(_stats_rows(proxy))
    ]


def pools(proxy) -> list[dict]:
    now = proxy.clock.seconds()
    rows: dict[tuple[str, str], dict] = {}
    oldest: dict[tuple[str, str], float] = {}
    for pool in inspect._all_pools(proxy):
        key = (pool.database.name, pool.user)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {c: 0 for c, _ in POOLS_COLUMNS}
            row.update(database=key[0], user=key[1], pool_mode=_pool_mode(proxy, *key), paused=False)
        row["cl_waiting"] += len(pool.waiters)
        counts = pool.server_counts(now)
        row["sv_active"] += counts["active"]
        row["sv_idle"] += counts["idle"]
        row["sv_used"] += counts["used"]
        row["sv_tested"] += counts["tested"]
        row["sv_being_canceled"] += counts.get("being_canceled", 0)
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
    admin = rows[(ADMIN_NAME, ADMIN_NAME)] = {c: 0 for c, _ in POOLS_COLUMNS}
    admin.update(database=ADMIN_NAME, user=ADMIN_NAME, cl_active=len(_admins(proxy)), pool_mode=_ADMIN_POOL_MODE, paused=False)
    return [rows[key] for key in sorted(rows)]


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


def _tls(transport) -> str:
    """PgBouncer's tls column: '' in the clear; its protocol/cipher when the TLS connection says them."""
    if transport is None or not getattr(transport, "TLS", False):
        return ""
    try:
        # (After startTLS the TCP transport delivers to Twisted's TLS protocol, whose handle is the
        # OpenSSL connection; the transport's own is the socket.)
        handle = transport.protocol.getHandle()
        return f"{handle.get_protocol_version_name()}/{handle.get_cipher_name()}"
    except Exception:  # noqa: BLE001 - a TLS transport that cannot say: still TLS
        return "TLS"


def _wait(seconds: float) -> tuple[int, int]:
    seconds = max(0.0, seconds)
    return int(seconds), int((seconds - int(seconds)) * 1e6)


# ClientSession.state -> PgBouncer's client state. PgBouncer's "active" is every client of a pool
# that is not waiting for a server, idle ones included (SHOW POOLS' cl_active counts them so).
_CLIENT_STATES = {"login": "login", "waiting": "waiting"}


def _waiting_since(proxy) -> dict[int, float]:
    """id(waiter) -> when it began waiting in its pool's queue (a waiting session is its own waiter)."""
    out: dict[int, float] = {}
    for pool in inspect._all_pools(proxy):
        waiters, since = list(pool.waiters), pool.waiting_since()
        if len(waiters) == len(since):  # (one entry each: Pool.waiting_since follows the queue)
            out.update(zip(map(id, waiters), since))
    return out


def clients(proxy) -> list[dict]:
    views = {c["id"]: c for c in inspect.clients(proxy)}
    now = proxy.clock.seconds()
    waiting = _waiting_since(proxy)
    out = []
    for session in list(proxy.clients.values()):
        view = views.get(session.id, {})
        local_addr, local_port = _local(session.transport)
        state = _CLIENT_STATES.get(session.state, "active")
        server = session.server
        settings = getattr(session, "settings", None) or {}
        # The request being answered (when it began), else the last one answered: PgBouncer's request_time.
        asked = getattr(session, "_asked_at", None)
        since = waiting.get(id(session), asked) if state == "waiting" else None
        wait, wait_us = _wait(now - since) if since is not None else (0, 0)
        out.append(
            {
                "type": "C",
                "user": session.user,
                "database": ADMIN_NAME if session.state == "admin" else view.get("database"),
                "state": state,
                "addr": view.get("addr"),
                "port": view.get("port"),
                "local_addr": local_addr,
                "local_port": local_port,
                "connect_time": _timestamp(session.connected_at),
                "request_time": _timestamp(asked if asked is not None else getattr(session, "last_request", session.connected_at)),
                "wait": wait,
                "wait_us": wait_us,
                "close_needed": 0,
                "ptr": session.id,
                "link": server.id if server is not None else "",
                "remote_pid": 0,
                "tls": _tls(session.transport),
                "application_name": settings.get("application_name") or _startup(session).get("application_name") or "",
                "id": session.id,
                "session_state": session.state,
                "tx": view.get("tx"),
                "age_s": view.get("age_s"),
                "node": view.get("node"),
                "pinned": view.get("pinned"),
            }
        )
    return out


def _startup(session) -> dict:
    """The startup packet's parameters (the admin console's clients keep no settings)."""
    startup = getattr(session, "startup", None)
    return getattr(startup, "parameters", None) or {}


def _server_state(pool, conn, now: float) -> str:
    """Which of PgBouncer's server lists *conn* is on, counted as Pool.server_counts counts them."""
    if conn in pool.busy:
        if conn in pool.testing or conn in pool.resetting:
            return "tested"
        # (Lent to a client between its transactions: idle, as SHOW POOLS counts it.)
        return "idle" if conn in pool.lent else "active"
    return "used" if pool.due_for_check(conn, now) else "idle"


def servers(proxy) -> list[dict]:
    out = []
    now = proxy.clock.seconds()
    for pool in inspect._all_pools(proxy):
        for conn in chain(list(pool.idle), list(pool.busy)):
            local_addr, local_port = _local(conn.transport) if conn.transport is not None else (None, None)
            session = conn.session
            out.append(
                {
                    "type": "S",
                    "user": pool.user,
                    "database": pool.database.name,
                    "state": _server_state(pool, conn, now),
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
                    "link": session.id if session is not None else "",
                    "remote_pid": conn.backend_key[0] if conn.backend_key else 0,
                    "tls": _tls(conn.transport),
                    "application_name": ((getattr(session, "settings", None) or {}).get("application_name") if session else None) or "",
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
    """A setting as PgBouncer's SHOW CONFIG writes one: booleans 1/0, whole seconds without a fraction
    (600, not 600.0), so that a script's int(value) or value == '1' reads ours as it reads PgBouncer's.
    (SET takes 1/0 as it takes on/off.)"""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return inspect._show(value)


def config(proxy) -> list[dict]:
    """key, value, default, changeable (yes/no): PgBouncer's four columns, sorted by key as PgBouncer's;
    secrets as asterisks. The keys are pgtwist's (README, "Coming from PgBouncer", maps them)."""
    defaults = {f.name: f.default for f in fields(configmod.Config) if f.default is not MISSING}
    defaults.update(getattr(configmod, "_DEFAULTS", {}))
    # (The loader's default, not the dataclass's: a Config made in code caches nothing.)
    defaults["auth_cache_ttl"] = getattr(configmod, "DEFAULT_AUTH_CACHE_TTL", defaults.get("auth_cache_ttl"))
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
    return sorted(out, key=lambda row: row["key"])


def mem(proxy) -> list[dict]:
    """PgBouncer's slab caches, in its order, as counts of live objects (Python keeps no free ones and
    its objects' sizes mean little); then ours: the process's peak RSS in memtotal."""
    pools = inspect._all_pools(proxy)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB
    rows = {
        "user_cache": len(_user_names(proxy)),
        "db_cache": len(proxy.config.databases) + 1,
        "pool_cache": len(_pool_keys(proxy) | {(ADMIN_NAME, ADMIN_NAME)}),
        "server_cache": sum(len(p.idle) + len(p.busy) for p in pools),
        "client_cache": len(proxy.clients),
        "iobuf_cache": 0,  # (PgBouncer's shared I/O buffers: each of our connections has its own)
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


def _variables(*sources) -> dict:
    """SHOW FDS' client_encoding, std_strings, datestyle, timezone: from the first source that has each
    (settings and ParameterStatus, whatever their names' case)."""
    names = {"client_encoding": "client_encoding", "std_strings": "standard_conforming_strings",
             "datestyle": "datestyle", "timezone": "timezone"}
    lowered = [{k.lower(): v for k, v in (source or {}).items()} for source in sources]
    return {column: next((s[name] for s in lowered if s.get(name) is not None), None) for column, name in names.items()}


def _listeners(proxy) -> list[dict]:
    service = getattr(proxy, "service", None)
    out = []
    for port in list(getattr(service, "ports", None) or ()):
        try:
            host = port.getHost()
        except Exception:  # noqa: BLE001 - a listener being closed
            continue
        addr = getattr(host, "host", None)
        out.append({"fd": _fileno(port), "task": "pooler", "user": None, "database": None,
                    "addr": addr if addr is not None else "unix",
                    "port": getattr(host, "port", None) or proxy.config.listen.port, "cancel": 0, "link": 0})
    return out


def fds(proxy) -> list[dict]:
    """Listening sockets, clients, servers, as PgBouncer lists them (not the admin console's clients).
    Never a cancel key, password or SCRAM key: PgBouncer shows them for its online restart (-R),
    which pgtwist does not do (workers share the listening socket instead)."""
    out = _listeners(proxy)
    pools = inspect._all_pools(proxy)
    conns = [(pool, conn) for pool in pools for conn in chain(list(pool.idle), list(pool.busy))]
    server_fd = {id(conn): _fileno(conn.transport) if conn.transport is not None else None for _, conn in conns}
    client_fd: dict[int, int | None] = {}
    # What a client without a server connection was told at login (ParameterStatus): its pools' record.
    told: dict[tuple[str, str], list] = {}
    for pool in pools:
        told.setdefault((pool.database.name, pool.user), []).extend(getattr(pool, "login_parameters", {}).values())
    for session in _sessions(proxy):
        fd = client_fd[id(session)] = _fileno(session.transport)
        server = session.server
        addr, port = inspect._peer(session.transport)
        out.append({"fd": fd, "task": "client", "user": session.user, "database": session.database.name,
                    "addr": addr, "port": port, "cancel": None,
                    "link": (server_fd.get(id(server)) if server is not None else None) or 0,
                    **_variables(session.settings, server.parameters if server is not None else None,
                                 *told.get((session.database.name, session.user), ()))})
    for pool, conn in conns:
        out.append({"fd": server_fd[id(conn)], "task": "server", "user": pool.user, "database": pool.database.name,
                    "addr": pool.node.host, "port": pool.node.port, "cancel": None,
                    "link": (client_fd.get(id(conn.session)) if conn.session is not None else None) or 0,
                    **_variables(conn.parameters)})
    return out
