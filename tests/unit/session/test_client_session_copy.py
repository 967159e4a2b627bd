"""Session pooling and COPY FROM STDIN: the Syncs PostgreSQL ignores while it reads COPY data are owed no ReadyForQuery."""

import pytest
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.framing import frame

from tests.harness.session import Harness, finish_internal, queries

# CopyInResponse: text format, one column.
COPY_IN = frame(p.COPY_IN_RESPONSE, b"\x00\x00\x01\x00\x00")
EXTENDED_COPY = m.parse("", "COPY t FROM STDIN") + m.bind("", "") + m.describe("P", "") + m.execute() + m.sync()
PARSED = frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + frame(p.NO_DATA)


def _leave_and_expect_reuse(h, session, server, st_):
    assert session.at_rest()
    session.connection_lost(Failure(ConnectionLost()))
    assert not st_.disconnecting, "a connection owing nothing is reset, not closed"
    assert queries(st_.value())[-1] == "DISCARD ALL"
    finish_internal(server)
    assert list(h.pool.idle) == [server]


ENDINGS = {
    "done": (m.copy_data(b"1\n") + m.copy_done() + m.sync(), m.command_complete("COPY 1") + m.ready_for_query()),
    "fail": (
        m.copy_fail("changed my mind") + m.sync(),
        m.error_response("ERROR", "57014", "COPY from stdin failed: changed my mind") + m.ready_for_query(),
    ),
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_extended_copy_owes_one_ready_for_query_not_two(ending):
    """libpq's PQexecParams: Execute and Sync, CopyInResponse, the data, then CopyDone (or CopyFail)
    and Sync; one ReadyForQuery in all."""
    sent, answer = ENDINGS[ending]
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(EXTENDED_COPY)
    server.got_data(PARSED + COPY_IN)
    assert not session.at_rest()  # (reading COPY data)
    session.got_data(sent)
    server.got_data(answer)
    _leave_and_expect_reuse(h, session, server, st_)


def test_simple_query_copy_is_still_owed_its_ready_for_query():
    """COPY sent as a simple Query: its ReadyForQuery comes after CopyDone, and is owed until then."""
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.query("COPY t FROM STDIN"))
    server.got_data(COPY_IN)
    session.got_data(m.copy_data(b"1\n") + m.copy_done())
    assert not session.at_rest()
    server.got_data(m.command_complete("COPY 1") + m.ready_for_query())
    _leave_and_expect_reuse(h, session, server, st_)


def test_a_client_leaving_mid_copy_still_gets_its_connection_closed():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(EXTENDED_COPY)
    server.got_data(PARSED + COPY_IN)
    session.got_data(m.copy_data(b"1\n"))
    session.connection_lost(Failure(ConnectionLost()))
    assert st_.disconnecting


def test_copy_simple_query_with_data_sent_before_copy_in_response():
    """pgx v5 (pgconn.CopyFrom) sends Query then CopyData/CopyDone at once, without waiting for
    CopyInResponse: when it comes, the scanner's last type is CopyDone, and no Sync is ignored."""
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.query("COPY t FROM STDIN") + m.copy_data(b"1\n") + m.copy_done())
    server.got_data(COPY_IN)
    server.got_data(m.command_complete("COPY 1") + m.ready_for_query())
    _leave_and_expect_reuse(h, session, server, st_)


def test_copy_two_copies_in_one_simple_query():
    """libpq/psql: one Query "COPY a FROM STDIN; COPY b FROM STDIN", each CopyIn served in turn
    (the client waits for each CopyInResponse): one ReadyForQuery for both."""
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.query("COPY a FROM STDIN; COPY b FROM STDIN"))
    server.got_data(COPY_IN)
    session.got_data(m.copy_data(b"1\n") + m.copy_done())
    server.got_data(m.command_complete("COPY 1") + COPY_IN)
    session.got_data(m.copy_data(b"2\n") + m.copy_done())
    server.got_data(m.command_complete("COPY 1") + m.ready_for_query())
    _leave_and_expect_reuse(h, session, server, st_)


def test_copy_extended_with_data_pipelined_before_copy_in_response():
    """Parse/Bind/Execute/Sync, CopyData, CopyDone, Sync all sent before CopyInResponse: only the
    first Sync is ignored; the second is the one the COPY's ReadyForQuery answers."""
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(
        m.parse("", "COPY t FROM STDIN") + m.bind("", "") + m.execute() + m.sync() + m.copy_data(b"1\n") + m.copy_done() + m.sync()
    )
    server.got_data(frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + COPY_IN)
    server.got_data(m.command_complete("COPY 1") + m.ready_for_query())
    _leave_and_expect_reuse(h, session, server, st_)
