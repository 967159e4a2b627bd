"""Operator actions on a running proxy: pause, resume, reconnect, disable, kill, set; shared by the manhole and the admin console."""

from __future__ import annotations

from dataclasses import fields, replace
from types import MappingProxyType

from twisted.internet import defer, task
from twisted.logger import Logger

from pgtwist import config as configmod
from pgtwist.wire import sqlstate

log = Logger()

ALL = "*"


class ActionError(Exception):
    """The action cannot be done as asked (unknown database or client...)."""


POLL = 0.05  # seconds between looks while PAUSE / WAIT_CLOSE wait (admin only: never on the hot path)


def _check_database(proxy, database: str | None) -> str:
    if database is None or database == ALL:
        return ALL
    if database not in proxy.config.databases:
        raise ActionError(f'no database "{database}"')
    return database


def pause(proxy, database: str | None = None) -> int:
    """Stop handing out server connections for *database* (every one when None); returns pools paused.

    Clients already linked carry on; the others wait (within query_wait_timeout) until RESUME.
    """
    name = _check_database(proxy, database)
    proxy.paused.add(name)
    count = 0
    for pool in list(proxy.pools.values()):
        if name == ALL or pool.database.name == name:
            pool.set_paused(True)
            count += 1
    log.info("paused {database} ({n} pool(s))", database=name, n=count)
    return count


def resume(proxy, database: str | None = None) -> int:
    """Undo pause(); waiting clients are served at once. Returns pools resumed."""
    name = _check_database(proxy, database)
    if name == ALL:
        proxy.paused.clear()
    else:
        proxy.paused.discard(name)
    count = 0
    for pool in list(proxy.pools.values()):
        if pool.paused and not is_paused(proxy, pool.database.name):
            pool.set_paused(False)
            count += 1
    log.info("resumed {database} ({n} pool(s))", database=name, n=count)
    return count


def is_paused(proxy, database: str) -> bool:
    return ALL in proxy.paused or database in proxy.paused


def kill(proxy, client_id: str) -> bool:
    """Disconnect one client with FATAL 57P01; False when there is no such client."""
    session = proxy.clients.get(client_id)
    if session is None:
        return False
    log.info("killing client {client} on administrator request", client=client_id)
    session.fatal(sqlstate.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
    return True


def _pools_of(proxy, name: str) -> list:
    pools = list(proxy.pools.values()) + list(getattr(proxy, "retired_pools", ()))
    return [p for p in pools if name == ALL or p.database.name == name]


def _wait_until(proxy, done, watcher=None) -> defer.Deferred:
    """Fires once done() is true (with True); looked at every POLL s with the proxy's clock.

    *watcher*: a callable that says whether anyone still waits (the admin client is connected);
    when it says no, the looking stops (and it fires with False).
    """
    if done():
        return defer.succeed(True)
    finished = defer.Deferred()
    seen = []

    def look():
        if done():
            seen.append(True)
            loop.stop()
        elif watcher is not None and not watcher():
            loop.stop()

    loop = task.LoopingCall(look)
    loop.clock = proxy.clock
    loop.start(POLL, now=False).addBoth(lambda _: finished.callback(bool(seen)) if not finished.called else None)
    return finished


def pause_and_wait(proxy, database: str | None = None, watcher=None) -> defer.Deferred:
    """PgBouncer's PAUSE: stop handing out server connections, wait until every one in use is given
    back (transaction pooling: its transaction ended; session pooling: its client left), then close
    them; fires once nothing of *database* is connected to a node."""
    name = _check_database(proxy, database)
    pause(proxy, name)
    return wait_paused(proxy, name, watcher)


def wait_paused(proxy, database: str | None = None, watcher=None) -> defer.Deferred:
    """The wait of PAUSE (pause_and_wait) without pausing: fires once *database* paused has no
    server connection left, or at once when it is not paused (RESUMEd meanwhile): under
    workers = N, what the worker PAUSE was given on asks the others (peers.PausedResource)."""
    name = _check_database(proxy, database)
    pools = _pools_of(proxy, name)

    def paused() -> bool:
        return ALL in proxy.paused if name == ALL else is_paused(proxy, name)

    def released() -> bool:
        if not paused():
            return True  # RESUMEd meanwhile (another admin session): nothing more to wait for or close
        for pool in pools:
            while pool.idle:
                pool.idle.popleft().close()
        return all(not pool.busy and not pool.connecting for pool in pools)

    def said(complete: bool) -> bool:
        if complete and paused():
            log.info("pause of {database} complete", database=name)
        return complete

    return _wait_until(proxy, released, watcher).addCallback(said)


def reconnect(proxy, database: str | None = None) -> int:
    """RECONNECT: close every server connection of *database* (all when None) as soon as its client
    is done with it (idle ones at once), so the next ones are opened afresh (new node address, new
    password...). Returns connections marked."""
    name = _check_database(proxy, database)
    count = 0
    for pool in _pools_of(proxy, name):
        for conn in list(pool.busy):
            conn.tainted = True  # released -> closed (pool.release), PgBouncer's close_needed
            count += 1
        while pool.idle:
            pool.idle.popleft().close()
            count += 1
        pool.reclaim_all()  # lent between transactions: back (and closed) now
    log.info("reconnect {database}: {n} server connection(s) to close", database=name, n=count)
    return count


def wait_close(proxy, database: str | None = None, watcher=None) -> defer.Deferred:
    """WAIT_CLOSE: fires once no server connection of *database* waits to be closed (RECONNECT, RELOAD)."""
    name = _check_database(proxy, database)

    def closed() -> bool:
        for pool in _pools_of(proxy, name):
            if getattr(pool, "retired", False) and pool.total:
                return False
            if any(conn.tainted for conn in pool.busy):
                return False
        return True

    return _wait_until(proxy, closed, watcher)


def disable(proxy, database: str) -> None:
    """DISABLE: new clients of *database* are refused (55000); those connected carry on."""
    name = _check_database(proxy, database)
    if name == ALL:
        raise ActionError("DISABLE needs a database")
    proxy.disabled.add(name)
    log.info("disabled {database}: new clients refused", database=name)


def enable(proxy, database: str) -> None:
    name = _check_database(proxy, database)
    if name == ALL:
        raise ActionError("ENABLE needs a database")
    proxy.disabled.discard(name)
    log.info("enabled {database}", database=name)


def kill_database(proxy, database: str) -> int:
    """KILL db (PgBouncer): drop every client and server connection of *database* now; new clients
    wait (PAUSE) until RESUME. Returns clients disconnected."""
    name = _check_database(proxy, database)
    pause(proxy, name)
    victims = [s for s in list(proxy.clients.values()) if s.database is not None and (name == ALL or s.database.name == name)]
    for session in victims:
        session.fatal(sqlstate.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
    for pool in _pools_of(proxy, name):
        for conn in list(pool.idle) + list(pool.busy):
            conn.close()
    log.info("killed {database}: {n} client(s) disconnected; paused until RESUME", database=name, n=len(victims))
    return len(victims)


# Settings SET may change: top-level scalars a reload applies (never one that names a secret).
_SECRET_WORDS = ("password", "secret", "key", "cert")


def settable(config) -> dict[str, type]:
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if type(value) not in (int, float, bool, str) or configmod.needs_restart(f.name) or f.name == "source":
            continue
        if any(word in f.name for word in _SECRET_WORDS):
            continue
        out[f.name] = type(value)
    return out


def _coerce(kind: type, text: str):
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1].replace("''", "'")
    if kind is bool:
        lowered = text.lower()
        if lowered in ("on", "true", "yes", "1"):
            return True
        if lowered in ("off", "false", "no", "0"):
            return False
        raise ValueError("must be on or off")
    if kind in (int, float):
        value = kind(text)
        if value < 0:
            raise ValueError("must not be negative")
        return value
    return text


def set_setting(proxy, key: str, text: str, service=None):
    """SET key = value: change one reloadable setting until the next RELOAD (which re-reads the file).

    Raises ActionError for a value that does not fit; KeyError for a key SET cannot change.
    """
    current = proxy.config
    kinds = settable(current)
    if key not in kinds:
        raise KeyError(key)
    try:
        value = _coerce(kinds[key], text)
    except ValueError as e:
        raise ActionError(f"invalid value for {key}: {e}") from None
    if key == "pool_size" and value < 1:
        raise ActionError(f"invalid value for {key}: at least 1")  # (as the config file's check: a pool of 0 serves nobody)
    choices = {"log_level": configmod.LOG_LEVELS, "log_format": configmod.LOG_FORMATS}.get(key)
    if choices is not None and value not in choices:
        raise ActionError(f"invalid value for {key}: one of {', '.join(choices)}")
    new = replace(current, **{key: value})
    if key in configmod.INHERITED:
        # The databases that took this setting from the top level take the new value too.
        databases = {name: replace(db, **{key: value}) if key in db.inherited else db for name, db in current.databases.items()}
        new = replace(new, databases=MappingProxyType(databases))
    changes = configmod.diff(current, new)
    proxy.apply_config(configmod.applicable(current, new), changes)
    if service is not None:
        service.config = proxy.config
    proxy.overrides.pop(key, None)  # (the latest last: a restarted worker takes them in this order)
    proxy.overrides[key] = text
    log.info("SET {key} = {value} (until the next reload)", key=key, value=value)
    return value


# -- what a restarted worker takes on ------------------------------------------------------------


def console_state(proxy) -> dict:
    """What the console changed here that the file does not say: the databases PAUSEd ("*": all;
    KILL db pauses too) and DISABLEd, and each SET since the file was last read, as typed. JSON.

    workers = N: a worker restarted by its supervisor asks a live one for this (workers.StateResource)
    and takes it on (take_state) before it serves, so that it does not serve what the operator
    paused or disabled on every worker, with settings the others no longer have.
    """
    return {"paused": sorted(proxy.paused), "disabled": sorted(proxy.disabled), "set": dict(proxy.overrides)}


def take_state(proxy, state: dict, service=None) -> tuple[list[str], list[str]]:
    """Do here what console_state() of another worker says was done there, by the console's own
    actions (each logs its line, as it does for the console). Returns (what was done, what could
    not be and why), one command each: what could not be names a database or takes a value this
    worker's file does not allow (the file changed, and the others have not reloaded it)."""
    taken, skipped = [], []
    paused, disabled, settings = state.get("paused", []), state.get("disabled", []), state.get("set", {})
    if not (_strings(paused) and _strings(disabled) and isinstance(settings, dict) and _strings(settings) and _strings(settings.values())):
        return [], [f"not a console state: {state!r:.200}"]
    steps = [(pause, name) for name in paused] + [(disable, name) for name in disabled]
    for action, name in steps:
        command = f"{action.__name__.upper()} {name}"
        try:
            action(proxy, name)
        except ActionError as e:
            skipped.append(f"{command}: {e}")
        else:
            taken.append(command)
    for key, text in settings.items():
        command = f"SET {key} = {text}"
        try:
            set_setting(proxy, key, text, service)
        except KeyError:
            skipped.append(f"{command}: not a setting SET changes")
        except ActionError as e:
            skipped.append(f"{command}: {e}")
        else:
            taken.append(command)
    return taken, skipped


def _strings(values) -> bool:
    return isinstance(values, (list, dict, type({}.values()))) and all(isinstance(v, str) for v in values)
