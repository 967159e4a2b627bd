"""server_check_query / server_check_delay: a connection idle that long is checked before reuse; a
failed check is invisible to the waiting client, who gets another connection (task.Clock, no I/O)."""

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from tests.harness.pool import Harness, got


def idle_one(h):
    """A pool with one idle connection, last used at the clock's time."""
    _, r = h.acquire()
    conn = h.open_next()
    h.pool.release(conn, reusable=True, reset=False)
    assert list(h.pool.idle) == [conn] and got(r) is conn
    return conn


def checked(size=2, delay=30.0):
    h = Harness(size=size, reset_query="", check_query="SELECT 1", check_delay=delay)
    return h


def test_fresh_connection_is_handed_out_without_a_check():
    h = checked()
    conn = idle_one(h)
    h.clock.advance(29)
    h.pool.flag_for_check(h.clock.seconds())
    assert h.pool.take_idle() is conn and conn.internal == []


def test_connection_idle_past_the_delay_is_checked_then_handed_out():
    h = checked()
    conn = idle_one(h)
    h.clock.advance(30)
    h.pool.flag_for_check(h.clock.seconds())
    assert h.pool.take_idle() is None  # (its check runs: the caller waits like any waiter)
    _, r = h.acquire()
    assert conn.internal[0][0] == ["SELECT 1"] and r == [] and len(h.attempts) == 1  # nothing new opened
    conn.internal[0][1].callback([])
    assert got(r) is conn
    h.pool.release(conn, reusable=True, reset=False)
    assert h.pool.take_idle() is conn and len(conn.internal) == 1  # checked once, fresh again


def test_a_dead_connection_is_dropped_and_another_one_serves_the_client():
    h = checked()
    conn = idle_one(h)
    h.clock.advance(31)
    h.pool.flag_for_check(h.clock.seconds())
    _, r = h.acquire()
    conn.internal[0][1].errback(Failure(ConnectionLost()))
    h.pool.server_closed(conn)
    assert r == [] and len(h.attempts) == 2  # a new connection is on its way
    fresh = h.open_next()
    assert got(r) is fresh and conn not in h.pool.idle and conn not in h.pool.busy


def test_a_check_that_errors_closes_the_connection():
    h = checked()
    conn = idle_one(h)
    h.clock.advance(31)
    h.pool.flag_for_check(h.clock.seconds())
    _, r = h.acquire()
    conn.internal[0][1].callback([{"M": "terminating connection"}])
    assert conn.closed and r == [] and len(h.attempts) == 2


def test_delay_zero_checks_every_reuse_and_empty_query_never():
    h = checked(delay=0)
    conn = idle_one(h)  # (new: handed out unchecked)
    h.clock.advance(0.001)
    conn.last_used = h.clock.seconds()  # (as ServerConnection keeps it when a client is done)
    assert h.pool.take_idle() is None and len(conn.internal) == 1
    h2 = Harness(reset_query="", check_query="")
    conn2 = idle_one(h2)
    h2.clock.advance(1000)
    h2.pool.flag_for_check(h2.clock.seconds())
    assert h2.pool.take_idle() is conn2


# -- SHOW POOLS' sv_used / sv_tested (Pool.server_counts): disjoint, as PgBouncer's lists ------------


def test_server_counts_show_idle_used_tested_and_active_apart():
    h = checked(size=3)
    conn = idle_one(h)
    assert h.pool.server_counts(h.clock.seconds()) == {"active": 0, "idle": 1, "used": 0, "tested": 0, "being_canceled": 0}
    h.clock.advance(30)  # idle past server_check_delay: used, even before the janitor flags it
    assert h.pool.server_counts(h.clock.seconds()) == {"active": 0, "idle": 0, "used": 1, "tested": 0, "being_canceled": 0}
    h.pool.flag_for_check(h.clock.seconds())  # (the janitor's tick)
    _, r = h.acquire()  # its check runs now
    assert h.pool.server_counts(h.clock.seconds()) == {"active": 0, "idle": 0, "used": 0, "tested": 1, "being_canceled": 0}
    conn.internal[0][1].callback([])
    assert got(r) is conn
    assert h.pool.server_counts(h.clock.seconds()) == {"active": 1, "idle": 0, "used": 0, "tested": 0, "being_canceled": 0}


def test_a_connection_lent_between_transactions_counts_as_idle_until_reclaimed():
    # Transaction pooling: an idle client keeps its connection until someone needs it. A
    # dashboard reading sv_idle 0 / sv_active = pool_size would see a full pool that is not.
    class Borrower:
        def reclaim(self, conn):
            h.pool.release(conn, reusable=True, reset=False)

    h = Harness(size=2, reset_query="", check_query="")
    _, r = h.acquire()
    conn = h.open_next()
    assert got(r) is conn
    assert h.pool.server_counts(h.clock.seconds())["active"] == 1
    h.pool.lend(conn, Borrower())
    assert h.pool.server_counts(h.clock.seconds()) == {"active": 0, "idle": 1, "used": 0, "tested": 0, "being_canceled": 0}
    assert h.pool.take_idle() is conn  # reclaimed from its borrower for the newcomer
    assert h.pool.server_counts(h.clock.seconds()) == {"active": 1, "idle": 0, "used": 0, "tested": 0, "being_canceled": 0}


def test_a_reset_counts_as_tested_and_no_check_query_means_never_used():
    h = Harness(size=2, reset_query="DISCARD ALL", check_query="")
    _, r = h.acquire()
    conn = h.open_next()
    assert got(r) is conn
    h.pool.release(conn, reusable=True)
    assert conn.internal[0][0] == ["DISCARD ALL"]
    assert h.pool.server_counts(h.clock.seconds()) == {"active": 0, "idle": 0, "used": 0, "tested": 1, "being_canceled": 0}
    conn.internal[0][1].callback([])
    h.clock.advance(10_000)
    assert h.pool.server_counts(h.clock.seconds()) == {"active": 0, "idle": 1, "used": 0, "tested": 0, "being_canceled": 0}


def test_a_reset_lost_with_its_connection_is_not_counted():
    h = Harness(size=2, reset_query="DISCARD ALL")
    _, r = h.acquire()
    conn = h.open_next()
    h.pool.release(got(r), reusable=True)
    conn.internal[0][1].errback(Failure(ConnectionLost()))
    h.pool.server_closed(conn)
    assert h.pool.server_counts(h.clock.seconds()) == {"active": 0, "idle": 0, "used": 0, "tested": 0, "being_canceled": 0}


def test_delay_zero_counts_every_reused_idle_connection_as_used():
    h = checked(delay=0)
    conn = idle_one(h)
    assert h.pool.server_counts(h.clock.seconds())["used"] == 0  # (new: handed out unchecked)
    h.clock.advance(0.001)
    conn.last_used = h.clock.seconds()
    assert h.pool.server_counts(h.clock.seconds())["used"] == 1


def test_a_connection_given_back_to_a_waiting_client_is_checked_first_when_the_delay_is_zero():
    # The handoff straight to a waiter (clients outnumber connections) skips the idle list, not the check.
    h = checked(size=1, delay=0.0)
    _, first = h.acquire()
    conn = h.open_next()
    assert got(first) is conn
    _, second = h.acquire()  # waits: the pool is full
    h.clock.advance(1)
    h.pool.release(conn, reusable=True, reset=False)
    assert second == [] and conn.internal[-1][0] == ["SELECT 1"]
    conn.internal[-1][1].callback([])
    assert got(second) is conn


def test_a_connection_given_back_to_a_waiting_client_goes_straight_to_it_without_a_check():
    h = checked(size=1, delay=30.0)
    _, first = h.acquire()
    conn = h.open_next()
    assert got(first) is conn
    _, second = h.acquire()
    h.pool.release(conn, reusable=True, reset=False)
    assert got(second) is conn and conn.internal == [] and list(h.pool.idle) == []
