"""Live reconfiguration: read, validate, diff and apply a config file to a running proxy (SIGHUP, RELOAD)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType

from twisted.logger import Logger

from pgtwist import config as configmod
from pgtwist.pooling.pool import PoolSettings
from pgtwist.transport import tls

log = Logger()


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    source: str
    errors: tuple[str, ...] = ()
    changes: configmod.ConfigDiff | None = None

    @property
    def restart(self) -> tuple[str, ...]:
        """Changed settings that keep their old value until pgtwist restarts."""
        return self.changes.restart if self.changes is not None else ()


def reload_file(proxy) -> ReloadOutcome:
    """Re-read the file the running config came from (and its auth_file) and apply it. A broken file changes nothing."""
    current = proxy.config
    source = current.source
    counters = proxy.counters
    if source.startswith("<"):
        counters.reload_failures += 1
        log.warn("reload: this configuration ({source}) did not come from a file; nothing to re-read", source=source)
        return ReloadOutcome(False, source, ("the running configuration did not come from a file",))
    try:
        new = configmod.load(source)
        new_tls = _load_tls(proxy, new)
    except configmod.ConfigError as e:
        return _failed(proxy, source, tuple(e.errors))
    except Exception as e:  # noqa: BLE001 - certificates that do not load: same rule, nothing changes
        return _failed(proxy, source, (f"tls: {e}",))
    for warning in new.warnings:
        log.warn("reload: {source}: {warning}", source=source, warning=warning)
    changes = configmod.diff(current, new)
    for key in changes.restart:
        log.warn("reload: {key} changed in {source}; it needs a restart and keeps its old value until then", key=key, source=source)
    effective = configmod.applicable(current, new)
    if new_tls is not None:
        proxy.use_tls(*new_tls)  # (first: routers the config change rebuilds probe with it too)
    proxy.apply_config(effective, changes)
    proxy.overrides.clear()  # (SET lasts until the file is read again: its values are the file's now)
    counters.reloads += 1
    if changes:
        log.info(
            "reload: {source} applied; changed: {keys}",
            source=source,
            keys=", ".join(changes.live) or "nothing that applies without a restart",
        )
    else:
        log.info("reload: {source} applied; no setting changed", source=source)
    return ReloadOutcome(True, source, changes=changes)


def _failed(proxy, source: str, errors: tuple[str, ...]) -> ReloadOutcome:
    proxy.counters.reload_failures += 1
    for error in errors:
        log.error("reload: {source}: {error}", source=source, error=error)
    log.error("reload: {source} has {n} error(s); nothing changed, still serving with the previous configuration", source=source, n=len(errors))
    return ReloadOutcome(False, source, errors)


def _load_tls(proxy, new):
    """The new config's TLS contexts, built before anything changes (files are re-read: renewed certificates apply)."""
    return tls.from_config(new)


def apply(proxy, new, changes: configmod.ConfigDiff) -> None:
    """Run *proxy* with *new* from now on. Sessions already open keep their own copy of the settings.

    - pool sizes and limits: updated in place (waiting clients get new capacity at once);
    - databases, nodes or users removed (or a database's dbname changed): their pools retire,
      closing idle connections now and busy ones when their clients are done;
    - users and passwords: new logins use the new ones (SCRAM pass-through keys of changed users are forgotten);
    - routers of databases whose nodes changed are rebuilt (their health monitors restarted), and
      open sessions place their next transaction with the new one.
    """
    old = proxy.config
    # Unchanged users keep their parsed credentials (a plaintext password's SCRAM salt stays put).
    users = {
        name: old.users[name] if name in old.users and name not in changes.users_changed else user
        for name, user in new.users.items()
    }
    new = replace(new, users=MappingProxyType(users))
    proxy.config = new
    for name in changes.users_changed + changes.users_removed:
        proxy.client_keys.pop(name, None)
    _apply_routers(proxy, old, new, changes)
    for key, pool in list(proxy.pools.items()):
        database = new.databases.get(pool.database.name)
        gone = (
            database is None
            or pool.node not in database.nodes
            or database.dbname != pool.database.dbname
            or (pool.user in changes.users_removed and new.auth_type != "trust")
            # A pool serves one pool_mode: clients of the new one get connections of their own.
            or old.pool_mode_for(pool.database.name, pool.user) != new.pool_mode_for(pool.database.name, pool.user)
        )
        if gone:
            del proxy.pools[key]
            proxy.retired_pools.add(pool)
            pool.retire()
            log.info("reload: pool {pool} retired; it closes as its clients finish", pool=key)
            continue
        pool.reconfigure(database, PoolSettings.from_config(new, database))
    sweep(proxy)
    for name in changes.databases_added:
        log.info("reload: database {db} added", db=name)
    for name in changes.databases_removed:
        log.info("reload: database {db} removed; its open sessions may finish", db=name)


def _apply_routers(proxy, old, new, changes) -> None:
    routers = proxy.routers
    rebuild_all = any(k in changes.changed for k in ("routing_hook", "health_check_interval", "health_check_timeout", "health_user"))
    for name, router in list(routers.items()):
        database = new.databases.get(name)
        before = old.databases.get(name)
        if database is None or rebuild_all or before is None or database.nodes != before.nodes or database.dbname != before.dbname:
            del routers[name]
            router.replaced = True  # (its sessions follow_reload at their next placement)
            monitor = getattr(router, "monitor", None)
            if monitor is not None and monitor.running:
                monitor.stop()
            # Clients keeping a connection between transactions would go on using it without
            # asking the new router: take those back, so that their next work is placed anew.
            for pool in list(proxy.pools.values()):
                if pool.database.name == name:
                    pool.reclaim_all()
        else:
            router.database = database
            router.config = new
    if proxy.started:
        for database in new.databases.values():
            if database.name not in routers:
                proxy.router_for(database)


def sweep(proxy) -> None:
    """Janitor: retired pools close what came back idle and are forgotten once empty."""
    for pool in list(proxy.retired_pools):
        while pool.idle:
            pool.idle.popleft().close()
        if pool.total == 0 and not pool.waiters:
            proxy.retired_pools.discard(pool)
            proxy.counters.retired_waits += pool.waits
            proxy.counters.retired_wait_seconds += pool.wait_seconds
