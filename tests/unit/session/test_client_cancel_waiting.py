"""A CancelRequest for work still in pgtwist (queued for a server connection, or behind pgtwist's own
statements on the one it got) cancels that work here, with PostgreSQL's 57014, and reaches no node."""

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.session import RESULT, Z_IDLE, RecordingTransport, Setup, finish_internal, queries, sent
from tests.unit.session.test_client_hand_over import client, commit, in_transaction, waits

CANCELLED = m.error_response_from_fields(m.error_fields("ERROR", "57014", "canceling statement due to user request"))


def cancel(s, session):
    """A CancelRequest with *session*'s key, on a connection of its own; that connection's transport."""
    transport = RecordingTransport()
    s.proxy.new_client(transport).got_data(m.cancel_request(session.process_id, session.secret_key))
    return transport


def test_a_client_waiting_for_the_pool_is_cancelled_here_and_its_statement_never_runs():
    # PgBouncer ignores such a cancel and the statement runs once a connection frees
    # (pgbouncer#1222): a client's statement_timeout or ^C meant nothing while it waited.
    s = Setup(clustered=False, pool_size=1)
    a, at, server = in_transaction(s)
    pool = server.pool
    b, bt = waits(s, "SELECT pg_sleep(60)")
    dialled = len(s.clock.tcpClients)
    ct = cancel(s, b)
    assert bt.value() == CANCELLED + Z_IDLE
    assert b.state == "idle" and b.server is None and b not in pool.waiters
    assert len(s.clock.tcpClients) == dialled and ct.disconnecting  # no node was asked
    commit(a, server)
    assert sent(server) == b""  # b's statement went nowhere
    bt.clear()
    b.got_data(m.query("SELECT 2"))  # the session goes on
    assert queries(sent(server)) == ["SELECT 2"]
    server.got_data(RESULT + Z_IDLE)
    assert bt.value() == RESULT + Z_IDLE


def test_only_the_first_statement_is_cancelled_what_follows_it_still_runs():
    s = Setup(clustered=False, pool_size=1)
    a, at, server = in_transaction(s)
    b, bt = client(s)
    b.got_data(m.query("SELECT 1") + m.parse("", "SELECT 2") + m.bind("", "") + m.execute("") + m.sync())
    assert b.state == "waiting"
    cancel(s, b)
    assert bt.value() == CANCELLED + Z_IDLE
    assert b.state == "waiting" and list(server.pool.waiters) == [b]
    commit(a, server)
    out = sent(server)
    assert out[:1] == bytes([p.PARSE]) and b"SELECT 2" in out and b"SELECT 1" not in out  # the batch, not SELECT 1


def test_a_waiting_batch_is_answered_as_postgresql_answers_a_cancelled_one():
    s = Setup(clustered=False, pool_size=1)
    a, at, server = in_transaction(s)
    b, bt = client(s)
    b.got_data(m.parse("S1", "SELECT 1") + m.bind("", "S1") + m.execute("") + m.sync())
    cancel(s, b)
    assert bt.value() == CANCELLED + Z_IDLE  # one error for the batch, then ReadyForQuery
    assert b.state == "idle" and not b.relay.statements  # S1 was never prepared
    commit(a, server)
    assert sent(server) == b""


def test_behind_pgtwist_s_own_settings_sync_the_cancel_is_for_the_client_s_work_not_the_sync():
    # Sent on, the cancel stopped pgtwist's SET on the connection: the client was closed with
    # "could not restore this session's settings" (XX000) and the connection discarded.
    s = Setup(clustered=False, pool_size=1)
    b, bt = client(s, application_name="bee")  # (its login set application_name on the one connection)
    a, at, server = in_transaction(s)  # (and a's login set it back)
    b.got_data(m.query("SELECT 1"))
    commit(a, server)
    assert b.state == "preparing" and b.server is server  # its application_name is set first
    dialled = len(s.clock.tcpClients)
    server.transport.clear()
    cancel(s, b)
    assert len(s.clock.tcpClients) == dialled  # the node's SET is left alone
    assert bt.value() == CANCELLED + Z_IDLE
    finish_internal(server)
    assert not server.tainted and b.state in ("linked", "idle")
    assert b"SELECT 1" not in sent(server)


def test_a_cancel_for_a_statement_on_its_server_still_goes_to_the_node():
    s = Setup(clustered=False, pool_size=1)
    b, bt = client(s)
    b.got_data(m.query("SELECT pg_sleep(60)"))
    assert b.state == "linked"
    dialled = len(s.clock.tcpClients)
    cancel(s, b)
    assert len(s.clock.tcpClients) == dialled + 1 and bt.value() == b""


def test_a_cancel_on_its_way_to_the_node_holds_the_connection_back_from_the_next_client():
    # The statement ended before the cancel reached the node: handed on at once, the connection
    # ran the next client's statement when the cancel arrived, and that one was cancelled.
    from twisted.internet.testing import StringTransport

    s = Setup(clustered=False, pool_size=1)
    a, at = client(s)
    a.got_data(m.query("SELECT pg_sleep(1)"))
    server = a.server
    b, bt = waits(s, "SELECT 2")
    cancel(s, a)
    factory = s.clock.tcpClients[-1][2]
    server.transport.clear()
    server.got_data(RESULT + Z_IDLE)  # a's statement ends before the node has the cancel
    assert at.value() == RESULT + Z_IDLE
    assert b.state == "waiting" and sent(server) == b""  # not handed on yet
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.connectionLost(None)  # the node has the cancel (it hangs up once it signalled)
    assert b.state == "linked" and b.server is server and sent(server) == m.query("SELECT 2")
    assert not server.pool.being_canceled


def test_a_cancel_during_failover_wait_calls_off_the_pending_retry():
    # The next statement, sent within the retry's pause, starts a retry chain of its own: with
    # the first one left running, both queued the session in the pool, which then failed on it.
    from tests.harness.session import R1, R2, Z_IN, P, internal_answer

    s = Setup(failover_wait=5.0, pool_size=1)
    a, at = s.client()
    a.got_data(m.query("BEGIN; INSERT INTO t VALUES (0)"))
    server = a.server
    server.got_data(m.command_complete("BEGIN") + m.command_complete("INSERT 0 1") + Z_IN)
    b, bt = s.client()
    for name in (P, R1, R2):
        s.set_up(name, False)
    b.got_data(m.query("INSERT INTO t VALUES (1)"))
    assert b.state == "waiting"
    s.clock.advance(0.1)
    cancel(s, b)
    assert bt.value() == CANCELLED + Z_IDLE and b.state == "idle"
    bt.clear()
    s.clock.advance(0.05)
    b.got_data(m.query("INSERT INTO t VALUES (2)"))
    s.set_up(P, True)
    for _ in range(3):
        s.clock.advance(0.1)
    pool = s.pool(P)
    assert list(pool.waiters).count(b) == 1 and list(pool._waits).count(b) == 1
    a.got_data(m.query("COMMIT"))
    server.got_data(m.command_complete("COMMIT") + Z_IDLE)
    server.got_data(internal_answer(rows=[(b"0/10", b"0/10", b"on")]))
    assert b.server is server and b"INSERT INTO t VALUES (2)" in sent(server)


def test_a_cancel_behind_the_settings_sync_leaves_nothing_asked():
    # With the cancelled statement's start still noted, the janitor took the idle client for one
    # running past query_timeout: it cancelled on the node and dropped the connection.
    from tests.harness.session import tick

    s = Setup(clustered=False, pool_size=1, query_timeout=5)
    b, bt = client(s, application_name="bee")
    a, at, server = in_transaction(s)
    b.got_data(m.query("SELECT 1"))
    commit(a, server)
    assert b.state == "preparing"
    cancel(s, b)
    finish_internal(server)
    assert b._asked_at is None
    dialled = len(s.clock.tcpClients)
    tick(s, 10)
    assert len(s.clock.tcpClients) == dialled and server.state != "closed"


def test_a_cancelled_read_does_not_leave_the_write_behind_it_on_the_replica():
    # SELECT 1 placed the pipeline on r1; cancelled, the INSERT behind it was sent there (25006).
    from tests.harness.session import R2, P

    s = Setup(pool_size=1)
    s.set_up(R2, False)
    a, at = s.client()
    a.got_data(m.query("SELECT pg_sleep(10)"))
    replica = a.server
    sent(replica)
    b, bt = s.client()
    b.got_data(m.query("SELECT 1") + m.query("INSERT INTO t VALUES (1)"))
    assert b.state == "waiting"
    cancel(s, b)
    assert bt.value() == CANCELLED + Z_IDLE
    replica.got_data(RESULT + Z_IDLE)  # a's read ends
    assert b"INSERT" not in sent(replica)
    assert str(b.server.node) == P and b"INSERT INTO t VALUES (1)" in sent(b.server)
