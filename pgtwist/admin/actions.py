"""Operator actions on a running proxy: pause, resume, kill; shared by the manhole and the admin console."""

from __future__ import annotations

from twisted.logger import Logger

from pgtwist.wire import sqlstate

log = Logger()

ALL = "*"


class ActionError(Exception):
    """The action cannot be done as asked (unknown database or client...)."""


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
