"""ClientPort/ClientConnection on real loopback sockets: Twisted's behaviour, minus its per-connection work.

A ProxyReactor is driven by hand (doPoll) so each test sees exactly which reactor turn accepts,
reads and closes; nothing sleeps, and every socket the test opens has a timeout.
"""

from __future__ import annotations

import errno
import socket
from types import SimpleNamespace

import pytest
from twisted.internet import address, error, protocol, tcp
from twisted.internet.testing import MemoryReactorClock

from pgtwist.transport import accept
from pgtwist.transport import reactor as reactormod
from pgtwist.transport.sendnow import write_now

pytestmark = pytest.mark.skipif(reactormod.ProxyReactor is None, reason="epoll is Linux-only")


class Server(protocol.Protocol):
    """Records what happens to it; says *reply* and closes when it reads *close_on*."""

    def __init__(self, log):
        self.log = log
        self.reply = b""

    def connectionMade(self):
        self.log.append(("made", self.transport))

    def dataReceived(self, data):
        self.log.append(("data", data))
        if data.startswith(b"X"):  # (as a Terminate: write the reply, then close)
            write_now(self.transport, self.reply)
            self.transport.loseConnection()
            self.log.append(("lose called",))
        elif data.startswith(b"Q"):  # queued through write(), then close
            self.transport.write(b"queued")
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.log.append(("lost", type(reason.value)))


class ServerFactory(protocol.Factory):
    def __init__(self):
        self.log = []
        self.addresses = []

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        p = Server(self.log)
        p.factory = self
        return p


@pytest.fixture
def served():
    """A ProxyReactor with a ClientPort on 127.0.0.1; yields (reactor, port, factory, connect)."""
    r = reactormod.ProxyReactor()
    factory = ServerFactory()
    port = accept.listen_tcp(r, 0, factory, backlog=50, interface="127.0.0.1")
    clients = []

    def connect():
        c = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        clients.append(c)
        for _ in range(50):
            r.doPoll(0.1)
            if len([e for e in factory.log if e[0] == "made"]) == len(clients):
                break
        return c

    yield r, port, factory, connect
    for c in clients:
        c.close()
    port.stopListening()
    for _ in range(3):
        r.doPoll(0)
    r.waker.connectionLost(None)
    r._poller.close()


def _turn_until(r, predicate, turns=50):
    for _ in range(turns):
        if predicate():
            return True
        r.runUntilCurrent()
        r.doPoll(0.1)
    return predicate()


def test_accepted_clients_get_a_client_connection_with_their_address(served):
    r, port, factory, connect = served
    c = connect()
    (made,) = [e for e in factory.log if e[0] == "made"]
    transport = made[1]
    assert type(transport) is accept.ClientConnection
    peer = transport.getPeer()
    assert peer == address.IPv4Address("TCP", *c.getsockname())
    assert transport.getPeer() is peer  # made once
    assert factory.addresses == [peer]  # and it is what buildProtocol was given
    assert transport.getHost() == address.IPv4Address("TCP", "127.0.0.1", port.getHost().port)
    # Twisted's descriptions, made when asked.
    assert transport.logPrefix() == "Server,0,127.0.0.1"
    assert repr(transport) == f"<Server #0 on {port.getHost().port}>"
    assert transport.connected and not transport.disconnected


def test_a_client_connection_holds_what_tcp_server_would(served):
    """Every attribute tcp.Server.__init__ sets is set the same (so Twisted's code that reads them works),
    checked against the Twisted that is installed."""
    r, port, factory, connect = served
    connect()
    ours = factory.log[0][1]
    theirs_sock, peer_end = socket.socketpair()
    try:
        theirs = tcp.Server(theirs_sock, Server([]), ours.client, port, ours.sessionno, r)
        made_lazily = {"logstr", "repstr"}
        ours_only = {"_peer", "_protocol_name", "_port_number"}
        assert set(vars(theirs)) - made_lazily == set(vars(ours)) - ours_only
        for name in set(vars(theirs)) - made_lazily - {"socket", "fileno", "protocol"}:
            assert getattr(ours, name) == getattr(theirs, name), name
        assert ours.logPrefix() == theirs.logPrefix() and repr(ours) == repr(theirs)
        assert ours.socket.getblocking() is False
    finally:
        theirs.stopReading()
        theirs_sock.close()
        peer_end.close()


def test_accepted_clients_inherit_tcp_nodelay_from_the_listening_socket(served):
    # Set once on the listener (Linux copies it into each accepted socket): no setsockopt per login.
    r, port, factory, connect = served
    connect()
    transport = factory.log[0][1]
    assert port.nodelay and transport.nodelay
    assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.parametrize("given", [True, False])
def test_a_client_queued_before_a_worker_adopts_the_socket_has_tcp_nodelay(given):
    # The supervisor's socket gets TCP_NODELAY before it listens (workers.listening_socket), so a
    # client that connects before a worker adopts it inherits it too; a socket listened without
    # it is not taken for one that has it, and FrontendProtocol sets it per connection then.
    from types import SimpleNamespace

    from pgtwist.frontend.protocol import FrontendProtocol
    from pgtwist.service.workers import listening_socket

    class Factory(protocol.Factory):
        protocol = FrontendProtocol

        def __init__(self):
            self.made = []
            self.proxy = SimpleNamespace(new_client=self.made.append)

    r = reactormod.ProxyReactor()
    if given:
        sock = listening_socket(SimpleNamespace(host="127.0.0.1", port=0))
    else:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)  # (as the supervisor hands its socket over)
    c = socket.create_connection(sock.getsockname(), timeout=5)  # (queued: nobody accepts yet)
    factory = Factory()
    port = accept.adopt_tcp(r, sock.fileno(), socket.AF_INET, factory)
    try:
        for _ in range(50):
            r.doPoll(0.1)
            if factory.made:
                break
        (transport,) = factory.made
        assert port.nodelay is given and transport.nodelay is given
        assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        c.close()
        port.stopListening()
        sock.close()
        r.doPoll(0)
        r.waker.connectionLost(None)
        r._poller.close()


def test_a_client_closed_with_bytes_still_unread_gets_the_end_of_the_stream_not_a_reset(served):
    # What was written before the close (a FATAL) and then the FIN, as from Twisted's own close:
    # close() alone answers unread bytes with a reset.
    r, port, factory, connect = served
    c = connect()
    transport = factory.log[0][1]
    transport.protocol.reply = b"E-FATAL"
    c.sendall(b"X" + b"y" * 70_000)  # (more than one read of 65,536 takes, less than a socket buffer holds)
    assert _turn_until(r, lambda: transport.disconnected)
    got = b""
    while True:
        chunk = c.recv(100)  # (a reset would raise ConnectionResetError here)
        if not chunk:
            break
        got += chunk
    assert got == b"E-FATAL"


def test_frontend_protocol_sets_tcp_nodelay_only_where_it_was_not_inherited():
    from pgtwist.frontend.protocol import FrontendProtocol

    class Transport:
        def __init__(self, nodelay):
            self.nodelay = nodelay
            self.set = []

        def setTcpNoDelay(self, enabled):
            self.set.append(enabled)

    class Factory:
        class proxy:
            @staticmethod
            def new_client(transport):
                return SimpleNamespace(got_data=lambda data: None)  # (a session: reads go to it)

    for nodelay, expected in ((True, []), (False, [True])):
        protocol = FrontendProtocol()
        protocol.factory = Factory
        transport = Transport(nodelay)
        protocol.makeConnection(transport)
        assert transport.set == expected


def test_frontend_protocol_hands_every_read_straight_to_its_session():
    # (No Python frame of the protocol's per read: the session, compiled, counts the bytes too.)
    from pgtwist.frontend.protocol import FrontendProtocol

    reads: list = []

    class Session:
        def got_data(self, data):
            reads.append(data)

    session = Session()

    class Factory:
        class proxy:
            @staticmethod
            def new_client(transport):
                return session

    protocol = FrontendProtocol()
    protocol.factory = Factory
    protocol.makeConnection(SimpleNamespace(nodelay=True))
    assert protocol.dataReceived == session.got_data
    protocol.dataReceived(b"Q")
    assert reads == [b"Q"]


def test_loseconnection_with_nothing_queued_closes_in_the_same_turn(served):
    r, port, factory, connect = served
    c = connect()
    transport = factory.log[0][1]
    fd = transport.fileno()
    transport.protocol.reply = b"bye"
    c.sendall(b"X")
    assert _turn_until(r, lambda: any(e[0] == "data" for e in factory.log))
    # The read, the loseConnection() and the close all happened in that one turn.
    assert [e[0] for e in factory.log] == ["made", "data", "lose called", "lost"]
    assert factory.log[-1] == ("lost", type(reactormod.CONNECTION_DONE))
    assert transport.disconnected and r._closing is None
    assert fd not in r._selectables
    received = b""
    while True:
        chunk = c.recv(100)
        if not chunk:
            break
        received += chunk
    assert received == b"bye"  # what was written first still arrives, then the end of the stream


def test_bytes_queued_before_the_close_are_flushed_first(served):
    r, port, factory, connect = served
    c = connect()
    transport = factory.log[0][1]
    c.sendall(b"Q")
    assert _turn_until(r, lambda: transport.disconnected)
    received = b""
    c.settimeout(5)
    while True:
        chunk = c.recv(100)
        if not chunk:
            break
        received += chunk
    assert received == b"queued"


def test_a_close_asked_for_outside_a_poll_turn_happens_before_the_next_poll(served):
    r, port, factory, connect = served
    c = connect()
    transport = factory.log[0][1]
    transport.loseConnection()  # (as a timer's callback would, between turns)
    assert not transport.disconnected and r._closing == [transport]
    r.doPoll(0)
    assert transport.disconnected
    assert c.recv(10) == b""


def test_a_write_after_loseconnection_is_still_delivered(served):
    r, port, factory, connect = served
    c = connect()
    transport = factory.log[0][1]
    transport.loseConnection()
    transport.write(b"late")  # queued: the pending close leaves it to Twisted's flush-then-close
    assert _turn_until(r, lambda: transport.disconnected)
    assert c.recv(10) == b"late"


def test_the_close_at_the_end_of_the_turn_is_the_short_one_unless_still_polled(served, monkeypatch):
    # Polled for nothing (loseConnection stopped its reading): closed by close_now, which tells
    # the protocol what Twisted's path would (a clean close). Read again meanwhile: Twisted's path,
    # which takes it out of the poll set too.
    r, port, factory, connect = served
    short = []
    monkeypatch.setattr(accept.ClientConnection, "close_now", lambda self, reason, real=accept.ClientConnection.close_now: (short.append(self), real(self, reason)))
    a, b = connect(), connect()
    first, second = (e[1] for e in factory.log if e[0] == "made")
    for transport in (first, second):
        transport.loseConnection()
    second.startReading()
    fd = second.fileno()
    r.doPoll(0)
    assert short == [first]
    assert first.disconnected and second.disconnected and fd not in r._reads and fd not in r._selectables
    assert [e[1] for e in factory.log if e[0] == "lost"] == [error.ConnectionDone, error.ConnectionDone]
    assert a.recv(10) == b"" and b.recv(10) == b""


def test_without_close_soon_loseconnection_is_twisteds():
    conn = accept.ClientConnection.__new__(accept.ClientConnection)
    conn.reactor = MemoryReactorClock()  # (no close_soon: not a ProxyReactor)
    conn.connected = 1
    asked = []
    conn.stopReading = lambda: asked.append("stopReading")
    conn.startWriting = lambda: asked.append("startWriting")
    conn._tempDataBuffer = []
    conn.loseConnection()
    assert asked == ["stopReading", "startWriting"] and conn.disconnecting


def test_an_accept_error_goes_to_twisteds_loop(served, monkeypatch):
    r, port, factory, connect = served
    calls = []

    class Failing:
        def _accept(self):
            raise OSError(errno.EMFILE, "too many open files")

    monkeypatch.setattr(port, "socket", Failing())
    monkeypatch.setattr(tcp.Port, "doRead", lambda self: calls.append(self))
    port.doRead()
    assert calls == [port]


def test_a_refused_client_is_closed(served):
    r, port, factory, connect = served
    factory.buildProtocol = lambda addr: None
    c = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        _turn_until(r, lambda: False, turns=3)
        assert c.recv(10) == b""
    finally:
        c.close()


def test_memory_reactors_get_listen_tcp_as_asked():
    r = MemoryReactorClock()
    accept.listen_tcp(r, 6432, object(), backlog=10, interface="127.0.0.1")
    assert [(s[0], s[2], s[3]) for s in r.tcpServers] == [(6432, 10, "127.0.0.1")]


class _RecordingPoller:
    def __init__(self, poller):
        self.poller = poller
        self.timeouts = []

    def poll(self, timeout, maxevents):
        self.timeouts.append(timeout)
        return self.poller.poll(timeout, maxevents)

    def __getattr__(self, name):
        return getattr(self.poller, name)


def test_closes_asked_for_between_turns_make_the_next_poll_not_wait(served):
    """What a close sets off (a protocol's callLater(0)) must not wait for the poll's timeout."""
    r, port, factory, connect = served
    connect()
    transport = factory.log[0][1]
    transport.loseConnection()
    recording = r._poller = _RecordingPoller(r._poller)
    try:
        r.doPoll(5.0)
    finally:
        r._poller = recording.poller
    assert transport.disconnected and recording.timeouts == [0]


def test_an_abort_after_loseconnection_is_still_an_abort(served):
    r, port, factory, connect = served
    connect()
    transport = factory.log[0][1]
    transport.loseConnection()
    transport.abortConnection()  # (Twisted's: a reset, reported as ConnectionAborted)
    assert _turn_until(r, lambda: transport.disconnected)
    from twisted.internet.error import ConnectionAborted

    assert factory.log[-1] == ("lost", ConnectionAborted)


def test_a_producer_registered_after_loseconnection_leaves_the_close_to_twisted(served):
    r, port, factory, connect = served
    c = connect()
    transport = factory.log[0][1]

    stopped = []

    class Producer:
        def pauseProducing(self):
            pass

        def resumeProducing(self):
            pass

        def stopProducing(self):
            stopped.append(True)

    transport.loseConnection()
    transport.registerProducer(Producer(), True)
    # As Twisted's own close does it: doWrite, with a streaming producer that is not paused,
    # closes, and the producer is told to stop.
    assert _turn_until(r, lambda: transport.disconnected)
    assert stopped == [True] and c.recv(10) == b""


def test_with_tcp_defer_accept_the_first_bytes_are_read_in_the_accepting_turn():
    r = reactormod.ProxyReactor()
    factory = ServerFactory()
    port = accept.listen_tcp(r, 0, factory, backlog=50, interface="127.0.0.1", defer_accept=True)
    try:
        if not port.defer_accept:
            pytest.skip("no TCP_DEFER_ACCEPT on this platform")
        assert port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        c = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        try:
            c.sendall(b"hello")
            assert _turn_until(r, lambda: factory.log)
            assert [e[0] for e in factory.log] == ["made", "data"]  # one turn: accepted and read
            assert factory.log[1] == ("data", b"hello")
        finally:
            c.close()
    finally:
        port.stopListening()
        for _ in range(3):
            r.doPoll(0)
        r.waker.connectionLost(None)
        r._poller.close()


def test_a_client_gone_before_its_first_read_is_closed_on_that_read(served, monkeypatch):
    """What _read_at_once meets at EOF (a client that sent and left): the close Twisted would make."""
    r, port, factory, connect = served
    c = connect()
    transport = factory.log[0][1]
    c.close()
    for _ in range(50):
        if transport.disconnected:
            break
        port._read_at_once(transport)
    assert transport.disconnected and factory.log[-1] == ("lost", type(reactormod.CONNECTION_DONE))


def test_client_keepalive_set_on_the_listener_is_what_accepted_sockets_get():
    import socket as socketmod

    from pgtwist.transport.accept import set_client_keepalive

    class Port:
        def __init__(self, sock):
            self.socket = sock

    listener = socketmod.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener:
        assert set_client_keepalive(Port(listener), True, 33, 7, 4)
        with socketmod.create_connection(listener.getsockname()) as _client:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socketmod.SOL_SOCKET, socketmod.SO_KEEPALIVE) == 1
                assert accepted.getsockopt(socketmod.IPPROTO_TCP, socketmod.TCP_KEEPIDLE) == 33
                assert accepted.getsockopt(socketmod.IPPROTO_TCP, socketmod.TCP_KEEPINTVL) == 7
                assert accepted.getsockopt(socketmod.IPPROTO_TCP, socketmod.TCP_KEEPCNT) == 4
        assert set_client_keepalive(Port(listener), False)  # (a reload turned it off)
        assert listener.getsockopt(socketmod.SOL_SOCKET, socketmod.SO_KEEPALIVE) == 0
    unix = socketmod.socket(socketmod.AF_UNIX)
    with unix:
        assert not set_client_keepalive(Port(unix), True, 33)  # (the Unix socket: no TCP to keep alive)
    assert not set_client_keepalive(object(), True)  # (a test's MemoryReactor port)
