"""ConnectionLimits: max_db_connections and max_user_connections across pools, the reserve after
reserve_pool_timeout, and room made by closing another pool's idle connection (task.Clock, no I/O)."""

from dataclasses import dataclass, field, replace

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
    # a's client gives back a connection none of a's clients waits for: b's client, held by the
    # database's limit, gets its place at once (a fair share: ConnectionLimits.yield_to).
    conn = next(iter(a.busy))
    a.release(conn, reusable=True, reset=False)
    assert conn.closed and b.connecting == 1 and a.yielded == 1


def test_a_client_arriving_at_the_limit_closes_another_pools_idle_connection():
    w = World()
    db = Db("db", max_db_connections=2)
    a, b = w.pool(db, "a"), w.pool(db, "b")
    acquire(a), acquire(a)
    w.open_all()
    conn = next(iter(a.busy))
    a.release(conn, reusable=True, reset=False)
    assert conn in a.idle  # (nobody is held by the limit yet)
    acquire(b)
    assert conn.closed and b.connecting == 1  # a's idle connection made room for b's client


def busy_pool_and_held_pool(limit, size=4, a_clients=6, b_clients=2):
    """Pool a fills the database's limit and has clients waiting; pool b's clients wait on the limit."""
    w = World()
    db = Db("db", max_db_connections=limit)
    a, b = w.pool(db, "a", size=size), w.pool(db, "b", size=size)
    for _ in range(a_clients):
        acquire(a)
    w.open_all()
    w.clock.advance(1)
    for _ in range(b_clients):
        acquire(b)
    assert b.connecting == 0 and b in w.limits.blocked
    return w, a, b


def test_a_pool_busy_with_its_own_clients_lets_a_held_pool_have_a_fair_share():
    # Users sharing a database's max_db_connections: the pool that filled it hands each connection
    # from client to client and never lets one go idle, so the other's clients waited until
    # query_wait_timeout (PgBouncer 1.18 serves both). Shares now even out, then stay.
    w, a, b = busy_pool_and_held_pool(limit=4)
    first, second, third = list(a.busy)[:3]
    a.release(first, reusable=True, reset=False)  # a 4, b 0: a lets this one go
    assert first.closed and b.connecting == 1
    a.release(second, reusable=True, reset=False)  # a 3, b 1: and this one
    assert second.closed and b.connecting == 2
    a.release(third, reusable=True, reset=False)  # a 2, b 2: even, a's own waiter takes it
    assert not third.closed and third in a.busy and b.connecting == 2
    assert a.yielded == 2
    w.open_all()
    assert (a.total, b.total) == (2, 2)


def test_a_limit_of_one_serves_the_pools_in_turns_oldest_waiter_first():
    w, a, b = busy_pool_and_held_pool(limit=1, a_clients=1, b_clients=1)
    w.clock.advance(1)
    acquire(a)  # b's client has waited since before this one
    (conn,) = a.busy
    a.release(conn, reusable=True, reset=False)  # b's client waited longer than a's: b's turn
    assert conn.closed and b.connecting == 1
    w.open_all()
    (theirs,) = b.busy
    w.clock.advance(1)
    acquire(b)  # a's client has waited since before this one
    b.release(theirs, reusable=True, reset=False)
    assert theirs.closed and a.connecting == 1


def test_pools_under_no_shared_limit_never_yield():
    w = World()
    a, b = w.pool(Db("one", max_db_connections=1), "u"), w.pool(Db("two", max_db_connections=1), "u")
    acquire(a), acquire(a)
    w.open_all()
    acquire(b)
    w.open_all()
    (conn,) = a.busy
    a.release(conn, reusable=True, reset=False)
    assert not conn.closed and a.yielded == 0


def test_a_held_pool_leaves_the_list_once_served_and_hand_over_defers_to_it():
    class Waiter:
        def takes_as_is(self, conn):
            return True

        def take_over(self, conn):
            self.took = conn

    w, a, b = busy_pool_and_held_pool(limit=2, size=2, a_clients=2, b_clients=1)
    waiter = Waiter()
    a.wait_for(waiter)
    conn = next(iter(a.busy))
    assert a.hand_over(conn) is False  # (its release() lets it go, for b)
    a.release(conn, reusable=True, reset=False)
    assert conn.closed and b.connecting == 1
    w.open_all()
    assert w.limits.yield_to(a) is None and b not in w.limits.blocked
    other = next(iter(a.busy))
    assert a.hand_over(other) is True and waiter.took is other


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
    b.settings = replace(b.settings, min_size=1)  # (min_pool_size: the pool's settings)
    b.maintain()
    assert b.connecting == 0 and not conn.closed


def test_no_yield_to_a_pool_another_limit_still_holds():
    # u/one waits on database one's limit (filled by user v); u/two shares only u's user limit
    # with it. Closing u/two's connections would open nothing for u/one: u/two only closed and
    # opened again, at every transaction (a review found it).
    w = World(Conf(users={"u": User(10)}))
    one, two = Db("one", max_db_connections=1), Db("two")
    v1 = w.pool(one, "v", size=4)
    acquire(v1)
    w.open_all()
    u2 = w.pool(two, "u", size=4)
    for _ in range(8):
        acquire(u2)
    w.open_all()
    u1 = w.pool(one, "u", size=4)
    w.clock.advance(1)
    acquire(u1)
    assert u1 in w.limits.blocked and u1.connecting == 0
    for _ in range(5):
        conn = next(iter(u2.busy))
        u2.release(conn, reusable=True, reset=False)
        assert not conn.closed and w.open_all() == []
    assert u2.yielded == 0 and u1.total == 0


def test_under_workers_each_keeps_its_share_of_a_limit():
    # Each worker has pools of its own: with the whole limit each, the node saw N times it.
    from pgtwist.pooling.limits import worker_share

    assert [worker_share(10, i, 4) for i in range(4)] == [3, 3, 2, 2]
    assert [worker_share(8, i, 2) for i in range(2)] == [4, 4]
    assert [worker_share(2, i, 3) for i in range(3)] == [1, 1, 1]  # (none without a connection)
    assert worker_share(0, 1, 4) == 0 and worker_share(7, 0, 1) == 7
    w = World(Conf(users={"a": User(max_user_connections=5)}))
    w.limits.part = (1, 2)
    db = Db("db", max_db_connections=4)
    a = w.pool(db, "a", size=10)
    for _ in range(6):
        acquire(a)
    assert a.connecting == 2  # this worker's half of the database's 4
    assert "max_db_connections (2, this worker's share)" in w.limits.describe(a)
    db.max_db_connections = 0
    a.refresh()
    assert a.connecting == 2  # the user's 5: worker 1 of 2 has 2
