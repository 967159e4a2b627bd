"""Requests pgtwist answers itself leave nothing pending: the session's timers and state as after a node's answer.

A request counts as pending (ClientSession._asked_at) from the client's first byte to its
ReadyForQuery; client_idle_timeout waits for none to be pending, query_timeout runs from it, and
the idle-in-transaction timer is armed again at each ReadyForQuery. When pgtwist writes that
ReadyForQuery itself (DEALLOCATE, a refused unpoolable statement, a request cancelled while it
waited, errors after a node was lost), the same must happen.
"""

from __future__ import annotations

from pgtwist.wire import messages as m

from tests.harness.session import RESULT, Z_IDLE, Z_IN, Setup, begin, error_fields, keeps_its_server, lose, sent, tick, types
from tests.unit.session.test_client_frees_database import DROP, harness, idle_scratch_connection, refusal


def _kept(**settings):
    """A session keeping its connection between transactions after SELECT 1."""
    s = Setup(clustered=False, **settings)
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    server = session.server
    server.got_data(RESULT + Z_IDLE)
    assert keeps_its_server(session)
    ct.clear()
    sent(server)
    return s, session, ct, server


def test_after_a_deallocate_answered_here_client_idle_timeout_applies():
    s, session, ct, server = _kept(client_idle_timeout=10)
    session.got_data(m.query("DEALLOCATE ALL"))
    assert types(ct.value()) == "CZ" and sent(server) == b""
    assert session.idle_at_rest()
    tick(s, 20)
    assert ct.disconnecting


def test_after_a_deallocate_answered_here_query_timeout_runs_from_the_next_request():
    s, session, ct, server = _kept(query_timeout=5)
    session.got_data(m.query("DEALLOCATE ALL"))
    ct.clear()
    s.clock.advance(4.5)
    session.got_data(m.query("SELECT 2"))
    assert session.server is server
    tick(s, 1)  # (the janitor, 1 s into SELECT 2, 5.5 s after the DEALLOCATE)
    assert ct.value() == b"" and not ct.disconnecting


def test_a_deallocate_answered_inside_a_transaction_arms_the_idle_transaction_timer_again():
    s, session, ct, server = _kept(idle_transaction_timeout=3)
    session.got_data(m.query("BEGIN"))
    server.got_data(m.command_complete("BEGIN") + Z_IN)
    ct.clear()
    session.got_data(m.query("DEALLOCATE ALL"))
    assert types(ct.value()) == "CZ"
    ct.clear()
    tick(s, 10)
    assert ct.disconnecting and [f["C"] for f in error_fields(ct.value())] == ["25P03"]


def test_a_request_cancelled_while_it_waited_counts_as_the_last_request():
    """client_idle_timeout counts from the last request: one cancelled while it waited is one."""
    s = Setup(clustered=False, pool_size=1, client_idle_timeout=10, query_wait_timeout=60)
    a, _ = s.client()
    a.got_data(m.query("BEGIN"))
    a.server.got_data(m.command_complete("BEGIN") + Z_IN)  # (holds the one connection)
    b, bt = s.client()
    tick(s, 9)
    s.clock.advance(0.2)
    b.got_data(m.query("SELECT 2"))
    assert b.state == "waiting"
    s.clock.advance(0.3)
    b.cancel_waiting()
    assert [f["C"] for f in error_fields(bt.value())] == ["57014"]
    bt.clear()
    s.clock.advance(0.5)
    s.proxy.maintain()
    assert not bt.disconnecting


def test_a_transaction_ended_on_a_kept_connection_is_not_orphaned_when_the_node_drops_it():
    s = Setup()
    session, ct = s.client()
    server = begin(s, session)
    session.got_data(m.query("COMMIT"))
    server.got_data(m.command_complete("COMMIT") + Z_IDLE)
    assert keeps_its_server(session)
    ct.clear()
    lose(server)  # (the node ends the idle kept connection: a restart, pg_terminate_backend)
    assert ct.value() == b"" and not session.orphaned
    session.got_data(m.query("SELECT 1"))
    assert error_fields(ct.value()) == []


def test_an_orphaned_transaction_left_idle_meets_idle_transaction_timeout():
    s = Setup(clustered=False, idle_transaction_timeout=5, client_idle_timeout=10)
    session, ct = s.client()
    server = begin(s, session)
    tick(s, 1)
    lose(server)
    assert session.orphaned
    tick(s, 30)
    assert ct.disconnecting and [f["C"] for f in error_fields(ct.value())] == ["25P03"]


def test_a_refusal_held_for_a_ready_for_query_that_never_came_is_forgotten():
    h = harness(pool_mode="transaction")
    idle_scratch_connection(h)
    session, ct, server, st = h.linked()
    session.got_data(m.query(DROP))
    server.got_data(refusal())  # (its ReadyForQuery would come in a later read...)
    lose(server)  # (... which never comes)
    assert session._refused is None
    ct.clear()
    session.got_data(m.query(DROP))
    server = session.server
    server.got_data(refusal() + m.ready_for_query())
    assert h.freed == [("scratch",)]  # (the refusal was acted on: the idle scratch connection freed)


def test_ddl_of_an_orphaned_transaction_is_not_committed_by_the_next_one():
    """BEGIN, DDL, the node lost, ROLLBACK (answered by pgtwist): the DDL rolled back with the node,
    so the client's next transaction changes no schema clock and re-reads no function."""
    s = Setup(clustered=False)
    session, ct = s.client()
    server = begin(s, session)
    session.got_data(m.query("CREATE TABLE t (x int)"))
    lose(server)
    session.got_data(m.query("ROLLBACK"))
    assert not session.orphaned
    schema = session.relay.schema
    before = schema.ddl_at
    s.clock.advance(5)
    changed = []
    router = session.router
    original = router.schema_changed
    router.schema_changed = lambda *a: (changed.append(a), original(*a))
    session.got_data(m.query("SELECT 1"))
    session.server.got_data(RESULT + Z_IDLE)
    assert schema.ddl_at == before and changed == []
