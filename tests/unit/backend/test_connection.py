"""ServerConnection on its own: login, idle in its pool, internal queries (the reset included), closing.

A StringTransport plays the socket and a small stand-in the pool (what ServerConnection asks of
one: node, clock, max_prepared_statements, server_closed); the node's side is written by hand.
"""

import pytest
from twisted.internet import task
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pgtwist.backend.connection import ServerConnection
from pgtwist.backend.login import ServerLogin
from pgtwist.pooling.statements import INTERNAL_NAME
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.framing import pop_startup_packet

from tests.harness.compiled import pure_only
from tests.harness.session import NODE_KEY, NODE_PID, messages, node_welcome, queries, types

NODE = "db1:5432"


class PoolStandIn:
    def __init__(self):
        self.node = NODE
        self.clock = task.Clock()
        self.max_prepared_statements = 100
        self.internal_timeout = 0.0
        self.closed: list[ServerConnection] = []

    def server_closed(self, conn):
        self.closed.append(conn)


def outcome(d):
    """What a Deferred fired with (a Failure's exception), or a marker that it has not."""
    out = []

    def keep(result):
        out.append(result)
        return None if isinstance(result, Failure) else result  # (a failure is handled here)

    d.addBoth(keep)
    if not out:
        return "not fired"
    (r,) = out
    return r.value if isinstance(r, Failure) else r


def connecting():
    pool = PoolStandIn()
    conn = ServerConnection("s1", pool, ServerLogin("app", "postgres", None, node_name=NODE))
    ready = conn.ready
    transport = StringTransport(lenient=True)
    conn.connection_made(transport)
    return conn, ready, transport, pool


def logged_in():
    conn, ready, transport, pool = connecting()
    conn.got_data(node_welcome())
    assert outcome(ready) is conn
    transport.clear()
    return conn, transport, pool


def answer(conn, *, rows=(), error=None, params=(), status=p.TX_IDLE):
    """The node's answer to one simple Query."""
    out = b"".join(m.data_row(list(r)) for r in rows)
    if error:
        out += m.error_response(*error)
    else:
        out += m.command_complete(f"SELECT {len(rows)}")
    out += b"".join(m.parameter_status(k, v) for k, v in params)
    conn.got_data(out + m.ready_for_query(status))


# -- login ------------------------------------------------------------------------------------


def test_login_sends_the_startup_packet_and_fires_ready_with_what_the_node_said():
    conn, ready, transport, _ = connecting()
    packet = pop_startup_packet(bytearray(transport.value()), p.MAX_STARTUP_PACKET)
    assert packet is not None and b"user\x00app\x00" in packet and b"database\x00postgres\x00" in packet
    assert outcome(ready) == "not fired"
    conn.got_data(node_welcome())
    assert outcome(ready) is conn
    assert conn.backend_key == (NODE_PID, NODE_KEY)
    assert conn.parameters["server_version"] == "16.4"
    assert conn.state == "idle"


def test_login_split_at_every_byte_fires_ready_once():
    welcome = node_welcome()
    for cut in range(1, len(welcome)):
        conn, ready, _, _ = connecting()
        conn.got_data(welcome[:cut])
        assert outcome(ready) == "not fired", cut
        conn.got_data(welcome[cut:])
        assert outcome(ready) is conn, cut


def test_node_refusing_the_login_fails_ready_with_its_error_and_hangs_up():
    conn, ready, transport, _ = connecting()
    conn.got_data(m.error_response("FATAL", "28P01", 'password authentication failed for user "app"'))
    error = outcome(ready)
    assert error.fields["C"] == "28P01" and "password" in error.fields["M"]
    assert transport.disconnecting


def test_node_closing_during_login_is_08006_and_the_pool_hears_of_it():
    conn, ready, _, pool = connecting()
    conn.connection_lost(Failure(ConnectionDone()))
    assert outcome(ready).fields["C"] == sqlstate.CONNECTION_FAILURE
    assert pool.closed == [conn]


def test_login_timeout_is_08006_naming_the_node_and_aborts():
    conn, ready, transport, _ = connecting()
    conn.login_timed_out()
    error = outcome(ready)
    assert error.fields["C"] == sqlstate.CONNECTION_FAILURE and NODE in error.fields["M"]
    assert transport.disconnecting


def test_garbage_during_login_is_08p01_and_closes():
    conn, ready, transport, _ = connecting()
    conn.got_data(b"R\x00\x00\x00\x02")  # a length below 4
    assert outcome(ready).fields["C"] == sqlstate.PROTOCOL_VIOLATION
    assert transport.disconnecting


# -- idle in the pool -------------------------------------------------------------------------


def test_idle_error_response_closes_it_and_keeps_the_nodes_words():
    conn, transport, pool = logged_in()
    conn.got_data(m.error_response("FATAL", "57P01", "terminating connection due to administrator command"))
    assert conn.fatal["C"] == "57P01"
    assert types(transport.value()) == "X" and transport.disconnecting  # a Terminate, then goodbye
    conn.connection_lost(Failure(ConnectionLost()))
    assert pool.closed == [conn] and conn.state == "closed"


def test_idle_parameter_status_and_notices_keep_it():
    conn, transport, _ = logged_in()
    conn.got_data(m.parameter_status("in_hot_standby", "on") + m.notice_response("00000", "hello"))
    assert conn.parameters["in_hot_standby"] == "on"
    assert not transport.disconnecting and conn.state == "idle"


def test_close_when_idle_says_terminate():
    conn, transport, _ = logged_in()
    conn.close()
    assert types(transport.value()) == "X" and transport.disconnecting


# -- internal queries (parameters before linking, reset after) --------------------------------


def test_run_internal_sends_simple_queries_and_fires_with_no_errors():
    conn, transport, _ = logged_in()
    d = conn.run_internal(["ROLLBACK", "DISCARD ALL"])
    assert queries(transport.value()) == ["ROLLBACK", "DISCARD ALL"]
    assert conn.state == "internal"
    answer(conn)
    assert outcome(d) == "not fired"  # one ReadyForQuery owed still
    answer(conn)
    assert outcome(d) == [] and conn.state == "idle"


def test_run_internal_reports_errors_rows_and_settings_reported_on_the_way():
    conn, _, _ = logged_in()
    d = conn.run_internal(["SHOW x", "RESET ALL"])
    answer(conn, rows=[[b"1"]], params=[("search_path", "public")])
    answer(conn, error=("ERROR", "42704", "unrecognized configuration parameter"))
    errors = outcome(d)
    assert [e["C"] for e in errors] == ["42704"]
    assert conn.internal_rows == [[b"1"]]
    assert conn.parameters["search_path"] == "public"


def test_run_for_client_never_sends_a_simple_query():
    # A Query would drop the client's unnamed statement and portal: the proxy's own SQL goes
    # out under its own names in the extended protocol.
    conn, transport, _ = logged_in()
    d = conn.run_for_client([["SELECT pg_catalog.pg_current_wal_lsn()"]])
    sent = messages(transport.value())
    assert p.QUERY not in [t for t, _ in sent]
    assert [m.decode_parse(b)[0] for t, b in sent if t == p.PARSE] == [INTERNAL_NAME]
    conn.got_data(
        m.close_complete() * 2
        + m.parse_complete()
        + m.bind_complete()
        + m.data_row([b"0/1"])
        + m.command_complete("SELECT 1")
        + m.close_complete() * 2
        + m.ready_for_query()
    )
    assert outcome(d) == [] and conn.internal_rows == [[b"0/1"]]


def lsn_answer(status=p.TX_IDLE) -> bytes:
    """The node's answer to run_for_client([[one statement]]): a row, with a notice and a setting on the way."""
    return (
        m.close_complete() * 2
        + m.parse_complete()
        + m.bind_complete()
        + m.notice_response("00000", "on the way")
        + m.data_row([b"0/1", None])
        + m.command_complete("SELECT 1")
        + m.parameter_status("in_hot_standby", "off")
        + m.close_complete() * 2
        + m.ready_for_query(status)
    )


def test_internal_answer_split_anywhere_gives_what_it_gives_whole():
    whole = lsn_answer(p.TX_IN_TRANSACTION)
    for cuts in [(i,) for i in range(1, len(whole))] + [(3, 40), (5, 6), (20, len(whole) - 1)]:
        conn, _, _ = logged_in()
        d = conn.run_for_client([["SELECT 1"]])
        edges = [0, *cuts, len(whole)]
        for a, b in zip(edges, edges[1:]):
            conn.got_data(whole[a:b])
        assert outcome(d) == [], cuts
        assert conn.internal_rows == [[b"0/1", None]], cuts
        assert conn.parameters["in_hot_standby"] == "off" and conn.tx_status == p.TX_IN_TRANSACTION, cuts
        assert conn.state == "idle" and not conn.buffer, cuts


@pure_only
def test_bytes_behind_the_last_internal_ready_for_query_go_to_the_client_linked_by_it():
    # The read that ends our own statements may carry what the node said next (it answers in
    # order): once the answer has linked the connection to a client, those bytes are its.
    conn, _, _ = logged_in()
    forwarded = []
    conn._forward = forwarded.append
    d = conn.run_for_client([["SELECT 1"]])
    d.addCallback(lambda _: conn.link(SessionStandIn(), StringTransport()))
    behind = m.command_complete("SELECT 0") + m.ready_for_query()
    conn.got_data(lsn_answer() + behind)
    assert conn.state == "linked" and forwarded == [behind] and not conn.buffer


def test_an_invalid_length_in_an_internal_answer_is_a_protocol_violation():
    conn, transport, _ = logged_in()
    d = conn.run_for_client([["SELECT 1"]])
    conn.got_data(m.parse_complete() + b"2\x00\x00\x00\x02")
    assert transport.disconnecting
    conn.connection_lost(Failure(ConnectionLost()))
    assert isinstance(outcome(d), ConnectionError)


def test_node_lost_during_an_internal_query_fails_it():
    conn, _, pool = logged_in()
    d = conn.run_internal(["ROLLBACK"])
    conn.connection_lost(Failure(ConnectionLost()))
    assert isinstance(outcome(d), ConnectionError)
    assert pool.closed == [conn]


def test_a_fatal_during_an_internal_query_is_remembered():
    conn, _, _ = logged_in()
    d = conn.run_internal(["DISCARD ALL"])
    answer(conn, error=("FATAL", "57P01", "terminating connection due to administrator command"))
    assert [e["C"] for e in outcome(d)] == ["57P01"]
    assert conn.fatal["C"] == "57P01"


def test_internal_queries_are_bounded_by_one_timer_cancelled_by_the_answer():
    conn, _, pool = logged_in()
    pool.internal_timeout = 5.0
    d = conn.run_internal(["ROLLBACK", "DISCARD ALL"])
    assert len(pool.clock.getDelayedCalls()) == 1  # one per batch, not one per statement
    answer(conn)
    pool.clock.advance(4.9)
    answer(conn)
    assert outcome(d) == [] and pool.clock.getDelayedCalls() == []
    pool.clock.advance(10)
    assert conn.state == "idle" and conn.fatal is None


def test_a_node_that_does_not_answer_internal_queries_loses_the_connection_as_08006():
    conn, transport, pool = logged_in()
    pool.internal_timeout = 5.0
    d = conn.run_internal(["SELECT 1"])
    pool.clock.advance(4.9)
    assert not d.called and not transport.disconnecting
    pool.clock.advance(0.1)
    assert transport.disconnecting  # (aborted: a hung node takes no part in a clean close)
    assert conn.fatal["C"] == sqlstate.CONNECTION_FAILURE  # (the node's health hears it as a failed connection)
    conn.connection_lost(Failure(ConnectionLost()))
    failure = outcome(d)
    assert isinstance(failure, ConnectionError) and "did not answer" in str(failure) and "5 s" in str(failure)
    assert pool.closed == [conn] and pool.clock.getDelayedCalls() == []


def test_a_connection_lost_under_internal_queries_stops_their_timer():
    conn, _, pool = logged_in()
    pool.internal_timeout = 5.0
    d = conn.run_for_client([["SET x = 1"]])
    conn.connection_lost(Failure(ConnectionLost()))
    assert isinstance(outcome(d), ConnectionError) and pool.clock.getDelayedCalls() == []


def test_no_internal_timeout_means_no_timer():
    conn, _, pool = logged_in()
    d = conn.run_internal(["SELECT 1"])
    assert pool.clock.getDelayedCalls() == []
    answer(conn)
    assert outcome(d) == []


@pytest.mark.parametrize("status", [p.TX_IDLE, p.TX_IN_TRANSACTION, p.TX_FAILED])
def test_internal_query_records_the_transaction_status(status):
    conn, _, _ = logged_in()
    d = conn.run_internal(["SELECT 1"])
    answer(conn, status=status)
    assert outcome(d) == [] and conn.tx_status == status


class SessionStandIn:
    """What link() needs of a session: nothing until the node speaks."""


@pure_only
def test_a_link_paused_by_its_client_leaves_nothing_paused_for_the_next_client():
    # Clients outnumber connections: one server connection goes from client to client with the
    # same two Throttles, pointed at each new client; a pause of one link never reaches the next.
    conn, transport, _ = logged_in()
    first, second = StringTransport(), StringTransport()
    conn.link(SessionStandIn(), first)
    server_throttle, client_throttle = first.producer, transport.producer
    first.producer.pauseProducing()  # the first client stopped reading: the node's reads pause
    transport.producer.pauseProducing()  # ... and the node side is full too
    assert transport.producerState == "paused" and first.producerState == "paused"
    conn.unlink()
    assert first.producer is None and transport.producer is None
    assert transport.producerState == "producing" and first.producerState == "producing"
    assert not server_throttle.paused and not client_throttle.paused
    conn.link(SessionStandIn(), second)
    assert second.producer is server_throttle and transport.producer is client_throttle
    assert client_throttle.transport is second and second.producerState == "producing"
    transport.producer.pauseProducing()  # a pause now reaches the second client, not the first
    assert second.producerState == "paused" and first.producerState == "producing"
