"""Terminate while the node still runs the client's statement: a driver closing a connection that another of its threads waits in.

psycopg's Connection.close() from one thread while another waits in execute() sends exactly
this: a Query, then, in a later read, Terminate. PostgreSQL reads nothing while it runs a
statement, so it meets the Terminate only when the statement ends. pgtwist reads it at once
and acts on it at once, as PgBouncer does: the client hears nothing more, only the end of
its connection; the statement is cancelled; the server connection, which still owes an
answer nobody will read, is closed rather than pooled. These tests pin that in both pool
modes and on both of transaction pooling's paths (a first transaction, placed from IDLE,
and the next one on a connection the client kept).
"""

import pytest
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from pgtwist.backend.protocol import CancelFactory
from pgtwist.wire import messages as m

from tests.harness.compiled import pure_only
from tests.harness.session import NODE_KEY, NODE_PID, RESULT, Z_IDLE, Harness, keeps_its_server, queries

SLEEP = "SELECT pg_sleep(2)"
CANCELLED = m.error_response("ERROR", "57014", "canceling statement due to user request") + Z_IDLE


def linked_in_a_statement(path: str):
    """A client whose server connection runs SLEEP for it; the client's transport cleared."""
    if path == "session":
        h = Harness()
        session, ct, server, _ = h.linked()
    else:
        h = Harness(pool_mode="transaction")
        if path == "transaction, placed":
            # A first login needs the node; one after it is answered from memory, with no server connection.
            first, _ = h.client()
            first.got_data(m.terminate())
            first.connection_lost(Failure(ConnectionDone()))
        session, ct = h.client()
        server = session.server
        if path == "transaction, kept":
            # Its last transaction ended and nobody else wanted the connection: it keeps it.
            session.got_data(m.query("SELECT 1"))
            server.got_data(RESULT + Z_IDLE)
            assert keeps_its_server(session)
        else:
            # Logged in with no server connection: the statement is placed from IDLE.
            assert session.state == "idle" and server is None
    ct.clear()
    session.got_data(m.query(SLEEP))
    server = session.server
    assert session.state == "linked" and server is not None
    assert queries(server.transport.value())[-1] == SLEEP
    server.transport.clear()
    return h, session, ct, server


PATHS = ["transaction, placed", "transaction, kept", "session"]


@pytest.mark.parametrize("path", PATHS)
def test_the_client_hears_nothing_more_and_its_connection_ends_at_once(path):
    h, session, ct, server = linked_in_a_statement(path)
    session.got_data(m.terminate())
    assert session.state == "closed"
    assert ct.disconnecting and ct.value() == b""
    # The node's late answer (to the cancel) goes to nobody.
    server.got_data(CANCELLED)
    assert ct.value() == b""
    session.connection_lost(Failure(ConnectionDone()))
    assert session.id not in h.proxy.clients


@pytest.mark.parametrize("path", PATHS)
def test_the_statement_is_cancelled_and_its_server_connection_closed_not_pooled(path):
    h, session, ct, server = linked_in_a_statement(path)
    session.got_data(m.terminate())
    (cancel,) = [f for _, _, f, _, _ in h.clock.tcpClients if isinstance(f, CancelFactory)]
    assert (cancel.process_id, cancel.secret_key) == (NODE_PID, NODE_KEY)
    # The client's Terminate is not the node's to read: nothing of the client's follows the Query.
    assert server.transport.value() in (b"", m.terminate())  # (at most pgtwist's own goodbye to the node)
    assert server.transport.disconnecting
    (pool,) = h.proxy.pools.values()
    assert server not in pool.idle and server not in pool.busy and server not in pool.lent
    # The next client is served by a server connection of its own, not by one still owing an answer.
    other, oct_ = h.client()
    if other.server is None:  # transaction pooling: logged in from memory, linked by its first statement
        other.got_data(m.query("SELECT 1"))
    assert other.server is not None and other.server is not server


def test_the_log_says_which_client_left_and_which_server_was_closed_for_it():
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        h, session, ct, server = linked_in_a_statement("transaction, placed")
        session.got_data(m.terminate())
    finally:
        globalLogPublisher.removeObserver(events.append)
    (said,) = [e for e in events if "still owed it an answer" in e.get("log_format", "")]
    assert (said["client"], said["server"], said["why"]) == (session.id, server.id, "Terminate")


def test_terminate_between_statements_closes_nothing_but_the_client():
    """The contrast: with nothing owed, the connection goes back to the pool and no cancel is sent."""
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    session.got_data(m.query("SELECT 1"))
    server = session.server
    server.got_data(RESULT + Z_IDLE)
    ct.clear()
    session.got_data(m.terminate())
    assert ct.disconnecting and ct.value() == b""
    assert not server.transport.disconnecting
    assert not any(isinstance(f, CancelFactory) for _, _, f, _, _ in h.clock.tcpClients)
    (pool,) = h.proxy.pools.values()
    assert server in pool.idle


# -- a Terminate between transactions: the logout of every short-lived client ------------------


class _NoWalk:
    """A scanner stand-in that fails the test if the Terminate is walked: the shortcut skips it."""

    def __init__(self, scanner):
        self._scanner = scanner

    def __getattr__(self, name):
        return getattr(self._scanner, name)

    def feed(self, data):
        raise AssertionError(f"the scanner walked {data!r}")


@pure_only
@pytest.mark.parametrize("where", ["idle", "lent"])
def test_a_terminate_between_transactions_closes_the_client_without_the_scanners_walk(where):
    h = Harness(pool_mode="transaction")
    session, ct, server = h.lent()
    if where == "idle":
        session.reclaim(server)
        assert session.state == "idle" and session.server is None
    ct.clear()
    server.transport.clear()
    session.scanner = _NoWalk(session.scanner)
    session.got_data(m.terminate())
    assert session.state == "closed" and ct.disconnecting and ct.value() == b""
    (pool,) = h.proxy.pools.values()
    assert server in pool.idle and server.transport.value() == b"" and not server.tainted


def test_a_terminates_bytes_inside_a_split_message_are_not_a_terminate():
    # The five bytes of a Terminate, arriving while a message split across reads is unfinished
    # (here a binary parameter of a Bind), are that message's: no shortcut. (The read before
    # them had the session placed: it holds its connection, not lent, until the Bind is whole.)
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    session.reclaim(session.server)
    ct.clear()
    terminate = m.terminate()
    run = m.parse("", "SELECT $1::bytea") + m.bind("", "", [terminate], param_formats=[1]) + m.execute() + m.sync()
    at = run.index(terminate)
    session.got_data(run[:at])
    assert session.state == "linked" and not session.lease.lent
    session.got_data(run[at : at + 5])
    assert session.state != "closed" and not ct.disconnecting
    session.got_data(run[at + 5 :])
    assert session.state != "closed"
    assert any(terminate in s.transport.value() for s in h.proxy.servers)  # (the Bind went out whole)


def test_an_idle_session_mid_message_takes_no_shortcut():
    # A read that does not begin a message is never taken for a Terminate: an idle session
    # waits, holding nothing, for the rest of a Bind whose binary parameter holds those bytes.
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    session.reclaim(session.server)
    terminate = m.terminate()
    run = m.bind("", "", [terminate], param_formats=[1]) + m.execute() + m.sync()
    at = run.index(terminate)
    session.got_data(run[:at])
    assert session.state == "idle" and not session.scanner.at_boundary
    session.got_data(run[at : at + 5])
    assert session.state == "idle" and not ct.disconnecting
    session.got_data(run[at + 5 :])
    assert session.state != "closed" and not ct.disconnecting


def test_a_terminate_after_a_split_terminate_still_closes():
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    session.reclaim(session.server)
    terminate = m.terminate()
    session.got_data(terminate[:2])
    session.got_data(terminate[2:])
    assert session.state == "closed" and ct.disconnecting
