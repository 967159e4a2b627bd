"""BackendProtocol/Factory: connections to nodes, translated into ServerConnection events; cancel delivery."""

import socket
from typing import NamedTuple

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pgtwist.backend.login import ServerLoginError
from pgtwist.wire import messages as m
from pgtwist.wire import sqlstate

log = Logger()


class Keepalive(NamedTuple):
    """tcp_keepidle, tcp_keepintvl, tcp_keepcnt (0: the OS default) of a server connection with tcp_keepalive on."""

    idle: int = 0
    interval: int = 0
    count: int = 0

    @classmethod
    def from_config(cls, config) -> "Keepalive | None":
        if not config.tcp_keepalive:
            return None
        return cls(config.tcp_keepidle, config.tcp_keepintvl, config.tcp_keepcnt)


# (option name in socket, Keepalive field): the per-socket knobs exist on Linux; elsewhere the OS defaults hold.
_KEEPALIVE_OPTIONS = tuple(
    (getattr(socket, name), field)
    for name, field in (("TCP_KEEPIDLE", "idle"), ("TCP_KEEPINTVL", "interval"), ("TCP_KEEPCNT", "count"))
    if hasattr(socket, name)
)


def set_keepalive(transport, keepalive: Keepalive | None) -> None:
    """Turn on TCP keepalive for a connection to a node: a host that vanished (power, network) is
    noticed by the kernel within idle + interval * count seconds even while no byte is due, and the
    connection fails like any lost one. (A process that is merely frozen still ACKs: query_timeout
    and the health probes' timeout cover that.)"""
    if keepalive is None or not hasattr(transport, "setTcpKeepAlive"):
        return  # (an in-memory transport in tests)
    transport.setTcpKeepAlive(1)
    handle = getattr(transport, "getHandle", None)
    sock = handle() if handle is not None else None
    if not isinstance(sock, socket.socket):
        return  # (an in-memory transport in tests)
    for option, field in _KEEPALIVE_OPTIONS:
        value = getattr(keepalive, field)
        if value:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError as e:
                log.warn("cannot set TCP keepalive option {field}={value}: {why}", field=field, value=value, why=e)


@implementer(IHandshakeListener)
class BackendProtocol(Protocol):
    """Turns a node's bytes into calls on its ServerConnection; decides nothing itself."""

    def __init__(self, conn):
        self.conn = conn
        # Every read goes straight to the connection: one Python call less per read on the hot path.
        self.dataReceived = conn.got_data

    def connectionMade(self):
        if hasattr(self.transport, "setTcpNoDelay"):  # (not on a Unix socket)
            self.transport.setTcpNoDelay(True)
        set_keepalive(self.transport, self.conn.keepalive)
        self.conn.connection_made(self.transport)

    def handshakeCompleted(self):
        self.conn.tls_established()

    def connectionLost(self, reason):
        self.conn.connection_lost(reason)


class BackendFactory(ClientFactory):
    noisy = False

    def __init__(self, conn):
        self.conn = conn
        # Every read goes straight to the connection: one Python call less per read on the hot path.
        self.dataReceived = conn.got_data

    def buildProtocol(self, addr):
        return BackendProtocol(self.conn)

    def clientConnectionFailed(self, connector, reason):
        why = reason.getErrorMessage()
        self.conn.connect_failed(
            ServerLoginError(sqlstate.CONNECTION_FAILURE, f"could not connect to node {self.conn.node}: {why}")
        )


@implementer(IHandshakeListener)
class CancelProtocol(Protocol):
    """Delivers one CancelRequest to a node on a fresh connection, as libpq does, then hangs up.

    With [server_tls] the request goes inside TLS, as libpq 17 sends it: SSLRequest first, and
    the cancel key only once the node is verified (a plaintext key would let anyone on the path
    cancel that node's queries). Under mode "prefer" a node without TLS gets it in plaintext.
    """

    def __init__(
        self, process_id: int, secret_key: bytes, node_tls=None, node: str = "", host: str = "", clock=None, timeout: float = 0, done=None
    ):
        self.packet = m.cancel_request(process_id, secret_key)
        self.done = done  # called once the attempt is over (delivered, refused or lost)
        self.node_tls = node_tls
        self.node = node
        self.host = host
        self.clock = clock
        self.timeout = timeout
        self._answer_awaited = False
        self._timer = None

    def connectionMade(self):
        if self.node_tls is None:
            self._deliver()
            return
        self._answer_awaited = True
        self.transport.write(m.ssl_request())
        if self.clock is not None and self.timeout:
            # A frozen node never answers the SSLRequest (nor finishes a handshake): without a
            # bound, each cancel sent to it would hold a socket for as long as it stays frozen.
            self._timer = self.clock.callLater(self.timeout, self._timed_out)

    def _timed_out(self):
        self._timer = None
        log.warn("cancel to node {node} not sent: no TLS answer within {timeout:g} s", node=self.node, timeout=self.timeout)
        self.transport.abortConnection()

    def connectionLost(self, reason):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        done, self.done = self.done, None
        if done is not None:
            done()

    def dataReceived(self, data):
        if not self._answer_awaited:
            return  # (a node answers a CancelRequest with nothing; the TLS layer's bytes are its own)
        self._answer_awaited = False
        try:
            start = self.node_tls.answer(data, self.node)
        except ServerLoginError as e:
            log.warn("cancel to node {node} not sent: {why}", node=self.node, why=e.fields.get("M"))
            if self._timer is not None:  # (loseConnection reports later)
                self._timer.cancel()
                self._timer = None
            self.transport.loseConnection()
            return
        if start:
            self.transport.startTLS(self.node_tls.handshake(self.host))  # handshakeCompleted delivers
        else:
            self._deliver()

    def handshakeCompleted(self):
        self._deliver()

    def _deliver(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport.write(self.packet)
        if self.clock is None or not self.timeout:
            self.transport.loseConnection()
            return
        # The node closes the connection once it has signalled the backend: only then is the
        # cancel done (done() tells the client). A node that never closes it is left after timeout.
        self._timer = self.clock.callLater(self.timeout, self._node_kept_open)

    def _node_kept_open(self):
        self._timer = None  # (fired: connectionLost must not cancel it)
        self.transport.abortConnection()


class CancelFactory(ClientFactory):
    noisy = False

    def __init__(self, process_id: int, secret_key: bytes, node_tls=None, node=None, clock=None, timeout: float = 0, done=None):
        self.done = done  # called once the cancel was delivered, or could not be
        self.process_id = process_id
        self.secret_key = secret_key
        self.node_tls = node_tls
        self.node = node
        self.clock = clock
        self.timeout = timeout  # for the node's TLS answer and handshake (server_connect_timeout)

    def buildProtocol(self, addr):
        node = self.node
        return CancelProtocol(
            self.process_id,
            self.secret_key,
            self.node_tls,
            str(node) if node is not None else "",
            node.host if node is not None else "",
            self.clock,
            self.timeout,
            self._finished,
        )

    def _finished(self):
        done, self.done = self.done, None
        if done is not None:
            done()

    def clientConnectionFailed(self, connector, reason):
        self._finished()
