"""attach_producer/detach_producer on real TCP transports: the same state as Twisted's registerProducer.

They set FileDescriptor's producer fields themselves on a plain tcp.Server/tcp.Client, so only
real transports show them right: after each, the transport is in the very state Twisted's own
call leaves it in, a full buffer pauses the attached producer, and a loseConnection() that
waited for the producer goes through once it is detached. No PostgreSQL here.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from pgtwist.transport.producers import attach_producer, detach_producer

from tests.unit.transport.test_sendnow import DEADLINE, _connect


@implementer(IPushProducer)
class Recorder:
    def __init__(self):
        self.calls: list[str] = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


def _state(transport) -> tuple:
    return (transport.producer, transport.streamingProducer, transport.disconnecting)


@pytest_twisted.inlineCallbacks
def test_attach_and_detach_leave_what_twisted_leaves():
    sender, receiver = yield _connect()
    try:
        transport = sender.transport
        producer = Recorder()
        attach_producer(transport, producer)
        ours = _state(transport)
        detach_producer(transport)
        ours_after = _state(transport)
        transport.registerProducer(producer, True)
        theirs = _state(transport)
        transport.unregisterProducer()
        assert ours == theirs == (producer, True, False)
        assert ours_after == _state(transport)
        assert producer.calls == []
    finally:
        sender.transport.loseConnection()
        receiver.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_a_second_producer_is_refused_as_twisted_refuses_it():
    sender, receiver = yield _connect()
    try:
        attach_producer(sender.transport, Recorder())
        with pytest.raises(RuntimeError):
            attach_producer(sender.transport, Recorder())
        detach_producer(sender.transport)
    finally:
        sender.transport.loseConnection()
        receiver.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_a_full_buffer_pauses_the_attached_producer():
    sender, receiver = yield _connect()
    try:
        producer = Recorder()
        attach_producer(sender.transport, producer)
        receiver.transport.pauseProducing()  # nobody reads: the sender's buffer fills
        sender.transport.write(b"x" * (sender.transport.bufferSize * 64))
        assert producer.calls == ["pause"]
        detach_producer(sender.transport)
        receiver.transport.resumeProducing()
    finally:
        sender.transport.loseConnection()
        receiver.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_a_close_waiting_for_the_producer_goes_through_once_detached():
    sender, receiver = yield _connect()
    lost = defer.Deferred()
    sender.connectionLost = lambda reason: lost.callback(None)
    producer = Recorder()
    attach_producer(sender.transport, producer)
    sender.transport.write(b"bye")
    sender.transport.loseConnection()
    detach_producer(sender.transport)
    yield lost.addTimeout(DEADLINE, reactor)
    got = yield receiver.until(3)
    assert got == b"bye"
    receiver.transport.loseConnection()


def test_other_transports_go_through_twisted():
    transport = StringTransport()
    producer = Recorder()
    attach_producer(transport, producer)
    assert transport.producer is producer and transport.streaming
    detach_producer(transport)
    assert transport.producer is None
