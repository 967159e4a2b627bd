"""CancelProtocol: a cancel is done when the node hangs up, or when pgtwist gives up waiting."""

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pgtwist.backend.protocol import CancelFactory
from pgtwist.config import Address
from pgtwist.wire import messages as m


class AbortableTransport(StringTransport):
    """A transport whose abort, like a real one, reports connectionLost afterwards."""

    def __init__(self):
        super().__init__()
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


def cancel(clock, done):
    protocol = CancelFactory(777, b"KEY!", None, Address("localhost", 5432), clock, 5.0, done).buildProtocol(None)
    transport = AbortableTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_the_cancel_is_done_when_the_node_hangs_up():
    clock, calls = Clock(), []
    protocol, transport = cancel(clock, lambda: calls.append("done"))
    assert transport.value() == m.cancel_request(777, b"KEY!") and not transport.disconnecting
    assert calls == []
    protocol.connectionLost(Failure(ConnectionDone()))
    assert calls == ["done"] and clock.getDelayedCalls() == []


def test_a_node_that_keeps_the_cancel_connection_open_is_left_after_the_timeout():
    # The timer fires and aborts; the transport then reports connectionLost, which must not try
    # to cancel the timer that already ran (that was an Unhandled Error in the hung-primary drill).
    clock, calls = Clock(), []
    protocol, transport = cancel(clock, lambda: calls.append("done"))
    clock.advance(5.0)
    assert transport.aborted and calls == []
    protocol.connectionLost(Failure(ConnectionLost()))
    assert calls == ["done"] and clock.getDelayedCalls() == []
    protocol.connectionLost(Failure(ConnectionLost()))  # a second report changes nothing
    assert calls == ["done"]
