"""BackendProtocol/Factory: connections to nodes, translated into ServerConnection events; cancel delivery."""

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Protocol
from zope.interface import implementer

from pgtwist.server_login import ServerLoginError
from pgtwist.wire import messages as m
from pgtwist.wire import sqlstate


@implementer(IHandshakeListener)
class BackendProtocol(Protocol):
    """Turns a node's bytes into calls on its ServerConnection; decides nothing itself."""

    def __init__(self, conn):
        self.conn = conn
        # Every read goes straight to the connection: one Python call less per read on the hot path.
        self.dataReceived = conn.got_data

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.conn.connection_made(self.transport)

    def dataReceived(self, data):  # (shadowed by the instance's, bound in __init__)
        self.conn.got_data(data)

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
            ServerLoginError.make(sqlstate.CONNECTION_FAILURE, f"could not connect to node {self.conn.node}: {why}")
        )


class CancelProtocol(Protocol):
    """Delivers one CancelRequest to a node on a fresh connection, as libpq does, then hangs up."""

    def __init__(self, process_id: int, secret_key: bytes):
        self.packet = m.cancel_request(process_id, secret_key)

    def connectionMade(self):
        self.transport.write(self.packet)
        self.transport.loseConnection()


class CancelFactory(ClientFactory):
    noisy = False

    def __init__(self, process_id: int, secret_key: bytes):
        self.process_id = process_id
        self.secret_key = secret_key

    def buildProtocol(self, addr):
        return CancelProtocol(self.process_id, self.secret_key)
