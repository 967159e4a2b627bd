"""write_now on real sockets: a connected TCP pair on loopback through the real reactor.

write_now reads Twisted's private buffer fields, so only real tcp.Server/tcp.Client transports
can show it right: the bytes leave before the reactor turns when nothing is queued, and once
anything is queued it hands over to transport.write() so the order is kept. No PostgreSQL here.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.testing import StringTransport

from pgtwist.transport.sendnow import write_now

DEADLINE = 10  # seconds: a lost byte fails the test instead of hanging it


class Receiver(protocol.Protocol):
    """Keeps what arrives; until(n) fires once n bytes have."""

    def __init__(self):
        self.received = bytearray()
        self._waiting: list[tuple[int, defer.Deferred]] = []

    def dataReceived(self, data):
        self.received += data
        still = []
        for n, d in self._waiting:
            if len(self.received) >= n:
                d.callback(bytes(self.received))
            else:
                still.append((n, d))
        self._waiting = still

    def until(self, n: int) -> defer.Deferred:
        d = defer.Deferred()
        if len(self.received) >= n:
            d.callback(bytes(self.received))
        else:
            self._waiting.append((n, d))
        return d.addTimeout(DEADLINE, reactor)


class Sender(protocol.Protocol):
    """The other end: its transport is what write_now is given; records what fell back to write()."""

    def connectionMade(self):
        self.fallbacks: list[bytes] = []
        write = self.transport.write

        def spy(data):
            self.fallbacks.append(bytes(data))
            write(data)

        self.transport.write = spy


@defer.inlineCallbacks
def _connect(server_sends: bool = False):
    accepted: defer.Deferred = defer.Deferred()

    class Factory(protocol.Factory):
        def buildProtocol(self, addr):
            proto = Sender() if server_sends else Receiver()
            reactor.callLater(0, accepted.callback, proto)
            return proto

    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    client = yield connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Receiver() if server_sends else Sender()
    )
    server = yield accepted.addTimeout(DEADLINE, reactor)
    yield port.stopListening()
    sender, receiver = (server, client) if server_sends else (client, server)
    return sender, receiver


@defer.inlineCallbacks
def _close(sender, receiver):
    lost = [defer.Deferred(), defer.Deferred()]
    for proto, d in zip((sender, receiver), lost):
        previous = proto.connectionLost

        def connectionLost(reason, previous=previous, d=d):
            previous(reason)
            d.callback(None)

        proto.connectionLost = connectionLost
    sender.transport.loseConnection()
    receiver.transport.loseConnection()
    yield defer.DeferredList([d.addTimeout(DEADLINE, reactor) for d in lost])


@pytest.mark.parametrize("server_sends", [False, True], ids=["client", "server"])
@pytest_twisted.inlineCallbacks
def test_nothing_queued_the_bytes_leave_before_the_reactor_turns(server_sends):
    sender, receiver = yield _connect(server_sends)
    try:
        write_now(sender.transport, b"hello, node")
        # Sent by the call itself: nothing went through write(), so nothing waits for a reactor turn.
        assert sender.fallbacks == []
        assert (yield receiver.until(11)) == b"hello, node"
    finally:
        yield _close(sender, receiver)


@pytest_twisted.inlineCallbacks
def test_with_data_queued_it_falls_back_to_write_and_keeps_the_order():
    sender, receiver = yield _connect()
    try:
        sender.transport.write(b"first ")  # queued until the reactor's next turn
        write_now(sender.transport, b"second ")
        write_now(sender.transport, b"third")
        assert sender.fallbacks == [b"first ", b"second ", b"third"]
        assert (yield receiver.until(18)) == b"first second third"
        # Once the queue has drained, write_now sends at once again.
        write_now(sender.transport, b"!")
        assert sender.fallbacks == [b"first ", b"second ", b"third"]
        assert (yield receiver.until(19)) == b"first second third!"
    finally:
        yield _close(sender, receiver)


@pytest_twisted.inlineCallbacks
def test_what_the_socket_does_not_take_is_queued_and_later_writes_follow_it():
    sender, receiver = yield _connect()
    try:
        # Far more than loopback's socket buffers hold: part is sent at once, the rest is queued.
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB, a pattern so a reordering would show
        write_now(sender.transport, big)
        assert len(sender.fallbacks) == 1 and 0 < len(sender.fallbacks[0]) < len(big)
        assert sender.fallbacks[0] == big[len(big) - len(sender.fallbacks[0]) :]
        write_now(sender.transport, b"tail")  # something is queued: this must wait its turn
        assert sender.fallbacks[-1] == b"tail"
        got = yield receiver.until(len(big) + 4)
        assert got == big + b"tail"
    finally:
        yield _close(sender, receiver)


@pytest_twisted.inlineCallbacks
def test_a_disconnecting_transport_gets_write_which_drops_the_bytes():
    sender, receiver = yield _connect()
    try:
        sender.transport.loseConnection()
        write_now(sender.transport, b"too late")
        assert sender.fallbacks == [b"too late"]
    finally:
        yield _close(sender, receiver)


def test_other_transports_always_take_write():
    """A transport that is not plain TCP (TLS, a test double) is never written behind its back."""
    transport = StringTransport()
    write_now(transport, b"abc")
    write_now(transport, b"def")
    assert transport.value() == b"abcdef"


# What sendnow and producers take a name missing from a transport's __dict__ to mean.
_CLASS_DEFAULTS = {"TLS": False, "connected": 0, "disconnecting": 0, "disconnected": 0, "offset": 0, "dataBuffer": b"", "producer": None}


@pytest.mark.parametrize("kind", ["ClientConnection", "Client", "Server"])
def test_the_attributes_read_from_the_instance_dictionary_are_plain_with_their_defaults(kind):
    """write_now and the producers read a transport's state from its __dict__, a missing name
    standing for the class default: that holds only while Twisted keeps them plain attributes
    (no property, no slot) with these defaults."""
    import inspect

    from twisted.internet import tcp

    from pgtwist.transport.accept import ClientConnection
    from pgtwist.transport.sendnow import _PLAIN

    cls = ClientConnection if kind == "ClientConnection" else getattr(tcp, kind)
    assert cls in _PLAIN
    for name, default in _CLASS_DEFAULTS.items():
        found = inspect.getattr_static(cls, name)
        assert not hasattr(type(found), "__get__"), f"{cls.__name__}.{name} is a descriptor"
        assert found == default and type(found) is type(default), (name, found)
    assert not hasattr(cls, "__slots__") or "__dict__" in dir(cls)


@pytest_twisted.inlineCallbacks
def test_a_write_after_the_state_moved_into_the_instance_still_keeps_the_order():
    """Once a write is queued, dataBuffer/offset/_tempDataBuffer live in the instance: read there."""
    sender, receiver = yield _connect()
    try:
        sender.transport.write(b"a")
        yield receiver.until(1)  # (the reactor sent it: the buffer fields are the instance's now)
        assert "offset" in sender.transport.__dict__ or "dataBuffer" in sender.transport.__dict__
        write_now(sender.transport, b"b")
        assert sender.fallbacks == [b"a"]  # sent at once: the queue was empty
        sender.transport.write(b"c")
        write_now(sender.transport, b"d")
        assert sender.fallbacks == [b"a", b"c", b"d"]
        assert (yield receiver.until(4)) == b"abcd"
    finally:
        yield _close(sender, receiver)
