"""A client's bad bytes in every state of its session: FATAL 08P01 naming what was wrong, nothing forwarded,
no traceback; bytes that are not the protocol at all are closed silently; max_client_conn refuses at the startup packet.
"""

import struct

import pytest
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from pgtwist.wire import frontend, sqlstate
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.framing import frame

from tests.harness import admin_support
from tests.harness.session import RESULT, Z_IDLE, Harness, messages, queries, tick

BAD = [
    (frame(p.DESCRIBE, b"Xs1\x00"), "unknown target type 88"),
    (frame(p.CLOSE, b"\x00\x00"), "unknown target type 0"),
    (frame(p.QUERY, b"SELECT 1"), "Query message: the query string has no terminating NUL"),
    (frame(p.BIND, b"\x00\x00\x00\x00\x00\x02\x00\x00\x00\x01"), "Bind message: parameter 1 of 2 runs past the end"),
    (frame(p.PARSE, b"s\x00SELECT $1\x00\x00\x01"), "Parse message: 1 parameter types announced"),
    (frame(p.EXECUTE, b"\x00"), "Execute message"),
    (frame(p.SYNC, b"junk"), "Sync message"),
    (b"!" + struct.pack("!I", 4), "invalid frontend message type 33"),
    (b"p" + struct.pack("!I", 5) + b"\x00", "invalid frontend message type 112"),
    (b"Q" + struct.pack("!I", 2), "invalid message length 2"),
    (b"D" + struct.pack("!I", 20_000), "limit 10000"),
    (b"Q" + struct.pack("!I", 1 << 30), "invalid message length"),
]
IDS = [w.split(":")[0][:30] for _, w in BAD]


def layout_only(data: bytes) -> bool:
    """Whole, of a frontend type and a fine length: only its layout is wrong."""
    (length,) = struct.unpack_from("!I", data, 1)
    return data[0] in (p.DESCRIBE, p.CLOSE, p.QUERY, p.BIND, p.PARSE, p.EXECUTE, p.SYNC) and length + 1 == len(data)


@pytest.fixture
def failures():
    """Every log event that carries a failure (a traceback in the log), while the test runs."""
    seen = []

    def observer(event):
        if event.get("log_failure") is not None:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def nothing_forwarded(server) -> bool:
    """The server got none of the client's bytes: at most the proxy's own Terminate, closing it."""
    return server.transport.value() in (b"", m.terminate())


def assert_refused(ct, words, failures):
    out = messages(ct.value())
    assert out and out[-1][0] == p.ERROR_RESPONSE, out
    fields = m.decode_fields(out[-1][1])
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate.PROTOCOL_VIOLATION), fields
    assert words in fields["M"], fields["M"]
    assert ct.disconnecting
    assert not failures, failures


def test_malformed_pipelined_behind_the_startup_packet(failures):
    for data, words in BAD:
        h = Harness(pool_mode="transaction")
        session, ct = h.client(login=False)
        session.got_data(m.startup_message({"user": "app", "database": "appdb"}) + m.query("SELECT 1") + data)
        assert_refused(ct, words, failures)
        assert all(b"SELECT 1" not in s.transport.value() for s in h.proxy.servers), "a read with bad bytes went out in part"


@pytest.mark.parametrize("data,words", BAD, ids=IDS)
def test_transaction_mode_idle_between_transactions(data, words, failures):
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    session.reclaim(session.server)
    assert session.state == "idle" and session.server is None
    ct.clear()
    session.got_data(data)
    assert_refused(ct, words, failures)
    assert session.state == "closed"
    assert all(nothing_forwarded(s) for s in h.proxy.servers)


@pytest.mark.parametrize("data,words", BAD, ids=IDS)
def test_transaction_mode_waiting_for_a_server(data, words, failures):
    h = Harness(pool_mode="transaction")
    busy = []
    for _ in range(2):  # pool_size 2: both server connections inside a transaction
        s, _ct = h.client()
        s.got_data(m.query("BEGIN"))
        s.server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
        busy.append(s)
    session, ct = h.client()
    session.got_data(m.query("SELECT 1"))
    assert session.state == "waiting"
    ct.clear()
    session.got_data(data)
    assert_refused(ct, words, failures)
    # It left the queue: a server released later is not handed to it.
    for s in busy:
        s.server.transport.clear()
        s.got_data(m.query("COMMIT"))
        s.server.got_data(m.command_complete("COMMIT") + m.ready_for_query())
    assert session.server is None


@pytest.mark.parametrize("data,words", BAD, ids=IDS)
def test_transaction_mode_linked_inside_a_transaction(data, words, failures):
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    session.got_data(m.query("BEGIN"))
    server = session.server
    server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    server.transport.clear()
    ct.clear()
    session.got_data(m.query("SELECT 1") + data)
    assert_refused(ct, words, failures)
    assert nothing_forwarded(server), "bytes of the refusing read reached the server"
    assert server not in h.proxy.pools[next(iter(h.proxy.pools))].idle  # mid-transaction: dropped


@pytest.mark.parametrize("data,words", BAD, ids=IDS)
def test_transaction_mode_linked_on_a_kept_connection(data, words, failures):
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    server = session.server
    server.transport.clear()
    ct.clear()
    session.got_data(data)
    assert_refused(ct, words, failures)
    assert nothing_forwarded(server)


@pytest.mark.parametrize("data,words", BAD, ids=IDS)
def test_session_mode_linked(data, words, failures):
    h = Harness()
    session, ct, server, st_ = h.linked()
    if layout_only(data):
        # Forwarded as bytes in session mode: PostgreSQL itself answers its layout (ERROR 08P01),
        # as on a direct connection; the proxy checks what it can see without parsing.
        session.got_data(data)
        assert st_.value() == data and not ct.disconnecting
        return
    session.got_data(data)
    assert_refused(ct, words, failures)
    assert nothing_forwarded(server)


@pytest.mark.parametrize("data,words", BAD, ids=IDS)
def test_session_mode_split_header_is_held_until_it_can_be_checked(data, words, failures):
    h = Harness()
    session, ct, server, st_ = h.linked()
    if layout_only(data):
        return  # (see above)
    ok = m.query("SELECT 1")
    session.got_data(ok + data[:3])
    if data[0] not in frontend.TYPES:
        # Refused from its type byte alone, before the rest of the header: nothing of the read goes.
        assert_refused(ct, "invalid frontend message type", failures)
        assert nothing_forwarded(server)
        return
    assert st_.value() == ok  # the start of the next header waits
    session.got_data(data[3:])
    assert_refused(ct, words, failures)
    assert st_.value() in (ok, ok + m.terminate())


@pytest.mark.parametrize("data,words", BAD, ids=IDS)
def test_admin_console(data, words, failures):
    proxy = admin_support.TestProxy(admin_support.make_config())
    session, ct = admin_support.client(proxy, user="admin", database="pgbalance")
    assert session.state == "admin"
    ct.clear()
    if data[0] == p.DESCRIBE and len(data) == 5:
        data = data + b"S" + b"\x00" * (20_000 - 5)  # the console reads the whole message first
    session.got_data(data)
    assert_refused(ct, words, failures)


def test_admin_console_ignores_copy_messages_outside_copy():
    proxy = admin_support.TestProxy(admin_support.make_config())
    session, ct = admin_support.client(proxy, user="admin", database="pgbalance")
    ct.clear()
    session.got_data(m.copy_data(b"x") + m.copy_done() + m.query("SHOW HELP"))
    assert not ct.disconnecting
    assert messages(ct.value())[-1] == (p.READY_FOR_QUERY, b"I")


# -- not the protocol at all ---------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        m.terminate(),  # node-postgres ends a connection it has just opened so
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        struct.pack("!I", 3),
        struct.pack("!I", 7) + b"\x00" * 3,
        struct.pack("!II", 10_001, p.PROTOCOL_3_0),
    ],
)
def test_first_bytes_not_a_startup_packet_close_silently(first, failures):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = Harness()
        session, ct = h.client(login=False)
        session.got_data(first)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert ct.value() == b"" and ct.disconnecting
    assert session.state == "closed"
    assert not failures
    assert any("invalid length of startup packet" in str(e.get("why", "")) for e in events)
    assert h.proxy.clock.getDelayedCalls() == []  # the login timer went with it
    session.connection_lost(Failure(ConnectionDone()))
    assert session.id not in h.proxy.clients


def test_a_bad_startup_packet_layout_still_gets_its_fatal():
    h = Harness()
    session, ct = h.client(login=False)
    session.got_data(struct.pack("!II", 12, p.PROTOCOL_3_0) + b"user")  # no terminator
    fields = m.decode_fields(messages(ct.value())[-1][1])
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate.PROTOCOL_VIOLATION)


# -- max_client_conn at the startup packet -----------------------------------------------------


@pytest.mark.parametrize("auth_type", ["trust", "md5", "scram-sha-256"])
def test_max_client_conn_refuses_before_any_authentication(auth_type):
    h = Harness(max_client_conn=1, auth_type=auth_type)
    first, _ = h.client()
    assert first.admitted
    second, ct = h.client()
    out = messages(ct.value())
    assert [t for t, _ in out] == [p.ERROR_RESPONSE], out  # no AuthenticationRequest came first
    fields = m.decode_fields(out[0][1])
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", sqlstate.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
    second.connection_lost(Failure(ConnectionDone()))
    assert h.proxy.admitted == 1
    first.connection_lost(Failure(ConnectionDone()))
    assert h.proxy.admitted == 0
    third, ct = h.client()
    assert messages(ct.value())[0][0] == p.AUTHENTICATION and third.admitted


def test_silent_connections_do_not_count_against_max_client_conn():
    h = Harness(max_client_conn=2)
    silent = [h.client(login=False) for _ in range(50)]
    a, _ = h.client()
    b, _ = h.client()
    assert a.state == "linked" and b.state == "linked"
    c, ct = h.client()
    assert m.decode_fields(messages(ct.value())[-1][1])["C"] == sqlstate.TOO_MANY_CONNECTIONS
    tick(h, 10)  # client_login_timeout: the silent ones go, without a word
    assert all(t.disconnecting and t.value() == b"" for _, t in silent)


def test_admin_console_is_never_refused_for_max_client_conn():
    proxy = admin_support.TestProxy(admin_support.make_config(max_client_conn=1))
    admin_support.client(proxy)
    _, ct = admin_support.client(proxy)
    assert m.decode_fields(messages(ct.value())[-1][1])["C"] == sqlstate.TOO_MANY_CONNECTIONS
    session, ct = admin_support.client(proxy, user="admin", database="pgbalance")
    assert session.state == "admin"


# -- leaving a server that may be skipping to a Sync ------------------------------------------


@pytest.mark.parametrize(
    "last",
    [
        m.close("S", "s1") + m.copy_done(),  # found by the fuzz drill: the reset then hung for ever
        m.execute("nope") + m.query("SELECT 1"),
        m.parse("", "SELEC") + m.copy_data(b"x"),
    ],
)
def test_session_mode_client_leaving_mid_extended_batch_closes_its_server(last):
    # Were the server given its reset query now, a failed message before would have it skipping
    # to a Sync that never comes: the reset would wait for ever, holding a pool slot.
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(last)
    server.got_data(m.error_response("ERROR", "26000", "nope"))
    st_.clear()
    session.connection_lost(Failure(ConnectionDone()))
    assert b"DISCARD ALL" not in st_.value()
    assert st_.disconnecting and server not in h.pool.idle


def test_session_mode_client_leaving_after_a_synced_batch_pools_its_server():
    h = Harness()
    session, ct, server, st_ = h.linked()
    session.got_data(m.parse("", "SELECT 1") + m.bind("", "") + m.execute() + m.sync())
    server.got_data(frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + m.command_complete("SELECT 0") + m.ready_for_query())
    session.connection_lost(Failure(ConnectionDone()))
    assert not st_.disconnecting and b"DISCARD ALL" in st_.value()


def test_a_lone_sync_between_transactions_is_answered_at_once():
    # psycopg leaving an empty pipeline block (or after a cancelled one) sends a Sync alone:
    # PostgreSQL answers ReadyForQuery at once; pgtwist waited for a server connection to ask
    # one (query_wait_timeout on a full pool).
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    session.reclaim(session.server)
    assert session.state == "idle"
    ct.clear()
    sent_before = [s.transport.value() for s in h.proxy.servers]
    session.got_data(m.sync())
    assert ct.value() == m.ready_for_query(p.TX_IDLE)
    assert session.state == "idle" and not session.backlog and session._asked_at is None
    assert [s.transport.value() for s in h.proxy.servers] == sent_before  # (no server asked)
    ct.clear()
    session.got_data(m.sync() + m.flush())  # (libpq's PQpipelineSync)
    session.got_data(m.sync() + m.sync())
    assert ct.value() == m.ready_for_query(p.TX_IDLE) * 3
    ct.clear()
    session.got_data(m.flush())
    assert ct.value() == b"" and session.state == "idle"
    session.got_data(m.query("SELECT 1") + m.sync())  # (work before it: the usual way)
    assert session.state != "idle" or session.backlog


def test_part_of_a_message_holds_no_server_connection():
    # Transaction pooling, between transactions: a client that sends its next message a byte
    # at a time holds no server connection until the message is whole, so a few such clients
    # cannot take the pool from the others.
    h = Harness(pool_mode="transaction", databases={"appdb": {"dbname": "postgres", "nodes": ["db1:5432"], "pool_size": 1}})
    slow, _, server = h.lent()
    slow.reclaim(server)
    query = m.query("SELECT 1")
    slow.got_data(query[:1])
    slow.got_data(query[1:7])
    assert slow.state == "idle" and slow.server is None and server in h.pool.idle
    assert slow.idle_at_rest()  # (client_idle_timeout ends a client that never finishes it)
    other, _ = h.client()
    other.got_data(m.query("SELECT 2"))
    assert other.server is server
    server.got_data(RESULT + Z_IDLE)
    slow.got_data(query[7:])
    assert slow.server is server and queries(server.transport.value())[-1] == "SELECT 1"
