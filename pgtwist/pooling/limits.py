"""Limits across pools: max_db_connections, max_user_connections, and the reserve (reserve_pool_size after reserve_pool_timeout)."""

from __future__ import annotations

from typing import Callable, Iterable

from twisted.logger import Logger

log = Logger()


class ConnectionLimits:
    """Asked by a pool before it opens a server connection; told when one of a pool's closes.

    *pools* returns every pool that holds server connections (retired ones too: their
    connections are still open on the node). *config* returns the running config, so a reload
    applies at once. Counting walks the pools, but only when a connection is about to be
    opened or has closed: never per transaction.
    """

    def __init__(self, pools: Callable[[], Iterable], config: Callable[[], object], clock):
        self.pools = pools
        self.config = config
        self.clock = clock

    # -- asked by Pool._room ----------------------------------------------------------------

    def may_open(self, pool, evict: bool = True) -> bool:
        """Room for one more connection in *pool*: within pool_size (or its reserve, once its oldest
        client waited reserve_pool_timeout), and within its database's and its user's limits.

        At a database or user limit, an idle connection of another pool under the same limit is
        closed to make room: a client waiting behind it would otherwise wait for server_idle_timeout.
        """
        reserve = pool.total >= pool.size
        if reserve and not self._reserve_open(pool):
            return False
        config = self.config()
        database = pool.database
        db_limit = getattr(database, "max_db_connections", 0)
        user_entry = config.users.get(pool.user)
        user_limit = user_entry.max_user_connections if user_entry is not None else config.max_user_connections
        if db_limit and not self._within(pool, db_limit, lambda p: p.database.name == database.name, evict):
            return False
        if user_limit and not self._within(pool, user_limit, lambda p: p.user == pool.user, evict):
            return False
        if reserve:
            # (Once per reserve connection: a sign pool_size is too small, as PgBouncer logs it.)
            log.info("pool {pool}: taking a connection from the reserve pool", pool=pool.key)
        return True

    def _reserve_open(self, pool) -> bool:
        reserve = pool.settings.reserve
        if not reserve or pool.total >= pool.size + reserve:
            return False
        waited = pool.oldest_wait(self.clock.seconds())
        return waited is not None and waited >= self.config().reserve_pool_timeout

    def _within(self, pool, limit: int, same, evict: bool) -> bool:
        peers = [p for p in self.pools() if same(p)]
        if sum(p.total for p in peers) < limit:
            return True
        for other in peers if evict else ():
            if other is not pool and other.close_one_idle():
                return True
        return False

    def describe(self, pool) -> str:
        """Which limit a client that waited in vain was held by (the DETAIL of its 53300)."""
        config = self.config()
        database = pool.database
        db_limit = getattr(database, "max_db_connections", 0)
        if db_limit and sum(p.total for p in self.pools() if p.database.name == database.name) >= db_limit:
            return f'database "{database.name}" has its max_db_connections ({db_limit}) server connections, all in use'
        user_entry = config.users.get(pool.user)
        user_limit = user_entry.max_user_connections if user_entry is not None else config.max_user_connections
        if user_limit and sum(p.total for p in self.pools() if p.user == pool.user) >= user_limit:
            return f'user "{pool.user}" has its max_user_connections ({user_limit}) server connections, all in use'
        reserve = pool.settings.reserve
        extra = f" + reserve_pool_size {reserve}" if reserve else ""
        return f'all {pool.total} connections to node {pool.node} for user "{pool.user}" are in use (pool_size {pool.size}{extra})'

    # -- told by Pool.server_closed ----------------------------------------------------------

    def freed(self, pool) -> None:
        """A connection of *pool* is gone: pools waiting under the same database or user limit may open one."""
        for other in list(self.pools()):
            if other is not pool and other.waiters and (other.database.name == pool.database.name or other.user == pool.user):
                other.refresh()
