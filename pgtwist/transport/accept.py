"""Client connections accepted, described and closed with the fewest calls: tcp.Port/Server as pgtwist uses them."""

from __future__ import annotations

import socket
import sys

from twisted.internet import abstract, address, error, tcp
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger

log = Logger()

# A short-lived client (a Kubernetes job, a PHP request, pgbench -C) costs a login per
# transaction, and Twisted's accept path is most of what pgtwist spends on a login besides
# the protocol itself: a context manager and a generator per accept round, socket.accept()'s
# wrapper (which turns the family and type into enums), an attrs address built and validated
# for buildProtocol and again for each getPeer(), a log prefix and a repr formatted for every
# connection though nothing reads them, Failure.check() walking class names when the
# connection closes, and loseConnection() registering for writability to find an empty
# buffer one poll later. These classes keep Twisted's behaviour and attributes (the unit
# tests compare them with tcp.Server's) and drop that work. Anything unusual (an accept
# error, TLS, bytes still queued, a producer) goes through Twisted's own code.

_IPV6_NAMEINFO = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV

# PgBouncer's tcp_defer_accept: the kernel hands over a connection once its first bytes have come
# (or, for a client that sends nothing, once the period runs out: PgBouncer's 45 s). A login then
# wakes the pooler once for accept and startup packet together, and ClientPort reads those bytes
# in the same turn: one sleep, one wake-up and one poll fewer per login.
DEFER_ACCEPT_SECONDS = 45


def set_defer_accept(sock) -> bool:
    """TCP_DEFER_ACCEPT on a listening socket (Linux); False where there is no such option."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, DEFER_ACCEPT_SECONDS)
    except OSError:
        return False
    return True


def set_nodelay(sock) -> bool:
    """TCP_NODELAY on a socket about to listen, for the connections it will accept: True where
    they inherit it (Linux copies the listener's setting into each connection as the handshake
    makes it), so that no setsockopt is made per login; False elsewhere, where each connection
    sets its own (FrontendProtocol). Before listen(): a connection already in the queue when it
    is set would not have it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


def has_nodelay(sock) -> bool:
    """Whether an adopted listening socket was given TCP_NODELAY before it listened (the
    supervisor's, workers.listening_socket), so that all it accepts inherit it (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except OSError:
        return False


class ClientConnection(tcp.Server):
    """A client's TCP connection: tcp.Server with its descriptions made when asked, and a quick close."""

    @property
    def nodelay(self) -> bool:
        """Whether TCP_NODELAY came from the listening socket (set_nodelay): FrontendProtocol
        then sets nothing. (Asked of the port: no attribute per connection.)"""
        return bool(getattr(self.server, "nodelay", False))

    def __init__(self, skt, protocol, client, server, sessionno, reactor, peer=None):
        # What tcp.Server.__init__ (with Connection's and FileDescriptor's) sets, but logstr and
        # repstr, which logPrefix() and __repr__() make when asked.
        self.reactor = reactor
        self._tempDataBuffer = []
        self._tempDataLen = 0
        self.socket = skt
        skt.setblocking(False)
        self.fileno = skt.fileno
        self.protocol = protocol
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self._peer = peer
        self._protocol_name = type(protocol).__name__
        self._port_number = server._realPortNumber if server is not None else None  # (for __repr__)
        self.startReading()
        self.connected = 1

    def logPrefix(self) -> str:
        return f"{self._protocol_name},{self.sessionno},{self.hostname}"

    def __repr__(self) -> str:
        return f"<{self._protocol_name} #{self.sessionno} on {self._port_number}>"

    def getPeer(self):
        """The client's address: made once (at accept), not once per call."""
        peer = self._peer
        if peer is None:
            peer = self._peer = self._addressType("TCP", *self.client)  # type: ignore[arg-type]
        return peer

    def connectionLost(self, reason, polled: bool = True) -> None:
        # tcp.Connection.connectionLost, with an isinstance() for Failure.check(), which
        # computes the qualified name of every class in the error's hierarchy.
        if not hasattr(self, "socket"):
            return  # (called twice: see tcp.Connection.connectionLost)
        if polled:
            abstract.FileDescriptor.connectionLost(self, reason)
        else:
            # (What it does for a connection polled for nothing, with no producer: close_now.)
            self.disconnected = 1
            self.connected = 0
        self._closeSocket(not isinstance(reason.value, error.ConnectionAborted))
        protocol = self.protocol
        del self.protocol
        del self.socket
        del self.fileno
        protocol.connectionLost(reason)  # type: ignore[call-arg]  # (IProtocol's stub lacks self)

    def close_now(self, reason) -> None:
        """The close at the end of loseConnection()'s turn (ProxyReactor.close_soon), when the
        connection is polled for nothing (loseConnection() stopped its reading), has nothing
        queued and no producer: what _disconnectSelectable() and connectionLost() would do then,
        without their calls to take it out of poll sets it is not in (five per client)."""
        self.connectionLost(reason, polled=False)

    def loseConnection(self) -> None:
        """Close once the bytes written are sent: with none queued, in this very reactor turn.

        Twisted stops reading and registers for writability, and a poll later finds nothing to
        write and closes. On a ProxyReactor, which offers close_soon(), a connection with nothing
        queued and no producer is closed at the end of the current turn instead (still after
        the caller has returned, as loseConnection() promises): two epoll_ctl calls and one
        poll round fewer per client that leaves.
        """
        close_soon = getattr(self.reactor, "close_soon", None)
        if close_soon is None or self.TLS or not self.connected or self.disconnecting or self._writeDisconnected or not nothing_queued(self):
            super().loseConnection()
            return
        self.stopReading()
        self.disconnecting = 1
        close_soon(self)


def nothing_queued(transport) -> bool:
    """Whether a closing connection may go now: no bytes queued and no producer to wait for."""
    return not transport._tempDataBuffer and transport.offset == len(transport.dataBuffer) and transport.producer is None


class ClientPort(tcp.Port):
    """A listening TCP port for clients: accepts as tcp.Port does, in one loop of its own."""

    transport = ClientConnection
    defer_accept = False  # TCP_DEFER_ACCEPT is set: what is accepted has bytes to read already
    nodelay = False  # TCP_NODELAY was set before listen(), and all it accepts inherit it (set_nodelay)

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        self.nodelay = set_nodelay(sock)  # (startListening binds and listens after this)
        return sock

    def doRead(self) -> None:
        accept = self.socket._accept  # type: ignore[union-attr]  # (socket.accept() minus its wrapper)
        family = self.addressFamily
        limit = self.numberAccepts
        accepted = 0
        try:
            while accepted < limit:
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    # EMFILE (Twisted frees its reserved descriptor to shed the client), EPERM
                    # (netfilter), ECONNABORTED...: Twisted's loop meets the same condition at
                    # once and knows what to do with each.
                    tcp.Port.doRead(self)
                    return
                accepted += 1
                skt = socket.socket(family, socket.SOCK_STREAM, 0, fd)
                if len(addr) == 4:  # IPv6: with its scope id, numeric (as tcp.Port does)
                    host = socket.getnameinfo(addr, _IPV6_NAMEINFO)
                    addr = (host[0], *addr[1:])
                peer = self._addressType("TCP", *addr)
                protocol = self.factory.buildProtocol(peer)  # type: ignore[union-attr,arg-type]
                if protocol is None:
                    skt.close()
                    continue
                sessionno = self.sessionno
                self.sessionno = sessionno + 1
                connection = ClientConnection(skt, protocol, addr, self, sessionno, self.reactor, peer)
                protocol.makeConnection(connection)  # type: ignore[arg-type]
                if self.defer_accept and connection.connected and not connection.disconnecting:
                    self._read_at_once(connection)
        except Exception:
            log.failure("accepting a client on {port!r}", port=self)
        # (tcp.Port's scaling of consecutive accepts per turn)
        self.numberAccepts = limit + 20 if accepted == limit else max(1, accepted)


    def _read_at_once(self, connection) -> None:
        """The client's first bytes, read now rather than after a poll (as _doReadOrWrite reads)."""
        try:
            why = connection.doRead()
        except Exception:
            why = sys.exc_info()[1]
            log.failure("reading a client's first bytes on {port!r}", port=self)
        if why:
            self.reactor._disconnectSelectable(connection, why, True)


def set_client_keepalive(port, on: bool, idle: int = 0, interval: int = 0, count: int = 0) -> bool:
    """TCP keepalive for clients (PgBouncer's tcp_keepalive and tcp_keep*, which it applies to
    both sides): a client whose host vanished (a pod killed without a FIN, a NAT that forgot the
    flow) is noticed by the kernel and its connection closed, instead of holding a client slot
    for good. Set on the listening socket, which accepted sockets inherit on Linux: no system
    call per login. 0 leaves that knob as it is. False where *port* has no TCP socket."""
    sock = getattr(port, "socket", None)
    if not isinstance(sock, socket.socket) or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if on else 0)
    if on:
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
            option = getattr(socket, name, None)
            if value and option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return True


def listen_tcp(reactor, port: int, factory, backlog: int, interface: str, defer_accept: bool = False):
    """reactor.listenTCP, with ClientPort on a real reactor (a test's MemoryReactor records the call)."""
    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    p = ClientPort(port, factory, backlog, interface, reactor)
    p.startListening()
    p.defer_accept = defer_accept and set_defer_accept(p.socket)
    return p


def adopt_tcp(reactor, fd: int, family: int, factory, defer_accept: bool = False):
    """reactor.adoptStreamPort (a worker's share of the supervisor's socket), with ClientPort on a real reactor."""
    if not isinstance(reactor, PosixReactorBase) or family not in (socket.AF_INET, socket.AF_INET6):
        return reactor.adoptStreamPort(fd, family, factory)
    p = ClientPort._fromListeningDescriptor(reactor, fd, family, factory)
    p.startListening()
    p.defer_accept = defer_accept and set_defer_accept(p.socket)
    p.nodelay = has_nodelay(p.socket)
    return p
