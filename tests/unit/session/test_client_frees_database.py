"""DROP DATABASE (ALTER DATABASE ... RENAME TO, CREATE DATABASE ... TEMPLATE) through pgtwist:
its own idle server connections to that database are not sessions in the client's way.

Transaction pooling reads each statement and frees the database before sending it; session
pooling reads none, so PostgreSQL's 55006 refusal of a lone simple Query is held back, the
database freed, and the Query sent once more (Harness: session pooling, in memory)."""

from pgtwist.wire import messages as m
from pgtwist.wire import sqlstate

from tests.harness.session import Harness, messages, queries

DBS = {
    "appdb": {"dbname": "postgres", "nodes": ["db1:5432"], "pool_size": 2},
    "scratch": {"dbname": "scratch", "nodes": ["db1:5432"], "pool_size": 2},
}


def refusal(name="scratch") -> bytes:
    return m.error_response("ERROR", sqlstate.OBJECT_IN_USE, f'database "{name}" is being accessed by other users')


def harness(**overrides):
    h = Harness(databases=DBS, **overrides)
    freed = []
    real = h.proxy.free_databases
    h.proxy.free_databases = lambda names, client: (freed.append(names), real(names, client))
    return h, freed


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


def test_session_pooling_sends_a_refused_drop_again_once_its_database_is_free():
    h, freed = harness()
    pool, idle = idle_scratch_connection(h)
    session, ct, server, st = h.linked()
    session.got_data(m.query("DROP DATABASE scratch"))
    assert queries(st.value()) == ["DROP DATABASE scratch"]
    st.clear()
    server.got_data(refusal() + m.ready_for_query())
    assert ct.value() == b""  # the client heard nothing of it
    assert queries(st.value()) == ["DROP DATABASE scratch"]  # sent once more
    assert freed == [("scratch",)] and not pool.idle and idle.transport.disconnecting
    answer = m.command_complete("DROP DATABASE") + m.ready_for_query()
    server.got_data(answer)
    assert ct.value() == answer and session.state == "linked"


def test_session_pooling_holds_a_refusal_until_its_ready_for_query_in_the_next_read():
    h, freed = harness()
    idle_scratch_connection(h)
    session, ct, server, st = h.linked()
    session.got_data(m.query("DROP DATABASE scratch"))
    st.clear()
    server.got_data(refusal())
    assert ct.value() == b"" and st.value() == b"" and freed == []
    server.got_data(m.ready_for_query())
    assert ct.value() == b"" and queries(st.value()) == ["DROP DATABASE scratch"] and freed == [("scratch",)]


def test_a_refusal_is_sent_on_when_the_client_spoke_since_or_it_comes_again():
    h, freed = harness()
    session, ct, server, st = h.linked()
    session.got_data(m.query("DROP DATABASE scratch"))
    server.got_data(refusal())
    session.got_data(m.query("SELECT 1"))  # its answer would come before the DROP's second one
    server.got_data(m.ready_for_query())
    assert ct.value() == refusal() + m.ready_for_query()
    ct.clear()
    st.clear()
    session.got_data(m.query("DROP DATABASE scratch"))
    server.got_data(refusal() + m.ready_for_query())
    st.clear()
    server.got_data(refusal() + m.ready_for_query())  # refused again: the client hears it
    assert ct.value() == refusal() + m.ready_for_query() and st.value() == b""


def test_other_refusals_and_batches_go_to_the_client_as_they_came():
    h, freed = harness()
    session, ct, server, st = h.linked()
    session.got_data(m.query("DROP DATABASE scratch"))
    denied = m.error_response("ERROR", "42501", "must be owner of database scratch") + m.ready_for_query()
    server.got_data(denied)
    assert ct.value() == denied and freed == []
    ct.clear()
    st.clear()
    batch = m.parse("", "DROP DATABASE scratch") + m.bind("", "") + m.execute("") + m.sync()
    session.got_data(batch)
    reply = m.parse_complete() + m.bind_complete() + refusal() + m.ready_for_query()
    server.got_data(reply)
    assert ct.value() == reply and [t for t, _ in messages(st.value())] == [t for t, _ in messages(batch)]
    assert freed == [("scratch",)]  # ... and its next attempt finds the database free


def test_transaction_pooling_frees_the_database_before_the_statement_goes():
    h, freed = harness(pool_mode="transaction")
    pool, idle = idle_scratch_connection(h)
    lender, _ = h.client(database="scratch")
    lender.got_data(m.query("SELECT 1"))  # it keeps a connection between its transactions
    lent = lender.server
    lent.got_data(m.command_complete("SELECT 1") + m.ready_for_query())
    assert pool.lent and pool.login_parameters
    session, ct = h.client()
    session.got_data(m.query("ALTER DATABASE scratch RENAME TO scratch2"))
    assert freed == [("scratch",)]
    assert not pool.idle and not pool.lent and lender.server is None and not pool.login_parameters
    assert idle.transport.disconnecting and lent.transport.disconnecting
    assert queries(session.server.transport.value())[-1] == "ALTER DATABASE scratch RENAME TO scratch2"
