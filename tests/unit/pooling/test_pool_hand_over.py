"""Pool.hand_over: a busy connection passed in place to the oldest waiter, or refused with nothing changed."""

import pytest

from tests.harness.pool import Harness


class Taker:
    """A waiter as a ClientSession is, that may take a connection as it is (Pool.hand_over)."""

    def __init__(self, pool, as_is=True):
        self.pool, self.as_is = pool, as_is
        self.asked: list = []
        self.taken: list = []
        self.got: list = []  # server_ready / server_unavailable, the usual way

    def takes_as_is(self, conn):
        self.asked.append(conn)
        return self.as_is

    def take_over(self, conn):
        # What the pool looks like at that moment: the waiter out of the queue, conn still busy.
        self.taken.append((conn, self in self.pool.waiters, conn in self.pool.busy, conn in self.pool.idle))

    def server_ready(self, conn):
        self.got.append(conn)

    def server_unavailable(self, failure):
        self.got.append(failure)


def in_use(**settings):
    """A pool of one with its connection busy (a client's transaction just ended on it) and two
    Takers waiting, the first since 1 s, the second since 3 s; the clock at 6 s. No wait_timeout
    unless given: time passes in some tests."""
    h = Harness(size=1, reset_query="", **{"wait_timeout": 0, **settings})
    h.acquire()
    conn = h.open_next()
    h.clock.advance(1)
    first = Taker(h.pool)
    h.pool.wait_for(first)
    h.clock.advance(2)
    second = Taker(h.pool)
    h.pool.wait_for(second)
    h.clock.advance(3)
    return h, conn, first, second


def snapshot(h, conn):
    pool = h.pool
    return list(pool.waiters), dict(pool._waits), set(pool.busy), list(pool.idle), pool.wait_seconds, conn.last_used


def test_the_oldest_waiter_takes_it_in_place_and_it_stays_busy():
    h, conn, first, second = in_use()
    assert conn.last_used == 0.0 and h.pool.wait_seconds == 0.0
    assert h.pool.hand_over(conn) is True
    assert first.taken == [(conn, False, True, False)]  # once, out of the queue, the connection busy
    assert second.taken == [] and first.got == [] and second.got == []
    assert list(h.pool.waiters) == [second] and list(h.pool._waits) == [second]
    assert h.pool.busy == {conn} and not h.pool.idle and h.pool.total == 1
    assert h.pool.wait_seconds == 5.0  # the first waited from 1 s to 6 s
    assert conn.last_used == 6.0 == h.clock.seconds()
    assert conn.internal == [] and not conn.closed and len(h.attempts) == 1


def test_handoffs_follow_the_queue():
    h, conn, first, second = in_use()
    third = Taker(h.pool)
    h.pool.wait_for(third)
    h.clock.advance(4)
    assert h.pool.hand_over(conn) is True
    h.clock.advance(1)
    assert h.pool.hand_over(conn) is True
    assert [len(w.taken) for w in (first, second, third)] == [1, 1, 0]
    assert list(h.pool.waiters) == [third]
    assert h.pool.wait_seconds == (10 - 1) + (11 - 3)
    assert conn.last_used == 11.0 and h.pool.busy == {conn} and not h.pool.idle


def test_a_waiter_handed_a_connection_is_never_timed_out():
    h, conn, first, second = in_use(wait_timeout=10.0)
    assert h.pool.hand_over(conn) is True
    h.clock.advance(5)  # 11 s: the first would have waited 10 s, the second has waited 8
    assert first.got == [] and second.got == []
    h.clock.advance(2)  # 13 s: the second has waited 10 s
    assert first.got == [] and len(second.got) == 1 and not h.pool.waiters


def test_a_handoff_reads_the_clock_once():
    h, conn, first, _ = in_use(lifetime=100.0)
    reads = []
    seconds = h.clock.seconds
    h.clock.seconds = lambda: reads.append(1) or seconds()
    assert h.pool.hand_over(conn) is True
    assert len(reads) == 1 and conn.last_used == 6.0


def test_a_server_check_query_with_a_delay_does_not_stop_it():
    """The connection was in use until now: it has been idle no time at all."""
    h, conn, first, _ = in_use(check_query="SELECT 1", check_delay=30.0)
    h.clock.advance(60)
    assert h.pool.hand_over(conn) is True and len(first.taken) == 1 and conn.internal == []


def test_a_connection_short_of_its_lifetime_is_handed_over():
    h, conn, first, _ = in_use(lifetime=100.0)
    h.clock.advance(93.999)  # created at 0, now 99.999
    assert h.pool.hand_over(conn) is True and len(first.taken) == 1


# -- refusals: False, and nothing changed (the caller releases the connection as usual) -------------


def pause(h, conn, first, second):
    h.pool.set_paused(True)


def retire(h, conn, first, second):
    h.pool.retire()


def taint(h, conn, first, second):
    conn.tainted = True


def first_cannot_take_it(h, conn, first, second):
    first.as_is = False


@pytest.mark.parametrize(
    "settings, change",
    [
        pytest.param({}, pause, id="paused"),
        pytest.param({}, retire, id="retired"),
        pytest.param({}, taint, id="tainted"),
        pytest.param({"check_query": "SELECT 1", "check_delay": 0}, None, id="checked-before-every-reuse"),
        pytest.param({"lifetime": 6.0}, None, id="at-its-lifetime"),  # created at 0, now 6
        pytest.param({"lifetime": 1.0}, None, id="past-its-lifetime"),
        # (The second would take it as it is: no jumping the queue, the oldest gets it through release().)
        pytest.param({}, first_cannot_take_it, id="oldest-cannot-take-it-as-is"),
    ],
)
def test_a_refusal_changes_nothing(settings, change):
    h, conn, first, second = in_use(**settings)
    if change is not None:
        change(h, conn, first, second)
    before = snapshot(h, conn)
    assert h.pool.hand_over(conn) is False
    assert snapshot(h, conn) == before
    assert first.taken == [] and second.taken == [] and first.got == [] and second.got == []
    assert second.asked == []  # only the oldest waiter is asked, if anyone is
    assert conn.internal == [] and not conn.closed


def test_a_deferred_waiter_first_in_line_is_refused_and_never_asked():
    h = Harness(size=1, reset_query="")
    h.acquire()
    conn = h.open_next()
    h.clock.advance(1)
    d, r = h.acquire()  # a Deferred (acquire(): auth_query, a session-pooled login), not a ClientSession
    taker = Taker(h.pool)
    h.pool.wait_for(taker)
    h.clock.advance(1)
    before = snapshot(h, conn)
    assert h.pool.hand_over(conn) is False
    assert snapshot(h, conn) == before
    assert r == [] and taker.asked == [] and taker.taken == []
    assert list(h.pool.waiters) == [d, taker]


def test_a_connection_with_a_cancel_on_its_way_serves_no_other_client_until_the_node_has_it():
    # PgBouncer's sv_being_canceled: a cancel for the client that just finished, still on its way
    # to the node, would stop the next client's statement on this connection.
    h, conn, first, second = in_use()
    conn.canceling = 1
    assert h.pool.hand_over(conn) is False
    h.pool.release(conn, reusable=True, reset=False)
    assert conn in h.pool.being_canceled and conn in h.pool.busy and not h.pool.idle
    assert first.taken == [] and first.got == [] and list(h.pool.waiters) == [first, second]
    assert h.pool.server_counts(h.clock.seconds())["being_canceled"] == 1
    conn.canceling = 0
    h.pool.cancel_delivered(conn)
    assert first.got == [conn] and not h.pool.being_canceled  # the node has it: on to the next client


def test_a_connection_held_for_a_cancel_that_closes_is_forgotten():
    h, conn, first, second = in_use()
    conn.canceling = 1
    h.pool.release(conn, reusable=True, reset=False)
    h.pool.server_closed(conn)
    assert not h.pool.being_canceled and conn not in h.pool.busy
    conn.canceling = 0
    h.pool.cancel_delivered(conn)  # (late: nothing to release)
    assert first.got == []


def test_a_connection_to_be_closed_is_closed_at_once_whatever_cancel_is_on_its_way():
    h, conn, first, second = in_use()
    conn.canceling = 1
    h.pool.release(conn, reusable=False)
    assert conn.closed and not h.pool.being_canceled
