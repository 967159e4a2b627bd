"""query_timeout (the janitor stops what a node has owed a client too long) and TCP keepalive on server sockets."""

import socket

from twisted.internet.error import ConnectionAborted
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pgtwist import config as configmod
from pgtwist.backend.protocol import Keepalive, set_keepalive
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate

from tests.harness.routing import R1, R2, P
from tests.harness.session import (
    RESULT,
    Z_FAILED,
    Z_IDLE,
    Proxy4Test,
    Setup,
    begin,
    error_fields,
    make_config,
    messages,
    queries,
    sent,
    tick,
    types,
)


def aborted(server) -> bool:
    """The server connection was dropped: its transport aborted; the reactor then reports it lost."""
    if not server.transport.disconnecting:
        return False
    server.connection_lost(Failure(ConnectionAborted()))
    return True


def cancels(s) -> list[tuple[str, int]]:
    return [(host, port) for host, port, *_ in s.proxy.reactor.tcpClients]


def test_a_read_the_node_does_not_answer_gets_57014_and_the_session_goes_on():
    s = Setup(query_timeout=3.0)
    session, ct = s.client()
    session.got_data(m.query("SELECT pg_sleep(1000)"))
    first = session.server
    assert str(first.node) in (R1, R2)
    tick(s, 3)
    assert session.server is first and ct.value() == b""  # (3 s is not more than 3 s)
    tick(s, 1)
    assert session.server is None and aborted(first)
    assert types(ct.value()) == "EZ" and ct.value().endswith(Z_IDLE)
    (fields,) = error_fields(ct.value())
    assert (fields["S"], fields["C"]) == ("ERROR", sqlstate.QUERY_CANCELED)
    assert "query_timeout" in fields["M"] and str(first.node) in fields["M"]
    assert "nothing was retried" in fields["D"]
    # The node gets a CancelRequest, and its health is not touched: a slow query is no evidence.
    assert (first.node.host, first.node.port) in cancels(s)
    assert s.monitor.marked == [] and all(st.up for st in s.monitor.states.values())
    assert s.proxy.counters.errors.get(sqlstate.QUERY_CANCELED) == 1
    ct.clear()
    session.got_data(m.query("SELECT 1"))
    again = session.server
    assert again is not None and again is not first and queries(sent(again)) == ["SELECT 1"]
    again.got_data(RESULT + Z_IDLE)
    assert ct.value() == RESULT + Z_IDLE


def test_a_timed_out_read_is_not_replayed_elsewhere():
    s = Setup(query_timeout=1.0)
    session, ct = s.client()
    session.got_data(m.query("SELECT 1"))
    first = session.server
    servers = len(s.proxy.servers)
    tick(s, 2)
    assert aborted(first)
    assert len(s.proxy.servers) == servers and session.state == "idle"


def test_a_statement_in_a_transaction_times_out_and_the_transaction_is_aborted():
    s = Setup(query_timeout=2.0)
    session, ct = s.client()
    server = begin(s, session)
    assert str(server.node) == P
    tick(s, 5)  # idle in a transaction: query_timeout is not idle_transaction_timeout
    assert session.server is server and ct.value() == b""
    session.got_data(m.query("UPDATE t SET x = 1"))
    tick(s, 3)
    assert aborted(server)
    assert types(ct.value()) == "EZ" and ct.value().endswith(Z_FAILED)
    (fields,) = error_fields(ct.value())
    assert fields["C"] == sqlstate.QUERY_CANCELED and "ROLLBACK" in fields["D"]
    assert session.orphaned
    ct.clear()
    session.got_data(m.query("ROLLBACK"))
    assert ct.value() == m.command_complete("ROLLBACK") + Z_IDLE


def test_answers_in_time_reset_the_clock():
    s = Setup(query_timeout=2.0)
    session, ct = s.client()
    for _ in range(3):
        session.got_data(m.query("SELECT 1"))
        server = session.server
        tick(s, 1)
        server.got_data(RESULT + Z_IDLE)
    tick(s, 5)
    assert not server.transport.disconnecting and ct.value() == (RESULT + Z_IDLE) * 3


def test_off_by_default():
    s = Setup()
    assert s.proxy.config.query_timeout == 0.0
    session, ct = s.client()
    session.got_data(m.query("SELECT pg_sleep(1000)"))
    tick(s, 100)
    assert session.server is not None and ct.value() == b""


def test_session_pooling_closes_the_client_with_fatal_57014():
    proxy = Proxy4Test(make_config(query_timeout=1.0))
    transport = StringTransport(lenient=True)
    session = proxy.new_client(transport)
    session.got_data(m.startup_message({"user": "app", "database": "appdb"}))
    transport.clear()
    session.got_data(m.query("SELECT pg_sleep(1000)"))
    server = session.server
    for _ in range(2):
        proxy.clock.advance(1.0)
        proxy.maintain()
    assert server.transport.disconnecting and transport.disconnecting
    (fields,) = [m.decode_fields(b) for t, b in messages(transport.value()) if t == p.ERROR_RESPONSE]
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate.QUERY_CANCELED) and "query_timeout" in fields["M"]
    assert proxy.counters.errors.get(sqlstate.QUERY_CANCELED) == 1


def test_query_timeout_and_keepalive_settings_are_checked():
    base = {"auth_type": "trust", "databases": {"a": {"nodes": ["x:1"]}}}
    c = configmod.from_dict(base)
    assert (c.query_timeout, c.tcp_keepalive, c.tcp_keepidle, c.tcp_keepintvl, c.tcp_keepcnt) == (0.0, True, 0, 0, 0)
    try:
        configmod.from_dict({**base, "query_timeout": -1, "tcp_keepalive": 1, "tcp_keepidle": 1.5, "tcp_keepcnt": 1000})
    except configmod.ConfigError as e:
        paths = sorted(err.split(":")[0] for err in e.errors)
    assert paths == ["query_timeout", "tcp_keepalive", "tcp_keepcnt", "tcp_keepidle"]
    assert Keepalive.from_config(configmod.from_dict({**base, "tcp_keepalive": False})) is None
    assert Keepalive.from_config(configmod.from_dict({**base, "tcp_keepidle": 10, "tcp_keepintvl": 2, "tcp_keepcnt": 3})) == (10, 2, 3)
    # Both apply without a restart (new server connections; the next janitor tick).
    new = configmod.from_dict({**base, "query_timeout": 5, "tcp_keepidle": 10})
    assert configmod.diff(c, new).live == ("query_timeout", "tcp_keepidle")


class _SocketTransport:
    """What set_keepalive uses of a TCP transport, over a real socket."""

    def __init__(self, sock):
        self.sock = sock

    def setTcpKeepAlive(self, on):
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, on)

    def getHandle(self):
        return self.sock


def test_keepalive_options_reach_the_socket():
    with socket.socket() as sock:
        set_keepalive(_SocketTransport(sock), Keepalive(11, 3, 4))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        if hasattr(socket, "TCP_KEEPIDLE"):
            got = [sock.getsockopt(socket.IPPROTO_TCP, o) for o in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)]
            assert got == [11, 3, 4]
    with socket.socket() as sock:
        default_idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) if hasattr(socket, "TCP_KEEPIDLE") else None
        set_keepalive(_SocketTransport(sock), Keepalive())  # zeros: the OS defaults stay
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        if default_idle is not None:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == default_idle
    with socket.socket() as sock:
        set_keepalive(_SocketTransport(sock), None)  # tcp_keepalive = false
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
