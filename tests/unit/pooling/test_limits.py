"""ConnectionLimits: max_db_connections and max_user_connections across pools, the reserve after
reserve_pool_timeout, and room made by closing another pool's idle connection (task.Clock, no I/O)."""

from dataclasses import dataclass, field

from twisted.internet import defer, task

from pgtwist.pooling.limits import ConnectionLimits
from pgtwist.pooling.pool import Pool, PoolSettings

from tests.harness.pool import FakeConn


@dataclass
class Db:
    name: str
    max_db_connections: int = 0
    reserve_pool_size: int = 0


@dataclass
class User:
    max_user_connections: int = 0


@dataclass
class Conf:
    users: dict = field(default_factory=dict)
    max_user_connections: int = 0
    reserve_pool_timeout: float = 5.0


class World:
    def __init__(self, conf=None):
        self.clock = task.Clock()
        self.conf = conf or Conf()
        self.pools = []
        self.limits = ConnectionLimits(lambda: self.pools, lambda: self.conf, self.clock)
        self.attempts = []  # (pool, Deferred)

    def pool(self, db, user, size=2, reserve=None):
        """A pool of *db* for *user*; its reserve is the database's reserve_pool_size unless given."""
        settings = PoolSettings(size, reserve=db.reserve_pool_size if reserve is None else reserve)
        pool = Pool((db.name, user, "n"), "n", db, user, settings, connect=self.connect, clock=self.clock)
        pool.limits = self.limits
        self.pools.append(pool)
        return pool

    def connect(self, pool):
        d = defer.Deferred()
        self.attempts.append((pool, d))
        return d

    def open_all(self):
        made = []
        for pool, d in self.attempts:
            if not d.called:
                conn = FakeConn(len(made))
                conn.pool = pool
                d.callback(conn)
                made.append(conn)
        return made


def acquire(pool):
    results = []
    pool.acquire().addBoth(results.append)
    return results


def test_max_db_connections_counts_every_pool_of_the_database():
    w = World()
    db = Db("db", max_db_connections=2)
    a, b = w.pool(db, "a"), w.pool(db, "b")
    acquire(a), acquire(a), acquire(b)
    assert (a.connecting, b.connecting) == (2, 0)  # b waits: the database has 2 already
    w.open_all()
    # a's client gives back its connection: it goes idle, then b takes its place.
    conn = next(iter(a.busy))
    a.release(conn, reusable=True, reset=False)
    assert conn in a.idle
    b.refresh()
    assert conn.closed and b.connecting == 1  # a's idle connection made room for b's client


def test_max_user_connections_counts_every_database_of_the_user():
    w = World(Conf(users={"u": User(1)}))
    a, b = w.pool(Db("one"), "u"), w.pool(Db("two"), "u")
    acquire(a), acquire(b)
    assert (a.connecting, b.connecting) == (1, 0)
    conn = w.open_all()[0]
    a.busy.discard(conn)
    a.server_closed(conn)  # gone: the user's waiting pool may open one now
    assert b.connecting == 1


def test_users_without_an_entry_get_the_global_max_user_connections():
    w = World(Conf(max_user_connections=1))
    a = w.pool(Db("db"), "looked-up", size=5)
    acquire(a), acquire(a)
    assert a.connecting == 1


def test_reserve_opens_after_reserve_pool_timeout_only():
    w = World(Conf(reserve_pool_timeout=5.0))
    pool = w.pool(Db("db", reserve_pool_size=1), "u", size=1)
    acquire(pool)
    w.open_all()
    waiting = acquire(pool)
    assert pool.connecting == 0 and waiting == []
    w.clock.advance(4.9)
    pool.refresh()
    assert pool.connecting == 0
    w.clock.advance(0.1)
    pool.refresh()  # (the janitor does this each tick for pools with waiters)
    assert pool.connecting == 1
    w.open_all()
    assert len(waiting) == 1 and pool.total == 2
    acquire(pool)
    w.clock.advance(60)
    pool.refresh()
    assert pool.connecting == 0  # pool_size + reserve_pool_size at most


def test_auth_querys_pool_never_takes_the_reserve():
    w = World(Conf(reserve_pool_timeout=5.0))
    pool = w.pool(Db("db", reserve_pool_size=1), "auth", size=1, reserve=0)  # (as Proxy._auth_pool makes it)
    acquire(pool)
    w.open_all()
    acquire(pool)
    w.clock.advance(60)
    pool.refresh()
    assert pool.connecting == 0 and pool.total == 1


def test_warm_connections_stay_within_the_limit_and_evict_nobody():
    w = World()
    db = Db("db", max_db_connections=1)
    a, b = w.pool(db, "a"), w.pool(db, "b")
    acquire(a)
    conn = w.open_all()[0]
    a.release(conn, reusable=True, reset=False)
    b.min_size = 1
    b.maintain()
    assert b.connecting == 0 and not conn.closed
