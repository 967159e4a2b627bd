"""client_idle_timeout: the janitor closes clients silent between transactions, never busy ones (task.Clock)."""

from pgtwist.wire import messages as m
from pgtwist.wire import sqlstate

from tests.harness.session import RESULT, Z_IDLE, Setup, error_fields, tick


def test_idle_client_closed_with_57p05_client_idle_timeout():
    s = Setup(clustered=False, client_idle_timeout=5.0)
    session, ct = s.client()
    tick(s, 4)
    assert not ct.disconnecting
    tick(s, 1)
    assert ct.disconnecting
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", sqlstate.IDLE_SESSION_TIMEOUT, "client_idle_timeout")


def test_requests_between_ticks_and_long_queries_keep_a_client():
    s = Setup(clustered=False, client_idle_timeout=3.0)
    session, ct = s.client()
    for _ in range(5):  # a request each 2 s, answered before the janitor looks
        s.clock.advance(1.5)
        session.got_data(m.query("SELECT 1"))
        session.server.got_data(RESULT + Z_IDLE)
        tick(s, 1)  # (the janitor's ticks fall on whole seconds after the requests)
    assert not ct.disconnecting
    session.got_data(m.query("SELECT pg_sleep(10)"))
    server = session.server
    tick(s, 10)  # a long statement is not idleness
    assert not ct.disconnecting
    server.got_data(RESULT + Z_IDLE)
    tick(s, 2)
    assert not ct.disconnecting
    tick(s, 2)
    assert ct.disconnecting


def test_off_by_default():
    s = Setup(clustered=False)
    session, ct = s.client()
    tick(s, 100)
    assert not ct.disconnecting
