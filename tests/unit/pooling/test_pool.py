"""Pool: idle first, bounded opening, FIFO waiters, timeouts, cancellation, reset on release."""

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from pgtwist.backend.login import ServerLoginError
from pgtwist.pooling.pool import Pool, PoolError, PoolSettings
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate

from tests.harness.pool import FakeConn, Harness, got


def test_opens_a_connection_for_a_waiter_and_hands_it_over():
    h = Harness()
    d, r = h.acquire()
    assert len(h.attempts) == 1 and h.pool.connecting == 1 and r == []
    conn = h.open_next()
    assert got(r) is conn
    assert conn in h.pool.busy and not h.pool.idle and h.pool.connecting == 0
    assert h.pool.total == 1


def test_idle_is_handed_out_first():
    h = Harness()
    _, r1 = h.acquire()
    conn = h.open_next()
    h.pool.release(conn, reusable=True)
    conn.internal[0][1].callback([])
    assert list(h.pool.idle) == [conn]
    _, r2 = h.acquire()
    assert got(r2) is conn
    assert len(h.attempts) == 1  # no new connection was opened


def test_opens_up_to_size_then_waiters_queue():
    h = Harness(size=2)
    waits = [h.acquire() for _ in range(4)]
    assert len(h.attempts) == 2 and h.pool.connecting == 2
    assert len(h.pool.waiters) == 4
    c1 = h.open_next()
    c2 = h.open_next()
    assert got(waits[0][1]) is c1 and got(waits[1][1]) is c2
    assert waits[2][1] == [] and waits[3][1] == []
    assert len(h.attempts) == 2
    assert h.pool.total == 2


def test_opens_only_as_many_as_there_are_waiters():
    h = Harness(size=5)
    h.acquire()
    h.acquire()
    assert len(h.attempts) == 2


def test_waiters_served_in_fifo_order():
    h = Harness(size=1, reset_query="")
    waits = [h.acquire() for _ in range(4)]
    conn = h.open_next()
    order = []
    for i, (_, r) in enumerate(waits):
        assert got(r) is conn
        order.append(i)
        if i < 3:
            assert all(rr == [] for _, rr in waits[i + 1 :])
            h.pool.release(conn, reusable=True)  # no reset query: straight back
    assert order == [0, 1, 2, 3]


def test_connection_that_opens_late_goes_to_the_oldest_waiter():
    h = Harness(size=2)
    (_, r1), (_, r2) = h.acquire(), h.acquire()
    conn = h.open_next(index=1)  # the second attempt finishes first
    assert got(r1) is conn and r2 == []


def test_wait_timeout_after_exactly_wait_timeout():
    h = Harness(size=1, wait_timeout=10.0)
    _, r1 = h.acquire()
    h.open_next()
    d2, r2 = h.acquire()
    h.clock.advance(9.999)
    assert r2 == []
    h.clock.advance(0.001)
    failure = got(r2)
    assert isinstance(failure, Failure) and failure.check(PoolError)
    e = failure.value
    assert e.sqlstate == sqlstate.TOO_MANY_CONNECTIONS == "53300"
    assert "10 s" in e.message and '"db"' in e.message
    assert "pool_size" in e.detail
    assert d2 not in h.pool.waiters
    assert h.clock.getDelayedCalls() == []


def test_wait_timeout_also_covers_a_slow_connect():
    h = Harness(size=1, wait_timeout=5.0)
    _, r = h.acquire()
    h.clock.advance(5)
    assert got(r).check(PoolError)
    # The connection still opens and is kept for the next client.
    conn = h.open_next()
    assert list(h.pool.idle) == [conn]


def test_a_served_waiter_is_never_timed_out_and_the_timer_lapses():
    h = Harness(wait_timeout=10.0)
    _, r = h.acquire()
    conn = h.open_next()
    assert got(r) is conn
    h.clock.advance(10)  # the pool's one timer fires, finds nobody waiting, and is not re-armed
    assert got(r) is conn and h.clock.getDelayedCalls() == []


def test_one_timer_per_pool_however_many_wait():
    """Waiters share one timer, due when the oldest one is; a handoff touches no timer at all."""
    h = Harness(size=1, wait_timeout=10.0)
    _, r1 = h.acquire()
    conn = h.open_next()
    waits = []
    for _ in range(50):
        waits.append(h.acquire()[1])
        h.clock.advance(0.1)
    assert len(h.clock.getDelayedCalls()) == 1
    h.pool.release(conn, reusable=True, reset=False)  # handed to the oldest waiter
    assert got(waits[0]) is conn and len(h.clock.getDelayedCalls()) == 1
    h.clock.advance(5.35)  # now 10.35 s: those that came at 0.1, 0.2 and 0.3 s have waited 10 s
    failed = [w for w in waits if w and isinstance(got(w), Failure)]
    assert failed == waits[1:4] and all(got(w).check(PoolError) for w in failed)
    assert not any(waits[4:]) and len(h.clock.getDelayedCalls()) == 1
    h.clock.advance(10)
    assert all(w for w in waits) and h.pool.waiters == type(h.pool.waiters)() and h.clock.getDelayedCalls() == []


class Waiter:
    """A waiter object, as a ClientSession is: the pool calls it, no Deferred in between."""

    def __init__(self):
        self.got = []

    def server_ready(self, conn):
        self.got.append(conn)

    def server_unavailable(self, failure):
        self.got.append(failure)


def test_waiter_objects_are_served_in_turn_with_deferreds():
    h = Harness(size=1, wait_timeout=5.0)
    _, r1 = h.acquire()
    conn = h.open_next()
    w = Waiter()
    h.pool.wait_for(w)
    _, r3 = h.acquire()
    h.pool.release(conn, reusable=True, reset=False)
    assert w.got == [conn] and not r3
    h.clock.advance(5)
    assert isinstance(got(r3), Failure) and got(r3).check(PoolError)
    w2 = Waiter()
    h.pool.wait_for(w2)
    h.pool.cancel_wait(w2)  # its client left
    h.pool.release(conn, reusable=True, reset=False)
    assert w2.got == [] and list(h.pool.idle) == [conn]


def test_no_timer_when_wait_timeout_is_zero():
    h = Harness(size=1, wait_timeout=0)
    h.acquire()
    _, r = h.acquire()
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(1e6)
    assert r == []


def test_cancelling_a_waiter_removes_it():
    h = Harness(size=1)
    _, r1 = h.acquire()
    conn = h.open_next()
    d2, r2 = h.acquire()
    _, r3 = h.acquire()
    d2.cancel()
    assert got(r2).check(defer.CancelledError)
    assert d2 not in h.pool.waiters and len(h.pool.waiters) == 1
    assert len(h.clock.getDelayedCalls()) == 1  # only the third waiter's timer remains
    h.pool.release(conn, reusable=True)
    conn.internal[0][1].callback([])
    assert got(r3) is conn


def test_cancelling_while_connecting_keeps_the_connection():
    h = Harness(size=1)
    d, r = h.acquire()
    d.cancel()
    assert got(r).check(defer.CancelledError)
    conn = h.open_next()
    assert list(h.pool.idle) == [conn] and h.pool.connecting == 0


def test_connect_failure_errbacks_oldest_waiter_only_and_retries_for_the_next():
    h = Harness(size=1)
    (_, r1), (_, r2) = h.acquire(), h.acquire()
    assert len(h.attempts) == 1
    error = ServerLoginError(sqlstate.CONNECTION_FAILURE, "could not connect")
    h.attempts[0].errback(error)
    assert got(r1).value is error
    assert r2 == []
    assert len(h.attempts) == 2  # a fresh attempt for the next waiter
    conn = h.open_next()
    assert got(r2) is conn


def test_connect_failure_with_nobody_waiting_is_logged_not_raised():
    h = Harness(size=1)
    d, r = h.acquire()
    d.cancel()
    h.attempts[0].errback(RuntimeError("refused"))
    assert h.pool.connecting == 0 and h.pool.total == 0
    assert len(h.attempts) == 1


def test_connect_failures_with_several_attempts():
    h = Harness(size=2)
    waits = [h.acquire() for _ in range(3)]
    h.attempts[1].errback(RuntimeError("second failed"))
    assert got(waits[0][1]).check(RuntimeError)
    assert waits[1][1] == [] and waits[2][1] == []
    assert len(h.attempts) == 3 and h.pool.connecting == 2
    c = h.open_next(index=0)
    assert got(waits[1][1]) is c


def test_release_runs_reset_query_then_idles():
    h = Harness()
    _, r = h.acquire()
    conn = h.open_next()
    h.clock.advance(42)
    h.pool.release(conn, reusable=True)
    assert [q for q, _ in conn.internal] == [["DISCARD ALL"]]
    assert conn in h.pool.busy and not h.pool.idle  # busy until the reset ends
    conn.internal[0][1].callback([])
    assert list(h.pool.idle) == [conn] and not h.pool.busy
    assert conn.last_used == 42
    assert not conn.closed


@pytest.mark.parametrize(
    "reset_query, tx_status, runs",
    [
        ("DISCARD ALL", p.TX_FAILED, [["ROLLBACK", "DISCARD ALL"]]),
        ("DISCARD ALL", p.TX_IN_TRANSACTION, [["ROLLBACK", "DISCARD ALL"]]),
        ("", p.TX_IN_TRANSACTION, [["ROLLBACK"]]),
        ("", p.TX_FAILED, [["ROLLBACK"]]),
        ("", p.TX_IDLE, []),
    ],
    ids=["failed-tx-then-reset", "open-tx-then-reset", "open-tx-no-reset", "failed-tx-no-reset", "nothing-to-run"],
)
def test_release_runs_a_rollback_if_in_a_transaction_then_the_reset_query(reset_query, tx_status, runs):
    h = Harness(reset_query=reset_query)
    h.acquire()
    conn = h.open_next()
    conn.tx_status = tx_status
    h.pool.release(conn, reusable=True)
    assert [q for q, _ in conn.internal] == runs
    if runs:
        assert not h.pool.idle  # busy until what runs has ended
        conn.tx_status = p.TX_IDLE
        conn.internal[0][1].callback([])
    assert list(h.pool.idle) == [conn] and not conn.closed


def test_release_hands_reset_connection_to_next_waiter():
    h = Harness(size=1)
    _, r1 = h.acquire()
    conn = h.open_next()
    _, r2 = h.acquire()
    h.pool.release(conn, reusable=True)
    assert r2 == []
    conn.internal[0][1].callback([])
    assert got(r2) is conn
    assert conn in h.pool.busy and not h.pool.idle


def test_failed_reset_closes_the_connection_and_opens_another():
    h = Harness(size=1)
    h.acquire()
    conn = h.open_next()
    _, r2 = h.acquire()
    h.pool.release(conn, reusable=True)
    conn.internal[0][1].callback([{"C": "25P02", "M": "nope"}])
    assert conn.closed and h.pool.total == 1 and h.pool.connecting == 1
    c2 = h.open_next()
    assert got(r2) is c2


def test_reset_leaving_a_transaction_open_closes_the_connection():
    h = Harness(size=1)
    h.acquire()
    conn = h.open_next()
    h.pool.release(conn, reusable=True)
    conn.tx_status = p.TX_IN_TRANSACTION
    conn.internal[0][1].callback([])
    assert conn.closed and h.pool.total == 0


def test_reset_interrupted_by_connection_loss_frees_the_slot():
    h = Harness(size=1)
    h.acquire()
    conn = h.open_next()
    _, r2 = h.acquire()
    h.pool.release(conn, reusable=True)
    conn.internal[0][1].errback(ConnectionError("gone"))
    h.pool.server_closed(conn)
    assert conn not in h.pool.busy and conn not in h.pool.idle
    assert len(h.attempts) == 2
    c = h.open_next()
    assert got(r2) is c


def test_release_not_reusable_closes_and_a_waiter_gets_a_new_connection():
    h = Harness(size=1)
    h.acquire()
    conn = h.open_next()
    _, r2 = h.acquire()
    h.pool.release(conn, reusable=False)
    assert conn.closed and conn.internal == []
    assert conn not in h.pool.busy
    assert len(h.attempts) == 2
    c2 = h.open_next()
    assert got(r2) is c2 and c2 is not conn


def test_release_of_connection_not_idle_closes_it():
    h = Harness()
    h.acquire()
    conn = h.open_next()
    conn.state = "linked"
    h.pool.release(conn, reusable=True)
    assert conn.closed and conn.internal == []


def test_release_of_unknown_connection_is_ignored():
    h = Harness()
    stranger = FakeConn(99)
    h.pool.release(stranger, reusable=False)
    assert not stranger.closed


def test_double_release_is_ignored():
    h = Harness(reset_query="")
    h.acquire()
    conn = h.open_next()
    h.pool.release(conn, reusable=True)
    h.pool.release(conn, reusable=False)
    assert list(h.pool.idle) == [conn] and not conn.closed


def test_server_closed_frees_a_busy_slot():
    h = Harness(size=1)
    h.acquire()
    conn = h.open_next()
    _, r2 = h.acquire()
    h.pool.server_closed(conn)
    assert h.pool.total == 1 and h.pool.connecting == 1
    c = h.open_next()
    assert got(r2) is c


def test_server_closed_removes_an_idle_connection():
    h = Harness(reset_query="")
    h.acquire()
    conn = h.open_next()
    h.pool.release(conn, reusable=True)
    h.pool.server_closed(conn)
    assert not h.pool.idle and h.pool.total == 0
    _, r = h.acquire()
    assert len(h.attempts) == 2


def test_close_all_closes_connections_and_fails_waiters():
    h = Harness(size=2, reset_query="")
    h.acquire()
    h.acquire()
    busy = h.open_next()
    idle = h.open_next()
    h.pool.release(idle, reusable=True)
    _, r1 = h.acquire()  # gets idle
    assert got(r1) is idle
    _, r2 = h.acquire()  # waits
    h.pool.close_all()
    assert busy.closed and idle.closed
    assert got(r2).value.sqlstate == sqlstate.ADMIN_SHUTDOWN
    assert h.clock.getDelayedCalls() == []


def test_repr_mentions_counts():
    h = Harness()
    h.acquire()
    assert "connecting=1" in repr(h.pool) and "waiting=1" in repr(h.pool)


def test_synchronous_connect_works():
    """A connect() whose Deferred has already fired (e.g. a cached failure) must not confuse the counts."""
    clock = task.Clock()
    made = []

    def connect(pool):
        conn = FakeConn(len(made) + 1)
        made.append(conn)
        return defer.succeed(conn)

    pool = Pool("k", "n", "db", "u", PoolSettings(2, wait_timeout=1), connect=connect, clock=clock)
    r = []
    pool.acquire().addBoth(r.append)
    assert r == made and pool.connecting == 0 and pool.total == 1

    def fail(pool):
        return defer.fail(RuntimeError("no"))

    pool2 = Pool("k", "n", "db", "u", PoolSettings(2, wait_timeout=1), connect=fail, clock=clock)
    r2 = []
    pool2.acquire().addBoth(r2.append)
    assert got(r2).check(RuntimeError) and pool2.connecting == 0 and not pool2.waiters


@pytest.mark.parametrize("size", [1, 3])
def test_many_waiters_all_served_in_order(size):
    h = Harness(size=size, reset_query="")
    waits = [h.acquire()[1] for _ in range(10)]
    conns = {id(h.open_next()) for _ in range(size)}
    released = 0
    while released < 10:
        served = [i for i, r in enumerate(waits) if r]
        # Always the oldest waiters hold the connections.
        assert served == list(range(min(released + size, 10)))
        h.pool.release(waits[released][0], reusable=True)
        released += 1
    assert len(h.attempts) == size and {id(r[0]) for r in waits} == conns


# -- transaction pooling's release, lifetime, idle timeout, warm connections -----------------


def test_release_without_reset_keeps_the_session_and_only_rolls_back():
    h = Harness()
    h.acquire()
    conn = h.open_next()
    conn.settings = {"application_name": "x"}
    h.pool.release(conn, reusable=True, reset=False)
    assert conn.internal == [] and list(h.pool.idle) == [conn]
    h.acquire()
    conn.tx_status = p.TX_IN_TRANSACTION
    h.pool.release(conn, reusable=True, reset=False)
    assert conn.internal[0][0] == ["ROLLBACK"]
    conn.tx_status = p.TX_IDLE
    conn.internal[0][1].callback([])
    assert conn.settings == {"application_name": "x"}  # not reset, so still what the node holds


def test_reset_forgets_settings_and_statements():
    h = Harness()
    h.acquire()
    conn = h.open_next()
    conn.settings = {"application_name": "x"}
    conn.statements = {"s1"}
    h.pool.release(conn, reusable=True)
    conn.internal[0][1].callback([])
    assert conn.settings == {} and conn.statements == set()


def test_tainted_connection_is_closed_on_release():
    h = Harness()
    h.acquire()
    conn = h.open_next()
    conn.tainted = True
    h.pool.release(conn, reusable=True)
    assert conn.closed and conn.internal == [] and h.pool.total == 0


def test_connection_past_its_lifetime_is_closed_on_release():
    h = Harness(lifetime=100.0)
    h.acquire()
    conn = h.open_next()
    h.clock.advance(100)
    h.pool.release(conn, reusable=True)
    assert conn.closed and h.pool.total == 0


def test_maintain_closes_idle_connections_past_idle_timeout_down_to_min_size():
    h = Harness(size=3, reset_query="", idle_timeout=60.0, min_size=1)
    for _ in range(3):
        h.acquire()
    conns = [h.open_next() for _ in range(3)]
    for c in conns:
        h.pool.release(c, reusable=True)
    h.clock.advance(59)
    h.pool.maintain()
    assert not any(c.closed for c in conns)
    h.clock.advance(1)
    h.pool.maintain()
    assert sum(c.closed for c in conns) == 2 and h.pool.total == 1


def test_maintain_closes_idle_connections_past_their_lifetime():
    h = Harness(reset_query="", lifetime=10.0, min_size=0)
    h.acquire()
    conn = h.open_next()
    h.pool.release(conn, reusable=True)
    h.clock.advance(10)
    h.pool.maintain()
    assert conn.closed and not h.pool.idle


def test_maintain_opens_warm_connections_up_to_min_size():
    h = Harness(size=2, min_size=5)
    h.pool.maintain()
    assert len(h.attempts) == 2 and h.pool.connecting == 2  # never beyond size
    h.pool.maintain()
    assert len(h.attempts) == 2
    c = h.open_next()
    assert list(h.pool.idle) == [c]


def test_failed_warm_connection_does_not_strand_a_waiter():
    h = Harness(size=2, min_size=1)
    h.pool.maintain()
    assert len(h.attempts) == 1
    _, r = h.acquire()  # counts on the warm connection under way
    h.attempts[0].errback(RuntimeError("node down"))
    assert h.pool.connecting == 1 and len(h.attempts) == 2  # a fresh attempt for the waiter
    c = h.open_next()
    assert got(r) is c


def test_a_warm_connection_that_keeps_failing_is_tried_again_less_and_less_often():
    # A database dropped under min_pool_size (or a node away, a login refused): an attempt and a
    # log line every janitor tick before.
    h = Harness(size=2, min_size=1)
    h.pool.maintain()
    h.attempts[0].errback(RuntimeError("database gone"))
    tried = []
    for second in range(1, 16):
        h.clock.advance(1)
        before = len(h.attempts)
        h.pool.maintain()
        if len(h.attempts) > before:
            tried.append(second)
            h.attempts[-1].errback(RuntimeError("database gone"))
    assert tried == [1, 3, 7, 15]  # (after 1, 2, 4, 8 s)
    h.clock.advance(16)
    h.pool.maintain()
    h.open_next()
    assert h.pool._warm_failures == 0  # (a success starts over)


def test_maintain_with_a_connect_that_fails_at_once_does_not_loop_forever():
    clock = task.Clock()
    calls = []

    def connect(pool):
        calls.append(1)
        if len(calls) > 10:
            raise AssertionError("maintain() keeps retrying within one tick")
        return defer.fail(RuntimeError("refused"))

    pool = Pool("k", "n", "db", "u", PoolSettings(3, wait_timeout=1, min_size=2), connect=connect, clock=clock)
    pool.maintain()
    assert len(calls) == 2 and pool.connecting == 0


# -- lending: a transaction-pooled client keeps its connection between transactions ---------


class Borrower:
    """Stands in for a ClientSession that keeps a connection between its transactions."""

    def __init__(self, pool, conn):
        self.pool, self.conn, self.reclaimed = pool, conn, 0

    def reclaim(self, conn):
        assert conn is self.conn
        self.reclaimed += 1
        self.pool.release(conn, reusable=True, reset=False)


def lent_connection(h):
    d, got = h.acquire()
    conn = h.open_next()
    assert got == [conn]
    borrower = Borrower(h.pool, conn)
    h.pool.lend(conn, borrower)
    return conn, borrower


def test_a_lent_connection_is_taken_back_for_a_newcomer_when_none_is_idle():
    h = Harness(size=1)
    conn, borrower = lent_connection(h)
    assert h.pool.take_idle() is conn  # reclaimed on the spot, no waiting, no new connection
    assert borrower.reclaimed == 1 and not h.pool.lent and conn in h.pool.busy
    assert len(h.attempts) == 1


def test_an_idle_connection_is_preferred_to_reclaiming():
    h = Harness(size=2)
    d, got = h.acquire()
    idle = h.open_next()
    conn, borrower = lent_connection(h)
    h.pool.release(idle, reusable=True, reset=False)
    assert h.pool.take_idle() is idle and borrower.reclaimed == 0


def test_a_waiter_is_served_by_reclaiming_rather_than_waiting_for_a_new_connection():
    h = Harness(size=2)
    conn, borrower = lent_connection(h)
    d, got = h.acquire()
    assert got == [conn] and borrower.reclaimed == 1
    assert len(h.attempts) == 1  # nothing opened: taking back is immediate


def test_release_and_close_forget_a_lent_connection():
    h = Harness(size=2)
    conn, borrower = lent_connection(h)
    h.pool.release(conn, reusable=True, reset=False)  # the client came back and then left
    assert not h.pool.lent and list(h.pool.idle) == [conn]
    h2 = Harness(size=1)
    conn2, _ = lent_connection(h2)
    h2.pool.server_closed(conn2)
    assert not h2.pool.lent and not h2.pool.busy


def test_pause_and_retire_take_lent_connections_back():
    h = Harness(size=1)
    conn, borrower = lent_connection(h)
    h.pool.set_paused(True)
    assert borrower.reclaimed == 1 and list(h.pool.idle) == [conn]
    h2 = Harness(size=1)
    conn2, borrower2 = lent_connection(h2)
    h2.pool.retire()
    assert borrower2.reclaimed == 1 and conn2.closed


def test_making_room_for_another_pool_takes_a_lent_connection_back_when_none_is_idle():
    """Under max_db_connections, a client of another pool (or an auth_query lookup) must not wait
    for an idle client's next transaction: its lent connection is idle on the node."""
    h = Harness(size=2)
    conn, borrower = lent_connection(h)
    assert h.pool.close_one_idle() is True
    assert borrower.reclaimed == 1 and conn.closed and not h.pool.lent and h.pool.total == 0
    assert h.pool.close_one_idle() is False  # nothing left to give


def test_waiters_are_remembered_only_while_they_wait():
    h = Harness(size=1, wait_timeout=10.0)
    _, r1 = h.acquire()
    h.clock.advance(1)
    d2, r2 = h.acquire()
    h.clock.advance(1)
    d3, r3 = h.acquire()
    assert h.pool.waiting_since() == [0.0, 1.0, 2.0]
    conn = h.open_next()  # the first is served
    assert got(r1) is conn and h.pool.waiting_since() == [1.0, 2.0]
    d3.cancel()  # the third gives up
    assert h.pool.waiting_since() == [1.0]
    h.clock.advance(10)  # the second times out
    assert isinstance(got(r2), Failure) and h.pool.waiting_since() == []
    assert h.pool._waits == {} and h.clock.getDelayedCalls() == []


# -- a reload lowers pool_size ---------------------------------------------------------------


def test_a_lower_pool_size_closes_idle_and_lent_connections_at_once_and_busy_ones_when_done():
    # PgBouncer's janitor closes "too many servers in the pool"; pgtwist kept them (handing them
    # from client to client under load) until server_idle_timeout, or for ever under load.
    from dataclasses import replace

    h = Harness(size=4, reset_query="")
    pool = h.pool
    conns = []
    for _ in range(4):
        h.acquire()
        conns.append(h.open_next())
    idle, lent, busy, kept = conns
    pool.release(idle, reusable=True, reset=False)
    borrower = Borrower(pool, lent)
    pool.lend(lent, borrower)
    pool.reconfigure("db", replace(pool.settings, size=2))
    assert idle.closed and lent.closed and borrower.reclaimed == 1  # nobody used them: closed now
    assert pool.total == 2 and not pool.shrinking
    assert not busy.closed and not kept.closed


def test_shrinking_closes_connections_in_use_as_their_clients_finish():
    from dataclasses import replace

    from tests.unit.pooling.test_pool_hand_over import Taker

    h = Harness(size=3, reset_query="")
    pool = h.pool
    first, second, third = [h.acquire() and h.open_next() for _ in range(3)]
    taker = Taker(pool)
    pool.wait_for(taker)
    pool.reconfigure("db", replace(pool.settings, size=1))
    assert pool.shrinking and pool.total == 3
    assert pool.hand_over(first) is False  # not handed on while over the size: release() decides
    pool.release(first, reusable=True, reset=False)
    assert first.closed and pool.total == 2 and pool.shrinking and taker.got == [] and taker.taken == []
    pool.release(second, reusable=True, reset=False)
    assert second.closed and pool.total == 1
    pool.maintain()  # (the janitor finds nothing left to close, and shrinking is over)
    assert not pool.shrinking
    assert pool.hand_over(third) is True and taker.taken[0][0] is third


# -- lent connections age and idle as idle ones do --------------------------------------------


def test_a_lent_connection_past_server_lifetime_is_taken_back_and_closed():
    h = Harness(size=2, lifetime=100.0)
    conn, borrower = lent_connection(h)
    borrower.last_request = 0.0
    h.clock.advance(50)
    borrower.last_request = 50.0
    h.pool.maintain()
    assert not conn.closed and borrower.reclaimed == 0
    h.clock.advance(60)
    borrower.last_request = 110.0  # (busy: it asked just now, yet its connection is past its lifetime)
    h.pool.maintain()
    assert conn.closed and borrower.reclaimed == 1 and h.pool.total == 0


@pytest.mark.parametrize("min_size, closed", [(0, True), (1, False)], ids=["closed", "kept-by-min_pool_size"])
def test_a_connection_lent_to_a_client_quiet_for_server_idle_timeout(min_size, closed):
    h = Harness(size=2, idle_timeout=600.0, min_size=min_size)
    conn, borrower = lent_connection(h)
    borrower.last_request = 0.0
    h.clock.advance(599)
    h.pool.maintain()
    assert not conn.closed and h.pool.lent
    h.clock.advance(1)
    h.pool.maintain()
    assert conn.closed is closed and (not h.pool.lent) is closed and (h.pool.total == 0) is closed
