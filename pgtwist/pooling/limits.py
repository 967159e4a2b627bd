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
        # Pools whose clients wait on a shared limit rather than on their own pool_size
        # (Pool._serve puts them here; yield_to takes out those no longer held). Empty unless
        # max_db_connections or max_user_connections is reached: then a pool that keeps its
        # connections busy hands them from client to client and never lets one go, and the
        # other pools under that limit would wait in vain (users sharing a database's limit).
        self.blocked: set = set()
        # Under workers = N, (this worker's number, N): each worker keeps its share of a limit
        # (worker_share), so that the node sees the limit, not N times it.
        self.part: tuple[int, int] | None = None

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
        database = pool.database
        db_limit, user_limit = self._limits_of(pool)
        if db_limit and not self._within(pool, db_limit, lambda p: p.database.name == database.name, evict):
            return False
        if user_limit and not self._within(pool, user_limit, lambda p: p.user == pool.user, evict):
            return False
        if reserve:
            # (Once per reserve connection: a sign pool_size is too small, as PgBouncer logs it.)
            log.info("pool {pool}: taking a connection from the reserve pool", pool=pool.key)
        return True

    def _limits_of(self, pool) -> tuple[int, int]:
        """*pool*'s max_db_connections and max_user_connections (0: none), as the config has them now."""
        config = self.config()
        user_entry = config.users.get(pool.user)
        user_limit = user_entry.max_user_connections if user_entry is not None else config.max_user_connections
        db_limit = getattr(pool.database, "max_db_connections", 0)
        part = self.part
        if part is not None:
            return worker_share(db_limit, *part), worker_share(user_limit, *part)
        return db_limit, user_limit

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

    def yield_to(self, pool):
        """*pool*'s client is done with a connection: the pool held by a shared limit that should
        have it instead (this one then closes it, to make room for that one's), or None.

        A fair share, as connections can pass between pools only by closing one and opening
        another (each pool logs in as its own user, to its own node): a held pool gets one
        when *pool* has two more than it does, so the shares even out and then stay; a held
        pool with none at all gets one in turns, when its oldest client has waited longer than
        *pool*'s oldest (a limit of 1 then serves the pools under it in turns).
        """
        held = None
        blocked = self.blocked
        now = None
        for other in list(blocked):
            if (
                other.paused
                or other.retired
                or other.total >= other.size
                or len(other.waiters) <= other.connecting + len(other.testing)
            ):
                blocked.discard(other)  # served, gone, or held by its own pool_size now
                continue
            if other is pool or not self._shares_limit(pool, other):
                continue
            mine, theirs = pool.total, other.total
            if now is None and (theirs == 0 or held is not None):
                now = self.clock.seconds()
            if not (mine > theirs + 1 or (theirs == 0 and mine >= 1 and _waited_longer(other, pool, now))):
                continue
            if held is not None and not _waited_longer(other, held, now):
                continue
            if self._room_after(other, pool):  # (else closing this one would open nothing there)
                held = other
        return held

    def _room_after(self, held, pool) -> bool:
        """Whether *held* could open a connection once *pool* has closed one: within its
        database's and its user's limits, counting one fewer of *pool*'s where it shares them.
        (A pool held by another limit too, say its user's elsewhere, would get nothing from it:
        *pool* would only close and open again, every transaction.)"""
        database = held.database
        db_limit, user_limit = self._limits_of(held)
        if db_limit:
            used = sum(p.total for p in self.pools() if p.database.name == database.name)
            if used - (pool.database.name == database.name) >= db_limit:
                return False
        if user_limit:
            used = sum(p.total for p in self.pools() if p.user == held.user)
            if used - (pool.user == held.user) >= user_limit:
                return False
        return True

    def _shares_limit(self, pool, other) -> bool:
        """Whether *pool* and *other* are under one max_db_connections or max_user_connections."""
        db_limit, user_limit = self._limits_of(pool)
        return bool((db_limit and pool.database.name == other.database.name) or (user_limit and pool.user == other.user))

    def describe(self, pool) -> str:
        """Which limit a client that waited in vain was held by (the DETAIL of its 53300)."""
        database = pool.database
        db_limit, user_limit = self._limits_of(pool)
        share = ", this worker's share" if self.part is not None else ""
        if db_limit and sum(p.total for p in self.pools() if p.database.name == database.name) >= db_limit:
            return f'database "{database.name}" has its max_db_connections ({db_limit}{share}) server connections, all in use'
        if user_limit and sum(p.total for p in self.pools() if p.user == pool.user) >= user_limit:
            return f'user "{pool.user}" has its max_user_connections ({user_limit}{share}) server connections, all in use'
        reserve = pool.settings.reserve
        extra = f" + reserve_pool_size {reserve}" if reserve else ""
        return f'all {pool.total} connections to node {pool.node} for user "{pool.user}" are in use (pool_size {pool.size}{extra})'

    # -- told by Pool.server_closed ----------------------------------------------------------

    def freed(self, pool) -> None:
        """A connection of *pool* is gone: pools waiting under the same database or user limit may open one."""
        for other in list(self.pools()):
            if other is not pool and other.waiters and (other.database.name == pool.database.name or other.user == pool.user):
                other.refresh()


def worker_share(limit: int, index: int, count: int) -> int:
    """Worker *index*'s part of a limit of *limit* connections (0: none) among *count* workers:
    the parts differ by at most one and add up to the limit, except that none is below one (a
    worker with no connection at all could serve none of the clients the kernel hands it)."""
    if not limit or count <= 1:
        return limit
    return max(1, limit // count + (1 if index < limit % count else 0))


def _waited_longer(pool, than, now: float) -> bool:
    """Whether *pool*'s oldest waiting client has waited longer than *than*'s (True if *than* has none)."""
    theirs = than.oldest_wait(now)
    return theirs is None or (pool.oldest_wait(now) or 0.0) > theirs
