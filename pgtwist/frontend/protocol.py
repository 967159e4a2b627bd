"""FrontendProtocol/Factory: client connections, translated into ClientSession events."""

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer


@implementer(IHandshakeListener)
class FrontendProtocol(Protocol):
    """Turns a client's bytes into calls on its ClientSession; decides nothing itself."""

    session = None

    def connectionMade(self):
        transport = self.transport
        if hasattr(transport, "setTcpNoDelay") and not getattr(transport, "nodelay", False):  # (not on a Unix socket; not inherited)
            transport.setTcpNoDelay(True)
        self.session = self.factory.proxy.new_client(self.transport)
        # Every read goes straight to the session (compiled): no Python frame of ours per read.
        self.dataReceived = self.session.got_data

    def dataReceived(self, data):
        self.session.got_data(data)

    def handshakeCompleted(self):
        self.session.tls_established()

    def connectionLost(self, reason):
        if self.session is not None:
            self.session.connection_lost(reason)


class FrontendFactory(Factory):
    protocol = FrontendProtocol
    noisy = False

    def __init__(self, proxy):
        self.proxy = proxy
