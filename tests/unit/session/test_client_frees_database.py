"""DROP DATABASE (ALTER DATABASE ... RENAME TO, CREATE DATABASE ... TEMPLATE) through pgtwist:
its own idle server connections to that database are not sessions in the client's way.

pgtwist acts on PostgreSQL's 55006 refusal of the client's own statement only (a refusal that
comes after PostgreSQL checked the client's right to run it): its connections there that nobody
uses go, and a lone simple Query is sent once more (session/dropdb.py). In memory: Harness,
session pooling unless said."""

import pytest
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from pgtwist.wire import messages as m
from pgtwist.wire import sqlstate

from tests.harness.session import Harness, messages, queries

DBS = {
    "appdb": {"dbname": "postgres", "nodes": ["db1:5432"], "pool_size": 2},
    "scratch": {"dbname": "scratch", "nodes": ["db1:5432"], "pool_size": 2},
}
DROP = "DROP DATABASE scratch"


def refusal(name="scratch") -> bytes:
    return m.error_response("ERROR", sqlstate.OBJECT_IN_USE, f'database "{name}" is being accessed by other users')


def harness(**overrides):
    h = Harness(databases=DBS, **overrides)
    h.freed = []
    real = h.proxy.free_databases

    def free(names, client, node):
        h.freed.append(names)
        real(names, client, node)

    h.proxy.free_databases = free
    return h


def idle_scratch_connection(h):
    """A client of "scratch" came and went: its server connection waits in the pool, idle."""
    session, transport = h.client(database="scratch")
    server = session.server
    session.got_data(m.terminate())
    pool = server.pool
    if server in pool.resetting:  # (session pooling resets it first)
        server.got_data(m.command_complete("DISCARD ALL") + m.ready_for_query())
    assert list(pool.idle) == [server]
    return pool, server


def sent_drop(h):
    session, ct, server, st = h.linked()
    session.got_data(m.query(DROP))
    assert queries(st.value()) == [DROP]
    st.clear()
    return session, ct, server, st


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_a_refused_drop_goes_again_once_pgtwists_idle_connections_are_gone(pool_mode):
    h = harness(pool_mode=pool_mode)
    pool, idle = idle_scratch_connection(h)
    session, ct, server, st = sent_drop(h)
    server.got_data(refusal() + m.ready_for_query())
    assert ct.value() == b""  # the client heard nothing of it
    assert queries(st.value()) == [DROP]  # sent once more ...
    assert h.freed == [("scratch",)] and not pool.idle and idle.transport.disconnecting  # ... the database freed
    answer = m.command_complete("DROP DATABASE") + m.ready_for_query()
    server.got_data(answer)
    assert ct.value() == answer


def test_transaction_pooling_takes_back_a_lent_connection_and_forgets_remembered_logins():
    h = harness(pool_mode="transaction")
    pool, idle = idle_scratch_connection(h)
    lender, _ = h.client(database="scratch")
    lender.got_data(m.query("SELECT 1"))  # it keeps a connection between its transactions
    lent = lender.server
    lent.got_data(m.command_complete("SELECT 1") + m.ready_for_query())
    assert pool.lent and pool.login_parameters
    session, ct, server, st = sent_drop(h)
    server.got_data(refusal() + m.ready_for_query())
    assert not pool.idle and not pool.lent and lender.server is None and not pool.login_parameters
    assert idle.transport.disconnecting and lent.transport.disconnecting and queries(st.value()) == [DROP]


def test_a_refusal_and_its_ready_for_query_in_two_reads():
    h = harness()
    idle_scratch_connection(h)
    session, ct, server, st = sent_drop(h)
    server.got_data(refusal())
    assert ct.value() == b"" and st.value() == b"" and h.freed == []
    server.got_data(m.ready_for_query())
    assert ct.value() == b"" and queries(st.value()) == [DROP] and h.freed == [("scratch",)]


def test_a_held_refusal_goes_on_when_the_client_spoke_since():
    h = harness()
    session, ct, server, st = sent_drop(h)
    server.got_data(refusal())
    session.got_data(m.query("SELECT 1"))  # its answer would come before the DROP's second one
    server.got_data(m.ready_for_query())
    assert ct.value() == refusal() + m.ready_for_query() and queries(st.value()) == ["SELECT 1"]
    assert h.freed == [("scratch",)]  # (the refusal was the DROP's: its next attempt finds the database free)


def test_refused_again_the_client_hears_it():
    h = harness()
    session, ct, server, st = sent_drop(h)
    server.got_data(refusal() + m.ready_for_query())
    st.clear()
    server.got_data(refusal() + m.ready_for_query())
    assert ct.value() == refusal() + m.ready_for_query() and st.value() == b""


def test_pipelined_requests_are_not_sent_again():
    # CREATE ... TEMPLATE prod, then DROP DATABASE prod, each in its own read: the CREATE's
    # refusal must reach the client; sending the DROP "again" would run it in the CREATE's place.
    h = harness()
    session, ct, server, st = h.linked()
    session.got_data(m.query("CREATE DATABASE backup TEMPLATE scratch"))
    session.got_data(m.query(DROP))
    st.clear()
    server.got_data(refusal() + m.ready_for_query())
    assert ct.value() == refusal() + m.ready_for_query() and st.value() == b"" and h.freed == []


def test_a_refusal_of_anything_else_frees_nothing():
    h = harness()
    pool, idle = idle_scratch_connection(h)
    session, ct, server, st = h.linked()
    # A 55006 a client can make itself (RAISE in a DO block) answers a statement that frees nothing.
    session.got_data(m.query("DO $$BEGIN RAISE EXCEPTION USING ERRCODE = '55006', MESSAGE = 'database \"scratch\" is being accessed by other users'; END$$"))
    server.got_data(refusal() + m.ready_for_query())
    assert ct.value() == refusal() + m.ready_for_query()
    ct.clear()
    session.got_data(m.query(DROP))  # not its owner: PostgreSQL says so before it looks at sessions
    denied = m.error_response("ERROR", "42501", "must be owner of database scratch") + m.ready_for_query()
    server.got_data(denied)
    assert ct.value() == denied and h.freed == [] and list(pool.idle) == [idle] and not idle.transport.disconnecting


def test_an_extended_protocol_drop_is_refused_and_its_next_attempt_finds_the_database_free():
    h = harness()
    session, ct, server, st = h.linked()
    batch = m.parse("", DROP) + m.bind("", "") + m.execute("") + m.sync()
    session.got_data(batch)
    reply = m.parse_complete() + m.bind_complete() + refusal() + m.ready_for_query()
    server.got_data(reply)
    assert ct.value() == reply and [t for t, _ in messages(st.value())] == [t for t, _ in messages(batch)]
    assert h.freed == [("scratch",)]


def test_any_error_split_anywhere_reaches_a_session_pooled_client_whole():
    long_error = m.error_response("ERROR", "P0001", "x" * 3000) + m.ready_for_query()
    for cut in list(range(1, 12)) + [1500, len(long_error) - 3]:
        h = harness()
        session, ct, server, st = h.linked()
        session.got_data(m.query("SELECT f()"))
        server.got_data(long_error[:cut])
        server.got_data(long_error[cut:])
        assert ct.value() == long_error and session.state == "linked", cut


def test_the_server_lost_while_a_refusal_is_held_ends_the_session_as_any_loss_does():
    h = harness()
    session, ct, server, st = sent_drop(h)
    server.got_data(refusal())
    server.connection_lost(Failure(ConnectionLost()))
    assert session.state == "closed" and ct.disconnecting


def test_a_refusal_held_on_a_connection_since_lost_is_forgotten():
    h = harness(pool_mode="transaction")
    session, ct, server, st = sent_drop(h)
    server.got_data(refusal())  # held: its ReadyForQuery may follow
    server.connection_lost(Failure(ConnectionLost()))
    ct.clear()
    session.got_data(m.query("SELECT 1"))
    other = session.server
    assert other is not server
    answer = m.row_description([("x", 23)])
    reply = answer + m.command_complete("SELECT 1") + m.ready_for_query()
    other.got_data(reply)
    assert ct.value() == reply and h.freed == []  # no old refusal before its answer, nothing sent again
    assert queries(other.transport.value())[-1:] == ["SELECT 1"]


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_a_refusal_behind_an_unsynced_batch_frees_nothing(pool_mode):
    # A 55006 raised by the client's own DO block, sent without a Sync, then a DROP it may not
    # run: the server skips the DROP (waiting for a Sync); the refusal is not the DROP's.
    h = harness(pool_mode=pool_mode)
    pool, idle = idle_scratch_connection(h)
    session, ct, server, st = h.linked() if pool_mode == "session" else (*h.client(), None, None)
    do = "DO $$BEGIN RAISE EXCEPTION USING ERRCODE = '55006'; END$$"
    session.got_data(m.parse("", do) + m.bind("", "") + m.execute("") + m.flush())
    session.got_data(m.query(DROP))
    server = session.server
    server.got_data(m.notice_response("00000", "on the way") + refusal())
    assert h.freed == [] and list(pool.idle) == [idle] and not idle.transport.disconnecting


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_a_read_that_starts_inside_a_message_is_no_statement(pool_mode):
    # CopyData outside COPY (ignored by PostgreSQL) whose payload spells a DROP Query: the read
    # holding that payload is a fragment, not the client's statement.
    h = harness(pool_mode=pool_mode)
    pool, idle = idle_scratch_connection(h)
    session, ct = h.client()
    payload = m.query(DROP)
    session.got_data(m.query("SELECT raise_55006()") + b"d" + (len(payload) + 4).to_bytes(4, "big"))
    session.got_data(payload)
    server = session.server
    server.got_data(refusal() + m.ready_for_query())
    assert h.freed == [] and list(pool.idle) == [idle]
    assert queries(server.transport.value()).count(DROP) == 0


@pytest.mark.parametrize("since", [m.parse("s1", "SELECT 1") + m.flush(), m.parse("s1", "SELECT 1")[:3]])
def test_a_held_refusal_goes_on_when_the_client_began_a_batch_since(since):
    h = harness()
    session, ct, server, st = sent_drop(h)
    server.got_data(refusal())
    session.got_data(since)  # (no Query or Sync: nothing counted; or not even a whole header)
    st.clear()
    server.got_data(m.ready_for_query())
    assert ct.value() == refusal() + m.ready_for_query() and queries(st.value()) == []


def test_transaction_pooling_a_refusal_passed_on_leaves_the_relay_settled():
    h = harness(pool_mode="transaction")
    session, ct, server, st = sent_drop(h)
    server.got_data(refusal())
    session.got_data(m.query("SELECT 1"))  # (the client spoke: the refusal goes on)
    server.got_data(m.ready_for_query())
    assert ct.value() == refusal() + m.ready_for_query()
    server.got_data(m.command_complete("SELECT 1") + m.ready_for_query())
    assert not session.relay.queue and session.relay.idle
