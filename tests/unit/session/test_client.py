"""ClientSession + ServerConnection + Pool together, on StringTransports and a MemoryReactorClock.

The proxy is the real Proxy with one change: connect_server() builds a real ServerConnection on a
StringTransport instead of dialling a node, and (by default) plays the node's side of the login.
"""

import dataclasses
import struct

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from pgtwist.auth import ScramClientExchange
from pgtwist.backend.protocol import BackendFactory, CancelFactory
from pgtwist.service.proxy import Proxy
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.framing import frame, pop_startup_packet

from tests.harness.session import (
    NODE_KEY,
    NODE_PARAMS,
    NODE_PID,
    RESULT,
    Harness,
    finish_internal,
    make_config,
    messages,
    node_welcome,
    parse_settings_query,
    queries,
    tick,
    types,
)

# -- login through the proxy -----------------------------------------------------------------


def test_full_trust_login():
    h = Harness()
    session, ct = h.client()
    data = ct.value()
    assert types(data) == "R" + "S" * len(NODE_PARAMS) + "KZ"
    msgs = messages(data)
    assert m.decode_authentication(msgs[0][1]) == (p.AUTH_OK, b"")
    assert dict(m.decode_parameter_status(b) for t, b in msgs if t == p.PARAMETER_STATUS) == NODE_PARAMS
    pid, key = m.decode_backend_key_data(msgs[-2][1])
    assert (pid, key) == (session.process_id, session.secret_key)
    # Session pooling: the node's process id (pg_backend_pid() agrees), a secret of ours.
    assert pid == NODE_PID and key != NODE_KEY
    assert h.proxy.cancel_keys[pid] is session
    assert msgs[-1] == (p.READY_FOR_QUERY, b"I")
    assert session.state == "linked"
    # The node saw the startup message for the configured dbname, and nothing else.
    server = session.server
    assert server.state == "linked" and server.backend_key == (NODE_PID, NODE_KEY)
    assert server in h.pool.busy
    assert h.clock.getDelayedCalls() == []  # the login timer is gone


def test_server_login_sends_startup_for_configured_dbname():
    h = Harness()
    h.proxy.auto_login = False
    session, ct = h.client()
    (server,) = h.proxy.servers
    packet = m.decode_startup_packet(pop_startup_packet(bytearray(server.transport.value()), 10000))
    assert packet.parameters == {"user": "app", "database": "postgres"}
    assert session.state == "waiting" and ct.value() == m.authentication_ok()
    server.got_data(node_welcome())
    assert session.state == "linked"
    assert types(ct.value()) == "R" + "S" * len(NODE_PARAMS) + "KZ"


def test_startup_parameters_become_one_internal_query_the_client_never_sees():
    h = Harness()
    h.proxy.auto_login = True
    session, ct = h.client(application_name="my'app", options="-c search_path=a,b --geqo=off")
    (server,) = h.proxy.servers
    assert session.state == "preparing"
    assert ct.value() == m.authentication_ok()
    (sql,) = queries(server.transport.value())
    assert parse_settings_query(sql) == {"application_name": "my'app", "search_path": "a,b", "geqo": "off"}
    server.transport.clear()
    finish_internal(server, params=[("application_name", "my'app")])
    assert session.state == "linked"
    data = ct.value()
    assert types(data) == "R" + "S" * len(NODE_PARAMS) + "KZ"  # no T/D/C of the internal query
    reported = dict(m.decode_parameter_status(b) for t, b in messages(data) if t == p.PARAMETER_STATUS)
    assert reported["application_name"] == "my'app"
    assert server.transport.value() == b""


def test_settings_the_node_already_has_need_no_query():
    h = Harness()
    session, ct = h.client(client_encoding="UTF8", application_name="")
    assert session.state == "linked"
    assert queries(session.server.transport.value()) == []


def test_failing_startup_setting_fails_the_login_with_the_node_error():
    h = Harness()
    session, ct = h.client(options="-c nosuch=1")
    server = session.server
    server.transport.clear()
    finish_internal(server, error=("42704", 'unrecognized configuration parameter "nosuch"'))
    fields = m.decode_fields(messages(ct.value())[-1][1])
    assert fields["S"] == fields["V"] == "FATAL"
    assert fields["C"] == "42704" and "nosuch" in fields["M"]
    assert ct.disconnecting and session.state == "closed"
    # What the failed statement left on the server connection is unsure: it is not reused.
    assert server.transport.disconnecting
    assert server not in h.pool.idle and server not in h.pool.busy


def test_pipelined_query_after_startup_reaches_the_server_after_link():
    h = Harness()
    transport = StringTransport(lenient=True)
    session = h.proxy.new_client(transport)
    q = m.query("SELECT 1")
    session.got_data(m.startup_message({"user": "app", "database": "appdb"}) + q)
    assert session.state == "linked"
    assert session.server.transport.value() == q


def test_data_while_waiting_is_held_and_reading_paused():
    h = Harness()
    h.proxy.auto_login = False
    session, ct = h.client()
    q = m.query("SELECT 1")
    session.got_data(q[:3])
    session.got_data(q[3:])
    assert ct.producerState == "paused"
    (server,) = h.proxy.servers
    server.transport.clear()
    server.got_data(node_welcome())
    assert server.transport.value() == q
    assert ct.producerState == "producing"


def test_client_key_from_scram_login_is_remembered():
    h = Harness(auth_type="scram-sha-256")
    h.proxy.auto_login = False
    session, ct = h.client()
    client = ScramClientExchange(password="pw")
    ct.clear()
    session.got_data(m.sasl_initial_response("SCRAM-SHA-256", client.first()))
    _, body = messages(ct.value())[0]
    ct.clear()
    session.got_data(m.password_message(client.handle_server_first(m.decode_authentication(body)[1])))
    assert types(ct.value()) == "RR"
    assert h.proxy.client_keys["app"] is not None


def test_wrong_password_is_fatal_28p01():
    h = Harness(auth_type="md5")
    session, ct = h.client()
    ct.clear()
    session.got_data(m.password_message(b"md5" + b"0" * 32 + b"\x00"))
    fields = m.decode_fields(messages(ct.value())[0][1])
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "28P01", 'password authentication failed for user "app"')
    assert ct.disconnecting and h.proxy.servers == []


def test_unknown_database_is_fatal_3d000():
    h = Harness()
    session, ct = h.client(database="nosuchdb")
    msgs = messages(ct.value())
    assert msgs[0] == (p.AUTHENTICATION, struct.pack("!I", 0))
    fields = m.decode_fields(msgs[1][1])
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate.INVALID_CATALOG_NAME)
    assert "nosuchdb" in fields["M"]
    assert ct.disconnecting and h.proxy.pools == {}


def test_database_defaults_to_user_name():
    h = Harness()
    session, ct = h.client(database="")
    fields = m.decode_fields(messages(ct.value())[-1][1])
    assert fields["C"] == "3D000" and '"app"' in fields["M"]


def test_max_client_conn_exceeded_is_53300():
    h = Harness(max_client_conn=1)
    first, _ = h.client()
    assert first.state == "linked"
    second, ct = h.client()
    fields = m.decode_fields(messages(ct.value())[-1][1])
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate.TOO_MANY_CONNECTIONS)
    assert ct.disconnecting
    second.connection_lost(Failure(ConnectionDone()))
    first.got_data(m.terminate())
    first.connection_lost(Failure(ConnectionDone()))
    third, _ = h.client()
    assert third.state in ("linked", "waiting")


def test_login_timeout_before_startup_closes_silently():
    h = Harness()
    session, ct = h.client(login=False)
    tick(h, 9)  # client_login_timeout = 10: the janitor's sweep, once a second
    assert not ct.disconnecting
    tick(h, 1)
    assert ct.disconnecting and ct.value() == b""
    assert session.state == "closed" and session.id not in h.proxy.logging_in


def test_login_timeout_during_authentication_says_why():
    h = Harness(auth_type="md5")
    session, ct = h.client()
    ct.clear()
    tick(h, 10)
    fields = m.decode_fields(messages(ct.value())[0][1])
    assert fields["C"] == sqlstate.QUERY_CANCELED and "timeout" in fields["M"]
    assert ct.disconnecting


def test_login_timeout_is_cancelled_by_connection_loss():
    h = Harness()
    session, ct = h.client(login=False)
    assert session.id in h.proxy.logging_in
    session.connection_lost(Failure(ConnectionDone()))
    assert h.clock.getDelayedCalls() == [] and h.proxy.logging_in == {}
    assert session.id not in h.proxy.clients


def test_login_timeout_sweep_stops_at_the_first_client_with_time_left():
    h = Harness()
    early, early_t = h.client(login=False)
    h.clock.advance(5)
    late, late_t = h.client(login=False)
    done, done_t = h.client()  # logged in: no longer timed
    assert list(h.proxy.logging_in) == [early.id, late.id]
    tick(h, 5)
    assert early_t.disconnecting and not late_t.disconnecting
    assert list(h.proxy.logging_in) == [late.id]
    tick(h, 5)
    assert late_t.disconnecting and not done_t.disconnecting and h.proxy.logging_in == {}


def test_login_timeout_set_to_zero_by_a_reload_stops_the_sweep():
    h = Harness()
    session, ct = h.client(login=False)
    h.proxy.config = dataclasses.replace(h.proxy.config, client_login_timeout=0)
    tick(h, 20)
    assert not ct.disconnecting


def test_cancel_request_is_forwarded_to_the_node():
    h = Harness()
    session, ct, server, st_ = h.linked()
    canceller, cct = h.client(login=False)
    canceller.got_data(m.cancel_request(session.process_id, session.secret_key))
    host, port, factory, _timeout, _ = h.clock.tcpClients[-1]
    assert (host, port) == ("db1", 5432)
    assert isinstance(factory, CancelFactory)
    assert (factory.process_id, factory.secret_key) == (NODE_PID, NODE_KEY)
    # As PostgreSQL's postmaster, the client's cancel connection closes once the node has the
    # cancel, so its next statement cannot be the one the cancel lands on.
    assert not cct.disconnecting and cct.value() == b""
    protocol = factory.buildProtocol(None)
    node = StringTransport()
    protocol.makeConnection(node)
    assert node.value() == m.cancel_request(NODE_PID, NODE_KEY)
    assert not node.disconnecting and not cct.disconnecting  # the node hangs up once it has signalled
    protocol.connectionLost(None)
    assert cct.disconnecting and cct.value() == b""


def test_a_cancel_the_node_cannot_be_reached_for_still_closes_the_client():
    h = Harness()
    session, *_ = h.linked()
    canceller, cct = h.client(login=False)
    canceller.got_data(m.cancel_request(session.process_id, session.secret_key))
    factory = h.clock.tcpClients[-1][2]
    factory.clientConnectionFailed(None, None)
    assert cct.disconnecting


def test_cancel_request_with_wrong_key_is_ignored():
    h = Harness()
    session, *_ = h.linked()
    canceller, cct = h.client(login=False)
    canceller.got_data(m.cancel_request(session.process_id, b"nope"))
    assert cct.disconnecting
    assert h.clock.tcpClients == []


def test_sessions_given_the_same_node_process_id_each_cancel_their_own():
    """Session pooling: two clients whose servers report the same process id (on two nodes, in
    life) share it in BackendKeyData; their secrets tell them apart."""
    h = Harness()
    a, *_ = h.linked()
    b, *_ = h.linked()
    assert a.process_id == b.process_id == NODE_PID and a.secret_key != b.secret_key
    cancelled = []
    h.proxy.cancel_server = lambda server, done=None: cancelled.append(server)
    for session in (b, a):
        canceller, _ = h.client(login=False)
        canceller.got_data(m.cancel_request(session.process_id, session.secret_key))
    assert cancelled == [b.server, a.server]
    canceller, _ = h.client(login=False)
    canceller.got_data(m.cancel_request(NODE_PID, NODE_KEY))  # the node's own secret: never given out
    assert len(cancelled) == 2
    a.connection_lost(Failure(ConnectionDone()))
    assert h.proxy.cancel_keys[NODE_PID] is b
    b.connection_lost(Failure(ConnectionDone()))
    assert NODE_PID not in h.proxy.cancel_keys


def test_transaction_pooling_gives_process_ids_no_backend_can_have():
    """The server connection changes between transactions: the client gets a process id of
    pgtwist's, above Linux's largest pid, so pg_terminate_backend() of it ends nobody."""
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    pid, key = m.decode_backend_key_data(next(b for t, b in messages(ct.value()) if t == p.BACKEND_KEY_DATA))
    assert (pid, key) == (session.process_id, session.secret_key)
    assert 2**22 < pid <= 0x7FFFFFFF and key != NODE_KEY
    assert h.proxy.cancel_keys[pid] is session


def test_node_refusing_login_reaches_the_client():
    h = Harness()
    h.proxy.auto_login = False
    session, ct = h.client()
    (server,) = h.proxy.servers
    server.got_data(m.error_response("FATAL", "28P01", 'password authentication failed for user "app"'))
    fields = m.decode_fields(messages(ct.value())[-1][1])
    assert (fields["C"], fields["M"]) == ("28P01", 'password authentication failed for user "app"')
    assert ct.disconnecting and server.transport.disconnecting
    server.connection_lost(Failure(ConnectionDone()))
    assert h.pool.total == 0


def test_node_error_without_sqlstate_during_login_gives_08006():
    h = Harness()
    h.proxy.auto_login = False
    session, ct = h.client()
    (server,) = h.proxy.servers
    server.got_data(frame(p.ERROR_RESPONSE, b"Mgo away\x00\x00"))
    fields = m.decode_fields(messages(ct.value())[-1][1])
    assert (fields["C"], fields["M"]) == (sqlstate.CONNECTION_FAILURE, "go away")
    assert ct.disconnecting and session.state == "closed"


def test_node_closing_during_login_gives_08006():
    h = Harness()
    h.proxy.auto_login = False
    session, ct = h.client()
    (server,) = h.proxy.servers
    server.connection_lost(Failure(ConnectionLost()))
    fields = m.decode_fields(messages(ct.value())[-1][1])
    assert fields["C"] == sqlstate.CONNECTION_FAILURE
    assert h.pool.total == 0 and h.pool.connecting == 0


def test_node_garbage_during_login_is_08p01():
    h = Harness()
    h.proxy.auto_login = False
    session, ct = h.client()
    (server,) = h.proxy.servers
    server.got_data(b"R\x00\x00\x00\x02")
    fields = m.decode_fields(messages(ct.value())[-1][1])
    assert fields["C"] == sqlstate.PROTOCOL_VIOLATION
    assert server.transport.disconnecting


# -- linked forwarding ----------------------------------------------------------------------


def test_linked_forwarding_is_byte_exact_both_ways():
    h = Harness()
    session, ct, server, st_ = h.linked()
    request = m.parse("", "SELECT $1") + m.bind("", "", [b"1"]) + m.execute() + m.sync() + m.query("SELECT 1")
    for i in range(0, len(request), 7):
        session.got_data(request[i : i + 7])
    assert st_.value() == request
    answer = frame(ord("1")) + frame(ord("2")) + RESULT + m.ready_for_query() + RESULT + m.ready_for_query()
    for i in range(0, len(answer), 5):
        server.got_data(answer[i : i + 5])
    assert ct.value() == answer
    assert session.ready_count == 2 == session.scanner.watched


def test_linked_parameter_status_and_transaction_status_are_tracked():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.query("BEGIN; SET application_name = 'z'"))
    reply = m.command_complete("BEGIN") + m.parameter_status("application_name", "z") + m.ready_for_query(p.TX_IN_TRANSACTION)
    server.got_data(reply)
    assert ct.value() == reply
    assert server.parameters["application_name"] == "z"
    assert server.tx_status == session.tx_status == p.TX_IN_TRANSACTION


def test_transports_are_each_others_producers_while_linked():
    h = Harness()
    session, ct, server, st_ = h.linked()
    assert ct.producer.transport is st_ and ct.streaming
    assert st_.producer.transport is ct and st_.streaming
    # Pause and resume pass through; stop never does (a dying side must not close the other).
    ct.producer.pauseProducing()
    assert st_.producerState == "paused"
    ct.producer.resumeProducing()
    st_.producer.stopProducing()
    assert ct.producerState == "producing" and not ct.disconnecting
    session.got_data(m.terminate())
    assert ct.producer is None and st_.producer is None
    assert st_.producerState == "producing" and ct.producerState == "producing"


def test_terminate_is_not_forwarded_and_the_server_is_reset_and_pooled():
    h = Harness()
    session, ct, server, st_ = h.linked()
    q = m.query("SELECT 1")
    session.got_data(q)
    server.got_data(RESULT + m.ready_for_query())
    st_.clear()
    session.got_data(m.terminate())
    assert queries(st_.value()) == ["DISCARD ALL"]
    assert types(st_.value()) == "Q"  # no Terminate went to the node
    assert ct.disconnecting and session.state == "closed"
    assert server.state == "internal" and server in h.pool.busy
    ct.clear()
    finish_internal(server)
    assert ct.value() == b""  # the reset's result went nowhere
    assert list(h.pool.idle) == [server] and server.state == "idle"
    session.connection_lost(Failure(ConnectionDone()))
    assert session.id not in h.proxy.clients
    assert session.process_id not in h.proxy.cancel_keys
    # The next client gets the same server connection.
    other, oct_ = h.client()
    assert other.server is server and len(h.proxy.servers) == 1


def test_query_and_terminate_in_one_read():
    h = Harness()
    session, ct, server, st_ = h.linked()
    q = m.query("SELECT pg_sleep(10)")
    session.got_data(q + m.terminate())
    assert st_.value().startswith(q)
    # The node still owes an answer: the connection cannot be reused.
    assert st_.disconnecting and server not in h.pool.idle
    assert any(isinstance(f, CancelFactory) for _, _, f, _, _ in h.clock.tcpClients)


def test_terminate_inside_a_transaction_rolls_back_before_reset():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.query("BEGIN"))
    server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    st_.clear()
    session.got_data(m.terminate())
    assert queries(st_.value()) == ["ROLLBACK", "DISCARD ALL"]
    server.got_data(m.command_complete("ROLLBACK") + m.ready_for_query())
    assert server.state == "internal"
    finish_internal(server)
    assert list(h.pool.idle) == [server]


def test_client_disconnect_mid_query_closes_the_server():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.query("SELECT pg_sleep(100)"))
    session.connection_lost(Failure(ConnectionLost()))
    assert st_.disconnecting
    assert server not in h.pool.idle and server not in h.pool.busy
    assert queries(st_.value()) == ["SELECT pg_sleep(100)"]  # no reset query was sent
    # and the node is asked to stop working for nobody
    (cancel,) = [f for _, _, f, _, _ in h.clock.tcpClients if isinstance(f, CancelFactory)]
    assert (cancel.process_id, cancel.secret_key) == (NODE_PID, NODE_KEY)
    assert ct.producer is None and st_.producer is None
    server.connection_lost(Failure(ConnectionDone()))
    assert h.pool.total == 0


def test_client_disconnect_mid_extended_batch_closes_the_server():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.parse("", "SELECT 1") + m.bind("", ""))  # no Sync yet
    session.connection_lost(Failure(ConnectionLost()))
    assert st_.disconnecting and server not in h.pool.idle


def test_client_disconnect_mid_message_closes_the_server():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.query("SELECT 1")[:4])
    session.connection_lost(Failure(ConnectionLost()))
    assert st_.disconnecting


def test_client_disconnect_when_idle_pools_the_server():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.query("SELECT 1"))
    server.got_data(RESULT + m.ready_for_query())
    session.connection_lost(Failure(ConnectionLost()))
    assert not st_.disconnecting
    assert queries(st_.value())[-1] == "DISCARD ALL"
    finish_internal(server)
    assert list(h.pool.idle) == [server]


def test_node_closing_while_linked_at_boundary_gives_fatal_08006():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.query("SELECT 1"))
    server.connection_lost(Failure(ConnectionLost()))
    fields = m.decode_fields(messages(ct.value())[-1][1])
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate.CONNECTION_FAILURE)
    assert "db1:5432" in fields["M"]
    assert ct.disconnecting and session.state == "closed"
    assert ct.producer is None and st_.producer is None
    assert h.pool.total == 0
    session.connection_lost(Failure(ConnectionDone()))
    assert h.proxy.clients == {}


@pytest.mark.parametrize(
    "code, message",
    [
        ("57P01", "terminating connection due to administrator command"),
        ("25P03", "terminating connection due to idle-in-transaction timeout"),
        ("08P01", "invalid frontend message type 88"),
    ],
)
def test_session_mode_relays_the_nodes_fatal_and_adds_nothing(code, message):
    """Session pooling cannot carry the session: the node's FATAL, as it came, is the only error."""
    h = Harness()
    session, ct, server, st_ = h.linked()
    fatal = m.error_response("FATAL", code, message)
    server.got_data(fatal)
    assert ct.value() == fatal and server.fatal["C"] == code
    server.connection_lost(Failure(ConnectionDone()))
    assert ct.value() == fatal  # no second FATAL of pgtwist's own
    assert ct.disconnecting and session.state == "closed"
    assert h.proxy.counters.errors.get(code) == 1


def test_session_mode_error_replies_still_pass_through():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.query("SELEC 1"))
    reply = m.error_response("ERROR", "42601", 'syntax error at or near "SELEC"') + m.ready_for_query()
    server.got_data(reply)
    assert ct.value() == reply and server.fatal is None and session.state == "linked"


def test_node_closing_mid_message_just_closes_the_client():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.query("SELECT 1"))
    server.got_data(RESULT[:10])
    ct.clear()
    server.connection_lost(Failure(ConnectionLost()))
    assert ct.value() == b"" and ct.disconnecting  # an error now would land inside a message


def test_node_garbage_while_linked_closes_it():
    h = Harness()
    session, ct, server, st_ = h.linked()
    server.got_data(b"D\x00\x00\x00\x01")
    assert st_.disconnecting
    server.connection_lost(Failure(ConnectionDone()))
    assert ct.disconnecting and ct.value() == b""


def test_client_garbage_while_linked_is_fatal_and_drops_the_server():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(b"Q\x00\x00\x00\x02")
    fields = m.decode_fields(messages(ct.value())[-1][1])
    assert fields["C"] == sqlstate.PROTOCOL_VIOLATION
    assert st_.disconnecting and server not in h.pool.idle


def test_waiting_client_gets_server_released_by_another():
    h = Harness()
    a, _, server, _ = h.linked()
    b, _, _, _ = h.linked()
    c, cct = h.client()
    assert c.state == "waiting" and len(h.proxy.servers) == 2
    a.got_data(m.terminate())
    finish_internal(server)
    assert c.state == "linked" and c.server is server
    assert types(cct.value()).endswith("KZ")


def test_wait_timeout_tells_the_client():
    h = Harness()
    h.linked()
    h.linked()
    c, cct = h.client()
    h.clock.advance(30)
    fields = m.decode_fields(messages(cct.value())[-1][1])
    assert fields["C"] == sqlstate.TOO_MANY_CONNECTIONS and cct.disconnecting


def test_client_leaving_while_waiting_leaves_the_queue():
    h = Harness()
    a, _, server, _ = h.linked()
    h.linked()
    c, cct = h.client()
    c.connection_lost(Failure(ConnectionDone()))
    assert not h.pool.waiters
    a.got_data(m.terminate())
    finish_internal(server)
    assert list(h.pool.idle) == [server]


def test_client_leaving_while_preparing_returns_the_server():
    h = Harness()
    session, ct = h.client(application_name="x")
    server = session.server
    assert session.state == "preparing"
    session.connection_lost(Failure(ConnectionDone()))
    server.transport.clear()
    finish_internal(server, params=[("application_name", "x")])
    assert queries(server.transport.value()) == ["DISCARD ALL"]
    finish_internal(server, params=[("application_name", "")])
    assert list(h.pool.idle) == [server]


def test_node_closing_while_preparing_gives_08006():
    h = Harness()
    session, ct = h.client(application_name="x")
    server = session.server
    server.connection_lost(Failure(ConnectionLost()))
    fields = m.decode_fields(messages(ct.value())[-1][1])
    assert fields["C"] == sqlstate.CONNECTION_FAILURE and ct.disconnecting
    assert h.pool.total == 0


def test_idle_server_killed_by_node_is_dropped():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.terminate())
    finish_internal(server)
    st_.clear()
    server.got_data(m.error_response("FATAL", "57P01", "terminating connection due to administrator command"))
    assert st_.disconnecting and st_.value() == m.terminate()
    server.connection_lost(Failure(ConnectionDone()))
    assert h.pool.total == 0


def test_messages_after_the_last_internal_ready_reach_the_client():
    """A message the node sends right behind the ReadyForQuery that ends the preparation is the client's."""
    h = Harness()
    session, ct = h.client(application_name="x")
    server = session.server
    notice = m.notice_response("01000", "hello")
    server.got_data(m.command_complete("SELECT 1") + m.ready_for_query() + notice)
    assert session.state == "linked"
    assert ct.value().endswith(m.ready_for_query() + notice)


def test_messages_after_login_ready_reach_the_client():
    h = Harness()
    h.proxy.auto_login = False
    session, ct = h.client()
    (server,) = h.proxy.servers
    notice = m.notice_response("01000", "hello")
    server.got_data(node_welcome() + notice)
    assert session.state == "linked"
    assert ct.value().endswith(m.ready_for_query() + notice)


# -- the real connect_server, through the MemoryReactorClock ----------------------------------


class NoDelayTransport(StringTransport):
    def setTcpNoDelay(self, enabled):
        self.nodelay = enabled


def test_real_connect_server_and_its_timeout():
    proxy = Proxy(make_config(), MemoryReactorClock())
    transport = StringTransport(lenient=True)
    session = proxy.new_client(transport)
    session.got_data(m.startup_message({"user": "app", "database": "appdb"}))
    host, port, factory, timeout, _ = proxy.reactor.tcpClients[0]
    assert (host, port, timeout) == ("db1", 5432, 5)
    assert isinstance(factory, BackendFactory)
    proxy.reactor.advance(5)
    fields = m.decode_fields(messages(transport.value())[-1][1])
    assert fields["C"] == sqlstate.CONNECTION_FAILURE and "timed out" in fields["M"]


def test_real_connect_server_logs_in():
    proxy = Proxy(make_config(), MemoryReactorClock())
    transport = StringTransport(lenient=True)
    session = proxy.new_client(transport)
    session.got_data(m.startup_message({"user": "app", "database": "appdb"}))
    factory = proxy.reactor.tcpClients[0][2]
    protocol = factory.buildProtocol(None)
    node = NoDelayTransport(lenient=True)
    protocol.makeConnection(node)
    assert node.nodelay is True
    protocol.dataReceived(node_welcome())
    assert session.state == "linked"
    # The connect timeout was cancelled; only the pool's one wait timer is left, to lapse on its own.
    assert [c.func.__name__ for c in proxy.reactor.getDelayedCalls()] == ["_wait_timer_fired"]
    q = m.query("SELECT 1")
    session.got_data(q)
    assert node.value().endswith(q)


def test_real_connect_refused_gives_08006():
    proxy = Proxy(make_config(), MemoryReactorClock())
    transport = StringTransport(lenient=True)
    session = proxy.new_client(transport)
    session.got_data(m.startup_message({"user": "app", "database": "appdb"}))
    connector = proxy.reactor.connectors[0]
    factory = proxy.reactor.tcpClients[0][2]
    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    fields = m.decode_fields(messages(transport.value())[-1][1])
    assert fields["C"] == sqlstate.CONNECTION_FAILURE and "could not connect" in fields["M"]


def test_resets_are_told_from_assignments():
    from pgtwist.routing.analysis import session_effects as inspect

    assert inspect("RESET application_name").resets == ("application_name",)
    assert inspect("SET TimeZone TO DEFAULT").resets == ("timezone",)
    assert inspect("SET LOCAL TimeZone TO DEFAULT").resets == ()
    assert inspect("SET TimeZone TO 'UTC'").resets == () and inspect("SET TimeZone TO 'UTC'").assigned == {"timezone"}


@pytest.mark.parametrize("on", [True, False])
def test_connection_log_lines_follow_log_connections_and_log_disconnections(on):
    from twisted.logger import globalLogPublisher

    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = Harness(log_connections=on, log_disconnections=on)
        session, ct = h.client()
        session.got_data(m.terminate())
        session.connection_lost(None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    formats = [e.get("log_format", "") for e in events]
    assert any("connected from" in f for f in formats) is on
    assert any("disconnected:" in f for f in formats) is on


def test_logins_with_one_startup_packet_each_get_settings_of_their_own():
    # The settings derived from a startup packet are derived once (admission._derived) and
    # shared read-only; each session changes a copy of its own (as a SET it runs does).
    h = Harness(pool_mode="transaction")
    first, _ = h.client(options="-c search_path=a")
    second, _ = h.client(options="-c search_path=a")
    assert first.settings == second.settings and first.settings is not second.settings
    first.settings["search_path"] = "b"
    assert second.settings["search_path"] == "a"
    assert first._startup_settings["search_path"] == second._startup_settings["search_path"] == "a"
    with pytest.raises(TypeError):
        first._startup_settings["search_path"] = "c"  # type: ignore[index]


def test_a_refused_startup_option_is_refused_at_every_login():
    h = Harness(pool_mode="transaction")
    for _ in range(2):
        session, ct = h.client(options="-X")
        fields = m.decode_fields(messages(ct.value())[-1][1])
        assert fields["S"] == "FATAL" and fields["C"] == "0A000" and session.state == "closed"


def test_a_clients_bytes_count_for_its_database_from_its_first_read_after_the_login():
    # SHOW STATS total_received, counted by the session on every read (FrontendProtocol hands
    # reads straight to it): the startup packet, read before the database is known, is not.
    h = Harness(pool_mode="transaction")
    session, _ = h.client()
    stats = h.proxy.counters.database("appdb")
    assert stats.received == 0
    q = m.query("SELECT 1")
    session.got_data(q[:3])
    session.got_data(q[3:])
    assert stats.received == len(q)
