"""Plain-data views of a running proxy (lists of dicts of str/int/float/bool/None); secrets never appear.

The manhole, the admin console and /metrics all read these. Each view has a column list
(name, Python type) so that an empty result still has a shape, and the console can type it.
"""

from __future__ import annotations

from itertools import chain

from pgtwist import config as configmod
from pgtwist.routing import analysis

CLIENT_COLUMNS = (
    ("id", str),
    ("user", str),
    ("database", str),
    ("state", str),
    ("tx", str),
    ("addr", str),
    ("port", int),
    ("age_s", float),
    ("server", str),
    ("node", str),
    ("pinned", str),
)
SERVER_COLUMNS = (
    ("id", str),
    ("database", str),
    ("user", str),
    ("node", str),
    ("state", str),
    ("tx", str),
    ("client", str),
    ("age_s", float),
    ("idle_s", float),
    ("backend_pid", int),
    ("prepared", int),
)
POOL_COLUMNS = (
    ("database", str),
    ("user", str),
    ("node", str),
    ("role", str),
    ("size", int),
    ("idle", int),
    ("busy", int),
    ("connecting", int),
    ("waiting", int),
    ("oldest_wait_s", float),
    ("waits", int),
    ("wait_s", float),
    ("paused", bool),
    ("retired", bool),
    ("lent", int),  # (added after the others; readers by position keep their columns)
    ("yielded", int),  # connections closed to let another pool under a shared limit open one
)
NODE_COLUMNS = (
    ("database", str),
    ("node", str),
    ("role", str),
    ("up", bool),
    ("lag_bytes", int),
    ("lag_s", float),
    ("timeline", int),
    ("excluded", str),  # why it gets no reads (policy.EXCLUSIONS): down, fenced, old_timeline, no_upstream, lag_*
    ("servers", int),
)
KEY_VALUE_COLUMNS = (("name", str), ("value", str))  # values keep their Python type; the console shows text
CONFIG_COLUMNS = (("key", str), ("value", str), ("applies", str))
PREPARED_COLUMNS = (("owner", str), ("kind", str), ("name", str), ("query", str))

_QUERY_PREVIEW = 200


def _tx(status) -> str:
    return chr(status) if isinstance(status, int) and status else "I"


def _round(seconds: float) -> float:
    return round(max(0.0, seconds), 3)


def _peer(transport) -> tuple[str | None, int | None]:
    try:
        peer = transport.getPeer()
    except Exception:  # noqa: BLE001 - a transport that cannot say is not worth an error
        return None, None
    return getattr(peer, "host", None) or str(peer), getattr(peer, "port", None)


def role_of(proxy, pool) -> str:
    """The role of *pool*'s node as the router sees it now ('primary' for a lone node)."""
    router = proxy.routers.get(pool.database.name)
    if router is not None:
        for state in router.states():
            if state.name == str(pool.node):
                return state.role
        return "unknown"
    return "primary" if pool.node == pool.database.nodes[0] else "unknown"


# -- views ----------------------------------------------------------------------------------


def clients(proxy) -> list[dict]:
    now = proxy.clock.seconds()
    out = []
    for session in list(proxy.clients.values()):
        addr, port = _peer(session.transport)
        server = session.server
        database = session.database
        out.append(
            {
                "id": session.id,
                "user": session.user,
                "database": database.name if database is not None else (configmod.ADMIN_DATABASE if session.state == "admin" else None),
                "state": session.state,
                "tx": _tx(session.tx_status),
                "addr": addr,
                "port": port,
                "age_s": _round(now - session.connected_at),
                "server": server.id if server is not None else None,
                "node": str(server.node) if server is not None else None,
                "pinned": session.pinned,
            }
        )
    return out


def _all_pools(proxy) -> list:
    return list(proxy.pools.values()) + list(proxy.retired_pools)


def servers(proxy) -> list[dict]:
    now = proxy.clock.seconds()
    out = []
    for pool in _all_pools(proxy):
        for conn in chain(list(pool.idle), list(pool.busy)):
            session = conn.session
            out.append(
                {
                    "id": conn.id,
                    "database": pool.database.name,
                    "user": pool.user,
                    "node": str(conn.node),
                    "state": conn.state,
                    "tx": _tx(conn.tx_status),
                    "client": session.id if session is not None else None,
                    "age_s": _round(now - conn.created),
                    "idle_s": _round(now - conn.last_used) if conn.state == "idle" else 0.0,
                    "backend_pid": conn.backend_key[0] if conn.backend_key else None,
                    "prepared": len(conn.statements),
                }
            )
    return out


def pools(proxy) -> list[dict]:
    now = proxy.clock.seconds()
    out = []
    for pool in _all_pools(proxy):
        started = pool.waiting_since()
        out.append(
            {
                "database": pool.database.name,
                "user": pool.user,
                "node": str(pool.node),
                "role": role_of(proxy, pool),
                "size": pool.size,
                "idle": len(pool.idle),
                "busy": len(pool.busy),
                "connecting": pool.connecting,
                "waiting": len(pool.waiters),
                "oldest_wait_s": _round(now - min(started)) if started else 0.0,
                "waits": getattr(pool, "waits", 0),
                "wait_s": round(getattr(pool, "wait_seconds", 0.0), 6),
                "paused": pool.paused,
                "retired": getattr(pool, "retired", False),
                # (Of the busy: kept by a client between its transactions, idle on the node and
                # taken back at once for a waiter; SHOW POOLS counts these as sv_idle.)
                "lent": len(pool.lent),
                "yielded": getattr(pool, "yielded", 0),
            }
        )
    return out


def nodes(proxy) -> list[dict]:
    """Every configured node of every database, with the role, health and lag the cluster monitor reports."""
    open_servers: dict[tuple[str, str], int] = {}
    for pool in _all_pools(proxy):
        key = (pool.database.name, str(pool.node))
        open_servers[key] = open_servers.get(key, 0) + pool.total
    routers = proxy.routers
    out = []
    for database in proxy.config.databases.values():
        router = routers.get(database.name)
        states = {s.name: s for s in router.states()} if router is not None else {}
        excluded = router.read_exclusions() if router is not None and router.clustered else {}
        for i, node in enumerate(database.nodes):
            name = str(node)
            state = states.get(name)
            if state is not None:
                role, up = state.role, bool(state.up) and not getattr(state, "fenced", False)
                lag_bytes, lag_s = getattr(state, "lag_bytes", None), getattr(state, "lag_seconds", None)
                timeline = getattr(state, "timeline", 0) or None
            else:  # not monitored (yet): the first node is where work goes
                role, up, lag_bytes, lag_s, timeline = ("primary" if i == 0 else "unknown"), None, None, None, None
            out.append(
                {
                    "database": database.name,
                    "node": name,
                    "role": role,
                    "up": up,
                    "lag_bytes": lag_bytes,
                    "lag_s": lag_s,
                    "timeline": timeline,
                    "excluded": excluded.get(name),
                    "servers": open_servers.get((database.name, name), 0),
                }
            )
    return out


def primaries_of(proxy, database):
    """The node *database* writes to now (None when no primary is known)."""
    router = getattr(proxy, "routers", {}).get(database.name)
    return router.primary() if router is not None else database.nodes[0]


def primaries(proxy) -> list:
    """The node each database writes to now (config Address objects), where one is known."""
    out = []
    routers = proxy.routers
    for database in proxy.config.databases.values():
        router = routers.get(database.name)
        node = router.primary() if router is not None else database.nodes[0]
        if node is not None:
            out.append(node)
    return out


def stats(proxy) -> list[dict]:
    """Totals since start and current counts, as name/value rows."""
    c = proxy.counters
    pool_list = _all_pools(proxy)
    rows = {
        "uptime_s": _round(proxy.clock.seconds() - c.started),
        "clients": len(proxy.clients),
        "clients_accepted": c.clients_accepted,
        "servers": sum(p.total for p in pool_list),
        "pools": len(pool_list),
        "waiting": sum(len(p.waiters) for p in pool_list),
        "pool_waits": c.retired_waits + sum(getattr(p, "waits", 0) for p in pool_list),
        "queries": c.total(c.queries),
        "transactions": c.total(c.transactions),
        "errors": c.total(c.errors),
        "pinned_sessions": proxy.pinned_sessions,
        "routing_decisions": c.total(c.routes),
        "failovers": c.failovers,
        "reloads": c.reloads,
        "reload_failures": c.reload_failures,
        "draining": proxy.draining,
    }
    return [{"name": k, "value": v} for k, v in rows.items()]


def _show(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    return str(value)


def config(cfg) -> list[dict]:
    """Every effective setting (key path, value, whether a reload applies it); passwords as asterisks."""
    return [
        {"key": key, "value": _show(value), "applies": "restart" if configmod.needs_restart(key) else "reload"}
        for key, value in configmod.flatten(cfg).items()
    ]


def prepared(proxy) -> list[dict]:
    """Named prepared statements: each server connection's shared ones, each transaction-mode client's own."""
    out = []
    for pool in _all_pools(proxy):
        for conn in chain(list(pool.idle), list(pool.busy)):
            for name in list(conn.statements.names):
                out.append({"owner": conn.id, "kind": "server", "name": name, "query": None})
    for session in list(proxy.clients.values()):
        relay = session.relay
        if relay is None:
            continue
        for name, statement in list(relay.statements.items()):
            query = getattr(statement, "query", None)
            out.append({"owner": session.id, "kind": "client", "name": name, "query": query[:_QUERY_PREVIEW] if query else query})
    return out


def explain(proxy, sql: str, database: str | None = None, user: str | None = None) -> dict:
    """Where *sql* would go if a client sent it now, and why (without running it)."""
    cfg = proxy.config
    name = database or next(iter(cfg.databases))
    db = cfg.databases.get(name)
    if db is None:
        return {"database": name, "error": "no such database"}
    effects = analysis.session_effects(sql)
    out = {
        "database": name,
        "sql": sql,
        "pins_session": effects.pin or None,  # transaction pooling: what would pin the client
        "changes_session": bool(effects.changes_state),
    }
    router = proxy.router_for(db)
    user_config = cfg.users.get(user) if user else None
    try:
        decision = router.decide(sql, in_transaction=None, user_rule=getattr(user_config, "route", "auto"))
    except Exception as e:  # noqa: BLE001 - NoNode and friends: say why instead
        out.update(node=None, target=None, reason=f"no node can take it now: {e}")
        return out
    classification = decision.classification
    out.update(
        node=str(decision.node),
        target=decision.want,
        reason=decision.reason,
        read_only=bool(classification.read_only),
        classification=classification.reason,
    )
    return out
