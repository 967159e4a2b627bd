"""Transaction pooling with clients outnumbering server connections: a transaction's end hands the connection to the next client in place."""

from collections import deque

import pytest

from pgtwist.session.client import ClientSession
from pgtwist.wire import messages as m

from tests.harness.compiled import pure_only
from tests.harness.session import RESULT, Z_IDLE, Z_IN, RecordingTransport, Setup, finish_internal, parse_settings_query, queries, sent


class Watched(deque):
    """The pool's idle list, noting every connection put on it."""

    def __init__(self, items, calls):
        super().__init__(items)
        self.calls = calls

    def append(self, conn):
        self.calls.append(("idle", conn))
        super().append(conn)

    def appendleft(self, conn):
        self.calls.append(("idle", conn))
        super().appendleft(conn)


@pytest.fixture
def usual_way(monkeypatch):
    """watch(pool, server): a list of each step of the usual way from client to client that is
    taken from now on: unlink, the pool's release and idle list, link, link_server."""

    def watch(pool, server):
        calls: list = []
        for obj, name in ((server, "unlink"), (server, "link"), (pool, "release")):
            method = getattr(obj, name)

            def spy(*args, _name=name, _method=method, **kwargs):
                calls.append((_name, args[0] if args else None))
                return _method(*args, **kwargs)

            monkeypatch.setattr(obj, name, spy)
        monkeypatch.setattr(pool, "idle", Watched(pool.idle, calls))
        link_server = ClientSession.link_server

        def spy_link_server(session, server):
            calls.append(("link_server", session))
            return link_server(session, server)

        monkeypatch.setattr(ClientSession, "link_server", spy_link_server)
        return calls

    return watch


def client(s, **params):
    """A logged-in client (with startup settings *params*); its transport cleared."""
    transport = RecordingTransport()
    session = s.proxy.new_client(transport)
    session.got_data(m.startup_message({"user": "app", "database": "appdb", **params}))
    if session.state == "preparing":  # (settings to sync first: its own, or those another client left)
        server = session.server
        finish_internal(server)
        server.transport.clear()
    assert session.logged_in and session.state in ("idle", "linked"), session.state
    transport.clear()
    return session, transport


def in_transaction(s):
    """Pool size 1: client A in a transaction on the one server connection."""
    a, at = client(s)
    server = a.server
    a.got_data(m.query("BEGIN"))
    assert a.server is server and queries(sent(server)) == ["BEGIN"]
    server.got_data(m.command_complete("BEGIN") + Z_IN)
    at.clear()
    return a, at, server


def waits(s, sql, **params):
    """Another client sends *sql* and waits for the pool."""
    session, transport = client(s, **params)
    session.got_data(m.query(sql))
    assert session.state == "waiting" and session.server is None
    return session, transport


def commit(a, server):
    a.got_data(m.query("COMMIT"))
    assert queries(sent(server)) == ["COMMIT"]
    server.got_data(m.command_complete("COMMIT") + Z_IDLE)


@pure_only
def test_a_transaction_s_end_hands_the_connection_to_the_waiting_client_in_place(usual_way):
    s = Setup(clustered=False, pool_size=1)
    a, at, server = in_transaction(s)
    pool = server.pool
    b, bt = waits(s, "SELECT 2")
    assert list(pool.waiters) == [b]
    s.clock.advance(2)
    calls = usual_way(pool, server)
    commit(a, server)
    assert at.value() == m.command_complete("COMMIT") + Z_IDLE
    assert a.state == "idle" and a.server is None and not a.pinned
    assert b.state == "linked" and b.server is server and server.session is b and server.client_transport is b.transport
    assert server.state == "linked"
    assert calls == []  # not unlinked, released, made idle, linked nor prepared: relinked in place
    assert pool.busy == {server} and not pool.idle and not pool.waiters and not pool.lent
    assert pool.wait_seconds == 2.0 and len(s.proxy.servers) == 1
    assert sent(server) == m.query("SELECT 2")  # b's query, as b sent it, and nothing else
    assert at.producer is None and bt.producer is not None  # b, when full, pauses the node's reads
    server.transport.producer.pauseProducing()  # the node's side is full: b's reads pause, not a's
    assert bt.producerState == "paused" and at.producerState == "producing"
    server.transport.producer.resumeProducing()
    server.got_data(RESULT + Z_IDLE)
    assert bt.value() == RESULT + Z_IDLE and at.value() == m.command_complete("COMMIT") + Z_IDLE
    assert pool.lent == {server: b}  # nobody waits any more: b keeps it, as usual


@pure_only
def test_the_connection_goes_down_the_queue_client_after_client(usual_way):
    s = Setup(clustered=False, pool_size=1)
    a, at, server = in_transaction(s)
    pool = server.pool
    b, bt = waits(s, "SELECT 2")
    c, ct = waits(s, "SELECT 3")
    assert list(pool.waiters) == [b, c]
    calls = usual_way(pool, server)
    commit(a, server)
    assert b.server is server and b.state == "linked" and c.state == "waiting" and list(pool.waiters) == [c]
    assert sent(server) == m.query("SELECT 2")
    server.got_data(RESULT + Z_IDLE)  # b's autocommit statement ends: on to c
    assert bt.value() == RESULT + Z_IDLE and ct.value() == b""
    assert b.state == "idle" and b.server is None
    assert c.state == "linked" and c.server is server and server.session is c
    assert sent(server) == m.query("SELECT 3")
    server.got_data(RESULT + Z_IDLE)
    assert ct.value() == RESULT + Z_IDLE and bt.value() == RESULT + Z_IDLE
    assert calls == [] and pool.busy == {server} and not pool.idle and len(s.proxy.servers) == 1


def test_a_waiter_paused_by_what_it_sent_meanwhile_is_read_again():
    s = Setup(clustered=False, pool_size=1)
    a, at, server = in_transaction(s)
    b, bt = waits(s, "SELECT 2")
    b.got_data(m.query("SELECT 3"))  # more, while it waits: kept, and b is read no further
    assert bt.producerState == "paused"
    commit(a, server)
    assert b.server is server and b.state == "linked"
    assert bt.producerState == "producing"
    assert sent(server) == m.query("SELECT 2") + m.query("SELECT 3")


@pure_only
def test_the_giver_s_next_query_queues_behind(usual_way):
    s = Setup(clustered=False, pool_size=1)
    a, at, server = in_transaction(s)
    pool = server.pool
    b, bt = waits(s, "SELECT 2")
    calls = usual_way(pool, server)
    commit(a, server)
    assert sent(server) == m.query("SELECT 2")
    a.got_data(m.query("SELECT 3"))  # a's next transaction: the connection is b's now
    assert a.state == "waiting" and a.server is None and list(pool.waiters) == [a]
    assert sent(server) == b"" and len(s.proxy.servers) == 1  # nothing for a, and no new connection (pool_size 1)
    server.got_data(RESULT + Z_IDLE)  # b's statement ends: back to a, in place
    assert bt.value() == RESULT + Z_IDLE
    assert b.state == "idle" and b.server is None
    assert a.state == "linked" and a.server is server and server.session is a
    assert sent(server) == m.query("SELECT 3")
    assert calls == [] and pool.busy == {server} and not pool.idle


@pure_only
def test_a_waiter_with_other_settings_gets_the_connection_the_usual_way(usual_way):
    """Its settings are not the connection's: through the pool, and synced before its query goes."""
    s = Setup(clustered=False, pool_size=1)
    b, bt = client(s, application_name="bee")  # (its login set application_name on the one connection)
    a, at, server = in_transaction(s)  # (and a's login set it back)
    assert server.settings == {} and b.settings == {"application_name": "bee"}
    pool = server.pool
    b.got_data(m.query("SELECT 2"))
    assert b.state == "waiting"
    calls = usual_way(pool, server)
    commit(a, server)
    assert a.state == "idle" and a.server is None
    assert b.state == "preparing" and b.server is server
    assert calls == [("unlink", None), ("release", server), ("link_server", b)]  # (not made idle: straight to b)
    (sync,) = queries(sent(server))
    assert parse_settings_query(sync) == {"application_name": "bee"}  # b's query waits for it
    finish_internal(server)
    assert b.state == "linked" and server.session is b and calls[-1] == ("link", b)
    assert sent(server) == m.query("SELECT 2")


def test_a_connection_marked_for_closing_is_not_handed_over():
    """RECONNECT: it goes back to be closed at its transaction's end; the waiter gets a new one."""
    s = Setup(clustered=False, pool_size=1)
    a, at, server = in_transaction(s)
    b, bt = waits(s, "SELECT 2")
    server.taint("RECONNECT")
    commit(a, server)
    assert a.state == "idle" and server.transport.disconnecting and server not in server.pool.busy
    (_, new) = s.proxy.servers
    assert b.server is new and b.state == "linked" and new.session is b
    assert sent(new) == m.query("SELECT 2")


def test_handoff_still_opens_the_reserve_for_a_second_waiter_past_reserve_pool_timeout():
    """As the release through the pool did (_back_to_idle after _give): a handoff in place also
    opens the reserve connection for the next waiter once it has waited reserve_pool_timeout,
    rather than leaving it to the next janitor tick or arrival."""
    s = Setup(clustered=False, pool_size=1, reserve_pool_size=1, reserve_pool_timeout=3)
    a, at, server = in_transaction(s)
    b, bt = waits(s, "SELECT 2")
    c, ct = waits(s, "SELECT 3")
    s.clock.advance(4)  # both have waited past reserve_pool_timeout; no janitor tick yet
    commit(a, server)
    assert b.server is server and b.state == "linked"
    assert c.state == "linked" and c.server is not server, "the reserve connection, opened for c at this release"
