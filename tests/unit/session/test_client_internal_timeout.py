"""pgtwist's own statements on a server connection (the reset, server_check_query, settings synced
for a client) are bounded by one timer each: a node that stops answering loses that connection,
and whoever waited on it goes on; forwarded client traffic never gets a timer."""

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate

from tests.harness.session import RESULT, Harness, finish_internal, messages, queries


def lose(server):
    """What the reactor reports once an aborted connection is gone."""
    assert server.transport.disconnecting
    server.connection_lost(Failure(ConnectionLost()))


def test_the_timeout_is_query_timeout_else_server_connect_timeout():
    h = Harness()
    h.client()
    assert h.pool.settings.internal_timeout == 5  # server_connect_timeout (query_timeout 0)
    h = Harness(query_timeout=3)
    h.client()
    assert h.pool.settings.internal_timeout == 3


def test_a_reset_the_node_never_answers_loses_that_connection_and_frees_its_slot():
    h = Harness(databases={"appdb": {"dbname": "postgres", "nodes": ["db1:5432"], "pool_size": 1}})
    session, ct, server, st_ = h.linked()
    session.got_data(m.terminate())
    assert queries(st_.value()) == ["DISCARD ALL"]
    waiting, wt = h.client()  # pool_size 1: waits for the reset
    assert waiting.state == "waiting"
    h.clock.advance(4.9)
    assert not st_.disconnecting
    h.clock.advance(0.1)
    lose(server)
    assert server not in h.pool.busy and server not in h.pool.idle
    assert len(h.proxy.servers) == 2 and waiting.server is h.proxy.servers[1]  # a new connection serves it
    assert h.pool.server_counts(h.clock.seconds())["tested"] == 0


def test_a_check_the_node_never_answers_is_invisible_to_the_waiting_client():
    h = Harness(server_check_query="SELECT 1", server_check_delay=0)
    session, ct, server, st_ = h.linked()
    h.clock.advance(1)
    session.got_data(m.terminate())
    finish_internal(server)  # DISCARD ALL answered
    st_.clear()
    other, oct_ = h.client()
    assert queries(st_.value()) == ["SELECT 1"] and other.state != "linked"
    h.clock.advance(5)
    lose(server)
    assert len(h.proxy.servers) == 2 and other.server is h.proxy.servers[1] and other.state == "linked"
    assert b"E" not in bytes(t for t, _ in messages(oct_.value()))


def test_settings_the_node_never_confirms_end_as_a_connection_lost_while_preparing():
    h = Harness(pool_mode="transaction")
    session, ct = h.client(application_name="x")
    (server,) = h.proxy.servers
    assert server.state == "internal"  # the startup setting is being applied
    h.clock.advance(5)
    lose(server)
    assert server.fatal["C"] == sqlstate.CONNECTION_FAILURE  # (what the node's health hears)
    # As for a node lost there: one node, nowhere else to go, the client hears 08006 (not for ever).
    errors = [m.decode_fields(b) for t, b in messages(ct.value()) if t == p.ERROR_RESPONSE]
    assert [(e["S"], e["C"]) for e in errors] == [("FATAL", sqlstate.CONNECTION_FAILURE)]
    assert session.state == "closed"


def test_forwarded_traffic_gets_no_timer():
    h = Harness()
    session, ct, server, st_ = h.linked()
    before = len(h.clock.getDelayedCalls())
    for _ in range(3):
        session.got_data(m.query("SELECT 1"))
        assert len(h.clock.getDelayedCalls()) == before
        server.got_data(RESULT + m.ready_for_query(p.TX_IDLE))
    assert len(h.clock.getDelayedCalls()) == before and server._internal_timer is None
