"""Placement, the session's collaborator: where work goes, its answers for a kept connection, and what a loss means."""

from pgtwist.pooling.relay import CLIENT_CAPTURE
from pgtwist.session.placement import AWAIT_END, UNPLACED
from pgtwist.wire import messages as m
from pgtwist.wire import sqlstate
from pgtwist.wire.framing import MessageScanner

from tests.harness.routing import R1, R2, P
from tests.harness.session import Z_IDLE, Setup, sent


def _items(session, data: bytes) -> list:
    """What a transaction-pooling session's scanner makes of *data* (without the session acting on it)."""
    return MessageScanner(CLIENT_CAPTURE, 1 << 20, frontend=True).feed(data)


def test_a_kept_connection_s_next_work_is_placed_by_the_same_policy():
    s = Setup()
    session, ct = s.client()
    placement = session.placement
    assert str(placement.decide_kept(_items(session, m.query("INSERT INTO t VALUES (1)"))).node) == P
    assert str(placement.decide_kept(_items(session, m.query("SELECT 1"))).node) in (R1, R2)


def test_nothing_to_place_by_and_an_open_batch_for_a_replica_are_answered_apart():
    s = Setup()
    session, ct = s.client()
    placement = session.placement
    assert placement.decide_kept(_items(session, m.sync())) is UNPLACED
    assert placement.decide_kept(_items(session, m.parse("", "SELECT 1") + m.bind("", "") + m.execute())) is AWAIT_END


def test_no_node_now_is_none():
    s = Setup()
    session, ct = s.client()
    for node in (P, R1, R2):
        s.set_up(node, False)
    assert session.placement.decide_kept(_items(session, m.query("INSERT INTO t VALUES (1)"))) is None


def test_which_losses_a_session_survives():
    keep = Setup().client()[0].placement
    close = Setup(on_server_loss="close_client").client()[0].placement
    assert keep.keeps_session(None, lent=False) and keep.keeps_session({"C": sqlstate.ADMIN_SHUTDOWN}, lent=False)
    assert not keep.keeps_session({"C": sqlstate.PROTOCOL_VIOLATION}, lent=True)  # what the client sent broke it
    assert close.keeps_session(None, lent=True)  # (merely keeping it between transactions)
    assert not close.keeps_session(None, lent=False)


def test_placing_work_links_a_server_connection():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    server = session.server
    assert session.state == "linked" and str(server.node) in (R1, R2)
    sent(server)
    server.got_data(m.command_complete("SELECT 1") + Z_IDLE)
    assert ct.value().endswith(Z_IDLE)


def test_the_lost_fields_keep_the_node_s_words():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    server = session.server
    fields = session.placement.lost_fields(server, {"C": sqlstate.ADMIN_SHUTDOWN, "M": "terminating", "S": "FATAL"}, True)
    assert (fields["S"], fields["C"], fields["M"]) == ("ERROR", sqlstate.ADMIN_SHUTDOWN, "terminating")
    assert "ROLLBACK" in fields["D"]
    assert session.placement.lost_fields(server, None, False)["C"] == sqlstate.CONNECTION_FAILURE
