"""FrontendProtocol/Factory: client connections, translated into ClientSession events."""

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pgtwist import tls

log = Logger()


@implementer(IHandshakeListener)
class FrontendProtocol(Protocol):
    """Turns a client's bytes into calls on its ClientSession; decides nothing itself."""

    session = None

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.session = self.factory.proxy.new_client(self.transport)

    def dataReceived(self, data):
        self.session.got_data(data)

    def handshakeCompleted(self):
        self.session.tls_established()

    def connectionLost(self, reason):
        if tls.is_tls_failure(reason):
            log.info("client {client}: TLS failed: {why}", client=getattr(self.session, "id", "?"), why=tls.failure_text(reason))
        if self.session is not None:
            self.session.connection_lost(reason)


class FrontendFactory(Factory):
    protocol = FrontendProtocol
    noisy = False

    def __init__(self, proxy):
        self.proxy = proxy
