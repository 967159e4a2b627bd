"""Transaction pooling when a node goes away: replay, 08006 in place, orphaned transactions, failover_wait; lending.

The real Proxy, ClientSession, Pool and ServerConnection on StringTransports and a
MemoryReactorClock (tests.harness.session); a clustered database gets a fake monitor.
"""

import pytest

from pgtwist.pooling.relay import SIMPLE_CAPTURE
from pgtwist.routing.router import DatabaseRouter
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.framing import frame

from tests.harness.routing import R1, R2, FakeMonitor, P
from tests.harness.session import (
    DATA_ROW,
    RESULT,
    ROW_DESCRIPTION,
    Z_FAILED,
    Z_IDLE,
    Z_IN,
    Proxy4Test,
    RecordingTransport,
    Setup,
    begin,
    error_fields,
    extended,
    keeps_its_server,
    lose,
    make_config,
    messages,
    queries,
    sent,
    types,
)


def test_a_login_while_there_is_no_primary_learns_what_to_report_from_a_replica():
    """A failover under way: new clients may still read, so their logins must not wait for a primary."""
    s = Setup()
    s.set_up(P, False)
    transport = RecordingTransport()
    session = s.proxy.new_client(transport)
    session.got_data(m.startup_message({"user": "app", "database": "appdb"}))
    (login_pool,) = s.proxy.pools.values()
    assert str(login_pool.node) in (R1, R2) and session.logged_in
    # (The front door takes writes once a primary is back: it says so, as every other login.)
    told = dict(m.decode_parameter_status(b) for t, b in messages(transport.value()) if t == p.PARAMETER_STATUS)
    assert told.get("in_hot_standby", "off") == "off"
    assert not login_pool.login_parameters  # what a replica said is not what later logins are told
    session.got_data(m.query("SELECT 1"))
    assert str(session.server.node) in (R1, R2)


# -- replay of reads that got nothing back -------------------------------------------------------


def test_clustered_login_keeps_its_primary_connection_until_the_work_needs_another_node():
    s = Setup()
    session, ct = s.client()
    (login_pool,) = s.proxy.pools.values()
    login_server = s.proxy.servers[0]
    assert str(login_pool.node) == P and login_pool.lent == {login_server: session}
    assert session.state == "linked" and keeps_its_server(session)
    session.got_data(m.query("SELECT 1"))  # a read: it belongs on a replica
    assert str(session.server.node) in (R1, R2)
    assert list(login_pool.idle) == [login_server] and not login_pool.lent


def test_read_with_no_byte_back_is_replayed_on_another_node():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    first = session.server
    assert str(first.node) in (R1, R2)
    assert queries(sent(first)) == ["SELECT 1"]
    lose(first)
    assert s.monitor.marked == [(str(first.node), "connection lost")]
    second = session.server
    assert second is not None and second is not first
    assert str(second.node) in (R1, R2) and second.node != first.node
    assert queries(sent(second)) == ["SELECT 1"]
    assert ct.value() == b""  # the client noticed nothing
    second.got_data(RESULT + Z_IDLE)
    assert ct.value() == RESULT + Z_IDLE
    assert session.state == "linked" and keeps_its_server(session) and session.server is second
    assert s.pool(str(second.node)).lent == {second: session}


def test_read_replayed_after_the_node_said_it_is_crashing_and_left():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    first = session.server
    sent(first)
    first.got_data(m.error_response("FATAL", "57P02", "terminating connection because of crash of another server process"))
    assert ct.value() == b"" and session.relay.server_fatal is not None
    lose(first)
    assert s.monitor.marked and s.monitor.marked[0][0] == str(first.node)
    second = session.server
    assert queries(sent(second)) == ["SELECT 1"]
    assert session.relay.server_fatal is None
    second.got_data(RESULT + Z_IDLE)
    assert ct.value() == RESULT + Z_IDLE


def test_a_read_whose_backend_was_terminated_gets_the_nodes_error_and_is_not_run_again():
    """pg_terminate_backend() (57P01) ended that work on purpose: the client hears so, the session goes on."""
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("SELECT pg_sleep(10)"))
    first = session.server
    sent(first)
    first.got_data(m.error_response("FATAL", "57P01", "terminating connection due to administrator command"))
    lose(first)
    assert types(ct.value()) == "EZ" and ct.value().endswith(Z_IDLE)
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["V"], fields["C"]) == ("ERROR", "ERROR", "57P01")
    assert fields["M"] == "terminating connection due to administrator command"
    assert "pgtwist kept this session" in fields["D"] and "ROLLBACK" not in fields["D"]
    # The node is not marked down: it is probed, as a fast shutdown says the same words.
    assert s.monitor.marked == [] and [n for n, _ in s.monitor.verified] == [str(first.node)]
    assert not ct.disconnecting and session.state == "idle" and session.server is None
    ct.clear()
    session.got_data(m.query("SELECT 2"))
    again = session.server
    assert queries(sent(again)) == ["SELECT 2"]
    again.got_data(RESULT + Z_IDLE)
    assert ct.value() == RESULT + Z_IDLE


@pytest.mark.parametrize("code", ["08P01", "25P03", "57P05"])
def test_a_fatal_about_one_session_never_touches_the_nodes_health(code):
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("INSERT INTO t VALUES (1)"))
    first = session.server
    first.got_data(m.error_response("FATAL", code, "about this session only"))
    lose(first)
    assert s.monitor.marked == [] and s.monitor.verified == []
    assert all(state.up for state in s.monitor.states.values())


def test_a_clients_protocol_error_closes_that_client_with_the_nodes_fatal_alone():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    first = session.server
    first.got_data(m.error_response("FATAL", "08P01", "invalid frontend message type 88"))
    lose(first)
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "08P01", "invalid frontend message type 88")
    assert types(ct.value()) == "E" and ct.disconnecting
    assert s.monitor.marked == [] and s.monitor.verified == []


def test_extended_read_with_a_named_statement_is_replayed():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.parse("s1", "SELECT 1") + m.bind("", "s1") + m.execute() + m.sync())
    first = session.server
    sent(first)
    lose(first)
    second = session.server
    out = sent(second)
    assert types(out) == "PBES"
    assert "s1" in session.relay.statements
    reply = frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + DATA_ROW + m.command_complete("SELECT 1") + Z_IDLE
    second.got_data(reply)
    assert ct.value() == reply


def test_read_with_part_of_the_result_forwarded_gets_08006_and_the_session_goes_on():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    first = session.server
    first.got_data(ROW_DESCRIPTION + DATA_ROW)
    assert ct.value() == ROW_DESCRIPTION + DATA_ROW
    ct.clear()
    lose(first)
    assert types(ct.value()) == "EZ"
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"]) == ("ERROR", sqlstate.CONNECTION_FAILURE)
    assert str(first.node) in fields["M"]
    assert ct.value().endswith(Z_IDLE)
    assert not ct.disconnecting and session.state == "idle" and not session.orphaned
    ct.clear()
    session.got_data(m.query("SELECT 2"))
    second = session.server
    assert second is not first and queries(sent(second)) == ["SELECT 2"]
    second.got_data(RESULT + Z_IDLE)
    assert ct.value() == RESULT + Z_IDLE


def test_each_owed_request_gets_its_error_and_ready_for_query():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("SELECT 1") + m.query("SELECT 2"))
    first = session.server
    first.got_data(ROW_DESCRIPTION)
    ct.clear()
    lose(first)
    assert types(ct.value()) == "EZEZ"
    assert ct.value().endswith(Z_IDLE)
    assert session.state == "idle"


def test_the_nodes_own_code_and_words_are_the_error():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    first = session.server
    first.got_data(ROW_DESCRIPTION + m.error_response("FATAL", "57P01", "terminating connection due to administrator command"))
    ct.clear()
    lose(first)
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"]) == ("ERROR", "57P01")
    assert fields["M"] == "terminating connection due to administrator command"
    assert str(first.node) in fields["D"]


def test_a_write_is_never_replayed():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("INSERT INTO t VALUES (1)"))
    first = session.server
    assert str(first.node) == P
    lose(first)
    assert types(ct.value()) == "EZ"
    assert error_fields(ct.value())[0]["C"] == sqlstate.CONNECTION_FAILURE
    assert "could have had effects" in error_fields(ct.value())[0]["D"]
    assert session.state == "idle" and session.server is None


def test_node_closing_mid_message_closes_the_client():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    first = session.server
    first.got_data(RESULT[:7])
    ct.clear()
    lose(first)
    assert ct.value() == b"" and ct.disconnecting and session.state == "closed"


# -- a transaction dies with its node -------------------------------------------------------------


@pytest.mark.parametrize("clustered", [True, False], ids=["cluster", "single"])
def test_transaction_orphaned_by_the_node_fails_until_rollback(clustered):
    s = Setup(clustered=clustered)
    session, ct = s.client()
    server = begin(s, session)
    ct.clear()
    lose(server)
    # Idle in its transaction: nothing is said until the client speaks.
    assert ct.value() == b"" and not ct.disconnecting
    assert session.state == "idle" and session.orphaned and session.server is None
    session.got_data(m.query("SELECT 1"))
    assert types(ct.value()) == "EZ" and ct.value().endswith(Z_FAILED)
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"]) == ("ERROR", sqlstate.CONNECTION_FAILURE)
    assert "ROLLBACK" in fields["D"]
    ct.clear()
    session.got_data(m.query("INSERT INTO t VALUES (1)"))
    (fields,) = error_fields(ct.value())
    assert fields["C"] == sqlstate.IN_FAILED_SQL_TRANSACTION == "25P02"
    assert ct.value().endswith(Z_FAILED)
    ct.clear()
    servers_before = len(s.proxy.servers)
    session.got_data(m.query("ROLLBACK"))
    assert ct.value() == m.command_complete("ROLLBACK") + Z_IDLE
    assert not session.orphaned and session.server is None
    assert len(s.proxy.servers) == servers_before  # answered by the proxy
    assert session.idle_at_rest()  # (nothing asked is pending: answered here)
    ct.clear()
    session.got_data(m.query("SELECT 2"))
    again = session.server
    assert again is not None and again is not server
    assert queries(sent(again)) == ["SELECT 2"]
    again.got_data(RESULT + Z_IDLE)
    assert ct.value() == RESULT + Z_IDLE


def test_commit_of_an_orphaned_transaction_says_rollback():
    s = Setup()
    session, ct = s.client()
    lose(begin(s, session))
    session.got_data(m.query("COMMIT"))
    assert ct.value() == m.command_complete("ROLLBACK") + Z_IDLE
    assert not session.orphaned


def test_node_dying_under_a_statement_in_a_transaction_answers_it_and_orphans():
    s = Setup()
    session, ct = s.client()
    server = begin(s, session)
    session.got_data(m.query("UPDATE t SET x = 1"))
    ct.clear()
    lose(server)
    assert types(ct.value()) == "EZ" and ct.value().endswith(Z_FAILED)
    assert session.orphaned
    ct.clear()
    session.got_data(m.query("SELECT 1"))
    assert error_fields(ct.value())[0]["C"] == "25P02"  # the 08006 was said already


@pytest.mark.parametrize("clustered", [True, False], ids=["cluster", "single"])
def test_orphaned_transaction_with_the_extended_protocol(clustered):
    s = Setup(clustered=clustered)
    session, ct = s.client()
    server = begin(s, session)
    ct.clear()
    lose(server)
    session.got_data(extended("SELECT 1"))
    assert types(ct.value()) == "EZ" and ct.value().endswith(Z_FAILED)
    assert error_fields(ct.value())[0]["C"] == sqlstate.CONNECTION_FAILURE
    ct.clear()
    session.got_data(extended("SELECT 2"))
    assert types(ct.value()) == "EZ" and error_fields(ct.value())[0]["C"] == "25P02"
    ct.clear()
    session.got_data(m.parse("", "ROLLBACK") + m.bind("", "") + m.describe("P", "") + m.execute() + m.sync())
    assert ct.value() == frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + frame(p.NO_DATA) + m.command_complete("ROLLBACK") + Z_IDLE
    assert not session.orphaned
    ct.clear()
    session.got_data(extended("SELECT 3"))
    again = session.server
    assert again is not None and types(sent(again)) == "PBES"


def test_orphaned_transaction_ended_by_a_named_rollback_statement():
    s = Setup()
    session, ct = s.client()
    server = begin(s, session)
    session.got_data(m.parse("rb", "ROLLBACK") + m.sync())
    server.got_data(frame(p.PARSE_COMPLETE) + Z_IN)
    lose(server)
    ct.clear()
    session.got_data(m.bind("", "rb") + m.execute() + m.sync())
    # (Like PostgreSQL's, a failed transaction's ROLLBACK just succeeds: the 08006 goes unsaid.)
    assert ct.value() == frame(p.BIND_COMPLETE) + m.command_complete("ROLLBACK") + Z_IDLE
    assert not session.orphaned


def test_orphaned_rollback_batch_split_over_reads():
    s = Setup()
    session, ct = s.client()
    lose(begin(s, session))
    session.got_data(m.query("SELECT 1"))
    ct.clear()
    # The batch arrives in two reads: nothing is answered before its Sync, and it is one ROLLBACK.
    session.got_data(m.parse("", "ROLLBACK") + m.bind("", "") + m.execute())
    assert ct.value() == b""
    session.got_data(m.sync())
    assert ct.value() == frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + m.command_complete("ROLLBACK") + Z_IDLE
    assert not session.orphaned


def test_statements_pipelined_behind_the_rollback_run_on_a_server():
    s = Setup()
    session, ct = s.client()
    lose(begin(s, session))
    session.got_data(m.query("SELECT 1"))
    ct.clear()
    session.got_data(m.query("ROLLBACK") + m.query("SELECT 2"))
    assert ct.value() == m.command_complete("ROLLBACK") + Z_IDLE
    assert not session.orphaned
    server = session.server
    assert server is not None and queries(sent(server)) == ["SELECT 2"]
    server.got_data(RESULT + Z_IDLE)
    assert ct.value() == m.command_complete("ROLLBACK") + Z_IDLE + RESULT + Z_IDLE


def test_terminate_while_orphaned_closes_quietly():
    s = Setup()
    session, ct = s.client()
    lose(begin(s, session))
    session.got_data(m.terminate())
    assert ct.disconnecting and ct.value() == b"" and session.state == "closed"


# -- no node at all for failover_wait ---------------------------------------------------------------


def test_no_node_for_failover_wait_fails_the_work_with_an_error_and_the_session_goes_on():
    s = Setup(failover_wait=2.0)
    session, ct = s.client()
    for name in (P, R1, R2):
        s.set_up(name, False)
    session.got_data(m.query("SELECT 1"))
    assert session.state == "waiting" and ct.producerState == "paused"
    s.clock.pump([0.25] * 7)  # 1.75 s: still waiting for a node
    assert ct.value() == b"" and session.state == "waiting"
    s.clock.pump([0.25] * 2)
    assert types(ct.value()) == "EZ"
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["V"], fields["C"]) == ("ERROR", "ERROR", sqlstate.CONNECTION_FAILURE)
    assert 'database "appdb"' in fields["M"]
    assert ct.value().endswith(Z_IDLE)
    assert session.state == "idle" and not ct.disconnecting and ct.producerState == "producing"
    assert s.clock.getDelayedCalls() == []  # no retry left behind
    # A node comes back: the next statement runs.
    ct.clear()
    s.set_up(R1, True)
    session.got_data(m.query("SELECT 2"))
    assert str(session.server.node) == R1 and queries(sent(session.server)) == ["SELECT 2"]


def _asked_with_every_node_down(failover_wait: float, sql: str):
    s = Setup(failover_wait=failover_wait)
    session, ct = s.client()
    for name in (P, R1, R2):
        s.set_up(name, False)
    session.got_data(m.query(sql))
    return s, session, ct


def test_work_waiting_for_a_node_runs_when_one_comes_back_in_time():
    s, session, ct = _asked_with_every_node_down(5.0, "INSERT INTO t VALUES (1)")
    s.clock.pump([0.25] * 4)
    assert session.state == "waiting"
    s.set_up(P, True)
    s.clock.pump([0.25])
    assert session.state == "linked" and str(session.server.node) == P
    assert queries(sent(session.server)) == ["INSERT INTO t VALUES (1)"]
    assert ct.value() == b""


def test_extended_work_failing_after_failover_wait_gets_one_error_per_batch():
    s = Setup(failover_wait=1.0)
    session, ct = s.client()
    for name in (P, R1, R2):
        s.set_up(name, False)
    session.got_data(extended("SELECT 1") + extended("SELECT 2"))
    s.clock.pump([0.25] * 5)
    assert types(ct.value()) == "EZEZ"
    assert all(f["S"] == "ERROR" for f in error_fields(ct.value()))
    assert session.state == "idle"


# -- lending the server connection between transactions (a single node) ------------------------------


def test_a_client_keeps_its_server_between_transactions_until_another_needs_it():
    s = Setup(clustered=False)
    a, act = s.client()
    (pool,) = s.proxy.pools.values()
    server = a.server
    assert a.state == "linked" and keeps_its_server(a) and pool.lent == {server: a}
    a.got_data(m.query("SELECT 1"))
    assert pool.lent == {}  # its own transaction now
    assert queries(sent(server)) == ["SELECT 1"]
    server.got_data(RESULT + Z_IDLE)
    assert act.value() == RESULT + Z_IDLE
    assert pool.lent == {server: a} and a.server is server and a.state == "linked"
    # Another client needs a connection and none is idle: a gives its back.
    b, bct = s.client()
    assert b.state == "idle" and len(s.proxy.servers) == 1  # a login with known parameters needs none
    b.got_data(m.query("SELECT 2"))
    assert b.server is server and a.server is None and a.state == "idle" and not keeps_its_server(a)
    assert queries(sent(server)) == ["SELECT 2"]
    assert pool.lent == {} and server in pool.busy
    # a speaks again while b's transaction runs: a new connection.
    a.got_data(m.query("SELECT 3"))
    assert a.state == "linked" and a.server is not server and len(s.proxy.servers) == 2
    assert queries(sent(a.server)) == ["SELECT 3"]
    a.server.got_data(RESULT + Z_IDLE)
    server.got_data(RESULT + Z_IDLE)
    assert act.value().endswith(RESULT + Z_IDLE) and bct.value() == RESULT + Z_IDLE
    assert set(pool.lent.values()) == {a, b}


def test_a_lent_server_is_reclaimed_and_the_first_client_gets_one_again():
    s = Setup(clustered=False, pool_size=1)
    a, act = s.client()
    (pool,) = s.proxy.pools.values()
    server = a.server
    b, bct = s.client()
    b.got_data(m.query("SELECT 1"))
    assert b.server is server and a.state == "idle"
    a.got_data(m.query("SELECT 2"))  # pool_size 1 and b is running: a waits
    assert a.state == "waiting" and len(pool.waiters) == 1
    server.got_data(RESULT + Z_IDLE)  # b is done; with a waiting, the connection goes back, not lent
    assert bct.value() == RESULT + Z_IDLE
    assert b.state == "idle" and not keeps_its_server(b)
    assert a.server is server and a.state == "linked"
    assert queries(sent(server)) == ["SELECT 1", "SELECT 2"]


def test_a_lent_server_dying_between_transactions():
    s = Setup(clustered=False)
    a, act = s.client()
    server = a.server
    lose(server)
    assert act.value() == b"" and a.state == "idle" and not a.orphaned and not keeps_its_server(a)
    a.got_data(m.query("SELECT 1"))
    assert a.server is not server and queries(sent(a.server)) == ["SELECT 1"]


def test_in_a_cluster_a_kept_connection_serves_only_work_placed_on_its_node():
    """Lent between transactions as with one node; each transaction is still placed anew, and the
    kept connection serves it only when the placement lands on its node."""
    s = Setup()
    s.set_up(R2, False)  # reads: R1 only
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    reader = session.server
    assert str(reader.node) == R1 and queries(sent(reader)) == ["SELECT 1"]
    reader.got_data(RESULT + Z_IDLE)
    assert keeps_its_server(session) and s.pool(R1).lent == {reader: session}
    # Another read: placed on R1 again, so it runs on the kept connection (no new link).
    servers = len(s.proxy.servers)
    session.got_data(m.query("SELECT 2"))
    assert session.server is reader and queries(sent(reader)) == ["SELECT 2"] and len(s.proxy.servers) == servers
    assert session.decision.want == "replica"
    reader.got_data(RESULT + Z_IDLE)
    # A write: placed on the primary; the replica connection goes back to its pool.
    session.got_data(m.query("INSERT INTO t VALUES (1)"))
    assert str(session.server.node) == P and queries(sent(session.server)) == ["INSERT INTO t VALUES (1)"]
    assert reader in s.pool(R1).idle and not s.pool(R1).lent


def test_work_placed_away_from_the_kept_connection_is_placed_once():
    """One decision per transaction, kept connection or not: reads keep spreading as before."""
    s = Setup()
    session, ct = s.client()  # keeping its login connection to the primary
    router = s.proxy.routers["appdb"]
    placed = []
    for sql in ("SELECT 1", "SELECT 2", "SELECT 3", "SELECT 4"):
        before = router._rr
        session.got_data(m.query(sql))
        assert router._rr == before + 1, sql
        placed.append(str(session.server.node))
        session.server.got_data(RESULT + Z_IDLE)
    assert set(placed) == {R1, R2}


def test_in_a_cluster_a_routing_hook_means_no_lending():
    s = Setup()
    s.proxy.routers["appdb"].hook = lambda classification, identity: "replica"
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    server = session.server
    server.got_data(RESULT + Z_IDLE)
    assert session.server is None and not keeps_its_server(session)
    assert all(not pool.lent for pool in s.proxy.pools.values())


# -- the hot path ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("clustered", [True, False], ids=["cluster", "single"])
def test_ready_for_query_at_the_end_of_a_read_is_forwarded_as_the_same_bytes(clustered):
    s = Setup(clustered=clustered)
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    server = session.server
    data = RESULT + Z_IDLE
    server.got_data(data)
    assert ct.value() == data
    assert any(w is data for w in ct.writes)


def test_ready_for_query_at_the_end_of_a_read_in_session_mode_too():
    proxy = Proxy4Test(make_config())  # pool_mode session
    transport = RecordingTransport()
    session = proxy.new_client(transport)
    session.got_data(m.startup_message({"user": "app", "database": "appdb"}))
    session.got_data(m.query("SELECT 1"))
    data = RESULT + Z_IDLE
    session.server.got_data(data)
    assert any(w is data for w in transport.writes)


def test_a_read_on_a_kept_connection_is_replayed_when_the_node_drops_it():
    """Lending keeps one link over many transactions: each transaction is judged afresh for replay."""
    s = Setup(clustered=False)
    a, act = s.client()
    server = a.server
    a.got_data(m.query("SELECT 1"))
    server.got_data(RESULT + Z_IDLE)  # answered: this transaction is done, the link stays
    act.clear()
    assert queries(sent(server)) == ["SELECT 1"]
    a.got_data(m.query("SELECT 2"))
    lose(server)  # e.g. pg_terminate_backend before any byte of the answer
    again = a.server
    assert again is not None and again is not server
    assert queries(sent(again)) == ["SELECT 2"] and act.value() == b""
    again.got_data(RESULT + Z_IDLE)
    assert act.value() == RESULT + Z_IDLE


def test_a_prepared_statement_run_again_on_a_kept_connection_passes_through():
    s = Setup(clustered=False)
    a, act = s.client()
    server = a.server
    a.got_data(m.parse("P_0", "SELECT $1::int", [23]) + m.sync())
    (shared,) = [b for t, b in messages(sent(server)) if t == p.PARSE]
    shared_name = shared.split(b"\x00", 1)[0].decode()
    assert shared_name.startswith("pgtwist_")
    server.got_data(frame(p.PARSE_COMPLETE) + Z_IDLE)
    act.clear()
    run = m.bind("", "P_0", [b"7"]) + m.execute() + m.sync()
    a.got_data(run)
    out = sent(server)
    assert types(out) == "BES"
    assert messages(out)[0][1] == m.bind("", shared_name, [b"7"])[5:]  # only the name changed
    assert server.scanner.capture == SIMPLE_CAPTURE  # (ReadyForQuery, ParameterStatus, errors, CopyInResponse)
    reply = frame(p.BIND_COMPLETE) + RESULT + Z_IDLE
    server.got_data(reply)
    assert act.value() == reply and keeps_its_server(a)
    # A statement the connection does not hold takes the general path (it is prepared there first).
    server.statements.discard(shared_name)
    a.got_data(run)
    assert types(sent(server)) == "PBES"


# -- a server connection the node ended on purpose (issue: killed server connections) ------------

TERMINATED = m.error_response("FATAL", "57P01", "terminating connection due to administrator command")
IDLE_TIMEOUT = m.error_response("FATAL", "25P03", "terminating connection due to idle-in-transaction timeout")


@pytest.mark.parametrize("clustered", [True, False], ids=["cluster", "single"])
def test_idle_in_transaction_timeout_is_told_with_its_own_code_and_the_session_goes_on(clustered):
    s = Setup(clustered=clustered)
    session, ct = s.client()
    server = begin(s, session)
    server.got_data(IDLE_TIMEOUT)
    lose(server)
    assert ct.value() == b"" and not ct.disconnecting and session.orphaned
    session.got_data(m.query("SELECT 1"))
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"]) == ("ERROR", "25P03")
    assert fields["M"] == "terminating connection due to idle-in-transaction timeout"
    assert "pgtwist kept this session" in fields["D"] and "ROLLBACK" in fields["D"]
    assert ct.value().endswith(Z_FAILED)
    ct.clear()
    session.got_data(m.query("ROLLBACK"))
    assert ct.value() == m.command_complete("ROLLBACK") + Z_IDLE
    if clustered:
        assert s.monitor.marked == [] and s.monitor.verified == []


def test_a_kept_connection_terminated_between_transactions_goes_unnoticed():
    s = Setup(clustered=False)
    session, ct = s.client()
    server = session.server
    assert keeps_its_server(session)
    server.got_data(TERMINATED)
    lose(server)
    assert ct.value() == b"" and not ct.disconnecting and session.state == "idle"
    session.got_data(m.query("SELECT 1"))
    again = session.server
    assert again is not server and queries(sent(again)) == ["SELECT 1"]


def test_a_pinned_session_is_closed_with_the_nodes_fatal_alone():
    s = Setup(clustered=False)
    session, ct = s.client()
    session.got_data(m.query("LISTEN x"))
    server = session.server
    server.got_data(m.command_complete("LISTEN") + Z_IDLE)
    assert session.pinned
    ct.clear()
    server.got_data(TERMINATED)
    assert ct.value() == b""  # held: the relay decides what the client hears once the node hangs up
    lose(server)
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["V"], fields["C"]) == ("FATAL", "FATAL", "57P01")
    assert types(ct.value()) == "E" and ct.disconnecting


@pytest.mark.parametrize("fatal", [TERMINATED, b""], ids=["57P01", "no word"])
def test_close_client_closes_a_client_whose_work_was_in_flight(fatal):
    s = Setup(on_server_loss="close_client")
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    server = session.server
    sent(server)
    if fatal:
        server.got_data(fatal)
    lose(server)
    (fields,) = error_fields(ct.value())
    assert fields["S"] == "FATAL" and fields["C"] == ("57P01" if fatal else sqlstate.CONNECTION_FAILURE)
    assert types(ct.value()) == "E" and ct.disconnecting and session.state == "closed"
    assert len(s.proxy.pools) and session.server is None  # (not replayed anywhere)


def test_close_client_closes_a_client_in_a_transaction():
    s = Setup(on_server_loss="close_client")
    session, ct = s.client()
    server = begin(s, session)
    server.got_data(IDLE_TIMEOUT)
    lose(server)
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"]) == ("FATAL", "25P03") and ct.disconnecting


def test_close_client_leaves_a_client_between_transactions_alone():
    s = Setup(clustered=False, on_server_loss="close_client")
    session, ct = s.client()
    server = session.server
    assert keeps_its_server(session)
    server.got_data(TERMINATED)
    lose(server)
    assert ct.value() == b"" and not ct.disconnecting and session.state == "idle"


def test_close_client_applies_to_open_sessions_after_a_reload():
    s = Setup()
    session, ct = s.client()
    s.proxy.config = make_config(
        pool_mode="transaction",
        databases={"appdb": {"dbname": "postgres", "nodes": [P, R1, R2], "pool_size": 2}},
        on_server_loss="close_client",
    )
    session.got_data(m.query("SELECT 1"))
    server = session.server
    server.got_data(TERMINATED)
    lose(server)
    assert ct.disconnecting and error_fields(ct.value())[0]["S"] == "FATAL"


def test_an_orphaned_transaction_answers_a_flush_at_once_as_postgresql_does():
    """asyncpg prepares with Parse, Describe, Flush and waits: the error must not wait for the Sync."""
    s = Setup()
    session, ct = s.client()
    server = begin(s, session)
    server.got_data(TERMINATED)
    lose(server)
    session.got_data(m.parse("stmt1", "SELECT 2") + m.describe("S", "stmt1") + m.flush())
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"]) == ("ERROR", "57P01") and types(ct.value()) == "E"
    ct.clear()
    session.got_data(m.sync())
    assert ct.value() == Z_FAILED
    ct.clear()
    session.got_data(m.parse("stmt2", "SELECT 3") + m.describe("S", "stmt2") + m.flush())
    assert [f["C"] for f in error_fields(ct.value())] == ["25P02"]
    session.got_data(m.sync())
    ct.clear()
    session.got_data(m.query("ROLLBACK"))
    assert ct.value() == m.command_complete("ROLLBACK") + Z_IDLE and not session.orphaned


def test_a_flush_already_sent_when_the_connection_dies_in_a_transaction_is_answered_at_once():
    """The race the integration test met: asyncpg's Parse, Describe, Flush reached the dying
    connection before pgtwist knew it was gone. The client waits for that Flush's answer."""
    s = Setup()
    session, ct = s.client()
    server = begin(s, session)
    ct.clear()
    session.got_data(m.parse("stmt1", "SELECT 2") + m.describe("S", "stmt1") + m.flush())
    server.got_data(TERMINATED)
    lose(server)
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"]) == ("ERROR", "57P01") and types(ct.value()) == "E"
    ct.clear()
    session.got_data(m.sync())
    assert ct.value() == Z_FAILED
    ct.clear()
    session.got_data(m.query("ROLLBACK"))
    assert ct.value() == m.command_complete("ROLLBACK") + Z_IDLE and not session.orphaned


def test_a_flush_already_sent_when_the_connection_dies_outside_a_transaction_is_answered_at_once():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.parse("stmt1", "SELECT 2") + m.describe("S", "stmt1") + m.flush())
    server = session.server
    server.got_data(TERMINATED)  # (ended on purpose: not replayed)
    lose(server)
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"]) == ("ERROR", "57P01") and types(ct.value()) == "E"
    ct.clear()
    # The rest of the batch is skipped, as PostgreSQL skips after an error; its Sync gets a ReadyForQuery.
    session.got_data(m.bind("", "stmt1") + m.execute() + m.sync())
    server2 = session.server
    assert server2 is not None and server2 is not server
    assert messages(server2.transport.value())[-1][0] == p.SYNC
    assert not [t for t, _ in messages(server2.transport.value()) if t in (p.BIND, p.EXECUTE)]
    server2.got_data(Z_IDLE)
    assert ct.value() == Z_IDLE


# -- auto_promote asks the primary once more before promoting -------------------------------------


class PromotingMonitor(FakeMonitor):
    """FakeMonitor + what auto_promote uses: running, probe_now (answered by the test), promote."""

    running = True

    def __init__(self, states, clock):
        super().__init__(states, clock)
        self.probes: list = []
        self.promoted: list[str] = []

    def probe_now(self, name=None):
        from twisted.internet import defer

        d = defer.Deferred()
        self.probes.append(d)
        return d

    def most_caught_up_replica(self):
        return self.states[R1]

    def promote(self, name):
        from twisted.internet import defer

        self.promoted.append(name)
        return defer.succeed(None)


def promoting_setup():
    s = Setup(auto_promote=True, failover_timeout=1.0)
    monitor = PromotingMonitor(list(s.monitor.states.values()), s.clock)
    database = s.proxy.config.databases["appdb"]
    s.proxy.routers["appdb"] = DatabaseRouter(database, s.proxy.config, monitor)
    return s, monitor, database


def test_auto_promote_promotes_only_if_the_primary_fails_a_fresh_probe():
    s, monitor, database = promoting_setup()
    monitor.states[P].up = False
    s.proxy._node_changed(database, monitor.states[P], "down")
    s.clock.advance(1.0)
    assert len(monitor.probes) == 1 and monitor.promoted == []  # asked again first
    monitor.probes[0].callback(monitor.states)  # still down
    assert monitor.promoted == [R1]


def test_auto_promote_does_not_promote_when_the_primary_answers_again():
    """Whatever marked the primary down (a flapping connection, live traffic): a probe that answers wins."""
    s, monitor, database = promoting_setup()
    monitor.states[P].up = False
    s.proxy._node_changed(database, monitor.states[P], "down")
    s.clock.advance(1.0)
    monitor.states[P].up = True
    monitor.probes[0].callback(monitor.states)
    assert monitor.promoted == []


def test_a_clients_bad_frame_answered_during_the_read_back_closes_that_client_only():
    """In a cluster a write is followed by the proxy's WAL read-back: a frame the node rejects with
    FATAL 08P01 then ends the connection under that internal query. The client goes, the node stays up."""
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("INSERT INTO t VALUES (1)"))
    server = session.server
    sent(server)
    server.got_data(m.command_complete("INSERT 0 1") + Z_IDLE)
    assert session.state == "preparing" and server.state == "internal"  # reading the WAL position back
    ct.clear()
    server.got_data(m.error_response("FATAL", "08P01", "invalid frontend message type 122"))
    lose(server)
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01") and ct.disconnecting
    assert s.monitor.marked == [] and s.monitor.verified == []


def test_a_node_dying_during_the_read_back_is_marked_down_and_the_session_goes_on():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("INSERT INTO t VALUES (1)"))
    server = session.server
    server.got_data(m.command_complete("INSERT 0 1") + Z_IDLE)
    ct.clear()
    lose(server)
    assert [n for n, _ in s.monitor.marked] == [P]
    assert ct.value() == b"" and not ct.disconnecting and session.state == "idle"
# -- found by the fuzz drill -------------------------------------------------------------------


def test_a_session_pinned_on_a_replica_never_holds_its_writes_back():
    # A batch placed on a replica pins the session there (SQL PREPARE): a write held back until
    # the replica's connection is released would wait for ever, for it never is.
    s = Setup()
    session, ct = s.client()
    first = m.parse("s1", "SELECT 1") + m.query("PREPARE q AS SELECT 1") + m.sync()
    session.got_data(first)
    server = session.server
    assert str(server.node) in (R1, R2) and session.pinned
    sent(server)
    server.got_data(frame(p.PARSE_COMPLETE) + m.command_complete("PREPARE") + Z_IDLE + Z_IDLE)
    session.got_data(m.query("ROLLBACK; SELECT 2"))
    assert session.server is server and not session.backlog
    assert sent(server) == m.query("ROLLBACK; SELECT 2")


def test_a_write_behind_an_unsynced_extended_read_is_not_split_off():
    # Held back there, it would wait for the replica, which waits for the Sync behind it.
    s = Setup()
    session, ct = s.client()
    session.got_data(m.parse("", "SELECT 1") + m.bind("", "") + m.execute() + m.query("INSERT INTO t VALUES (1)") + m.sync())
    server = session.server
    assert str(server.node) in (R1, R2)
    assert not session.backlog and b"INSERT" in sent(server)


def _failed_for_want_of_nodes():
    """A session whose SELECT 1 failed: every node down for longer than failover_wait (2 s)."""
    s, session, ct = _asked_with_every_node_down(2.0, "SELECT 1")
    s.clock.pump([0.25] * 9)
    assert types(ct.value()) == "EZ"  # failover_wait ran out: an error, and the session goes on
    return s, session, ct


def test_each_request_waits_its_own_failover_wait_for_a_node():
    """failover_wait runs from each placement: a request that comes a minute after another
    failed (or a read replayed after it ran for 30 s) still waits for a node to come back."""
    s, session, ct = _failed_for_want_of_nodes()
    ct.clear()
    s.clock.advance(60)
    session.got_data(m.query("SELECT 2"))  # every node still down
    assert types(ct.value()) == "" and session.state == "waiting"


def test_a_long_read_lost_with_its_node_is_replayed_within_a_whole_failover_wait():
    s = Setup(failover_wait=2.0)
    session, ct = s.client()
    session.got_data(m.query("SELECT pg_sleep(60)"))
    first = session.server
    s.clock.advance(30)  # no byte back for 30 s
    for name in (P, R1, R2):
        if name != str(first.node):
            s.set_up(name, False)
    lose(first)
    assert types(ct.value()) == "" and session.state == "waiting"


def test_a_request_answered_by_pgtwist_is_no_longer_pending():
    """After failover_wait ran out and pgtwist answered the request itself, nothing is asked:
    client_idle_timeout applies again, and the next request's query_timeout and latency run from
    that request, not from the failed one."""
    s, session, ct = _failed_for_want_of_nodes()
    assert session.idle_at_rest()
    s.clock.advance(60)
    for name in (P, R1, R2):
        s.set_up(name, True)
    session.got_data(m.query("SELECT 2"))
    assert session.state == "linked"
    assert not session.asked_before(s.clock.seconds() - 30)  # (query_timeout = 30 s would not cancel it)


def test_requests_answered_after_their_node_was_lost_are_no_longer_pending():
    s = Setup(failover_wait=2.0)
    session, ct = s.client()
    session.got_data(m.query("UPDATE t SET x = 1"))  # a write: never replayed
    lose(session.server)
    assert types(ct.value()) == "EZ"
    assert session.idle_at_rest()
