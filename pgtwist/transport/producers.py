"""Attaching and detaching a producer on a transport at each link, without Twisted's layers of calls."""

from typing import Any

from pgtwist.transport.sendnow import _PLAIN

# A server connection handed from client to client registers a producer on both transports
# at every link and unregisters both at every unlink: with clients waiting, that is once per
# transaction. On a plain TCP transport Twisted's registerProducer goes through its TLS mixin
# into FileDescriptor's, which only sets two attributes; these do the same in one call. TLS
# transports (and any other kind) go through Twisted as usual. Like sendnow (and for the same
# reason, through the instance dictionary), this reads FileDescriptor's attributes, and the unit
# tests hold it to the Twisted versions setup.cfg admits.


def attach_producer(transport, producer) -> None:
    """transport.registerProducer(producer, streaming=True)."""
    if type(transport) in _PLAIN:
        state: dict[str, Any] = transport.__dict__
        if not state.get("TLS"):
            registered = state.get("producer")
            if registered is not None:
                raise RuntimeError(f"Cannot register producer {producer}, because producer {registered} was never unregistered.")
            if state.get("disconnected"):
                producer.stopProducing()
            else:
                state["producer"] = producer
                state["streamingProducer"] = True
            return
    transport.registerProducer(producer, True)


def detach_producer(transport) -> None:
    """transport.unregisterProducer()."""
    if type(transport) in _PLAIN:
        state: dict[str, Any] = transport.__dict__
        if not state.get("TLS"):
            state["producer"] = None
            if state.get("connected") and state.get("disconnecting"):
                transport.startWriting()  # (a loseConnection() waited for the producer to go)
            return
    transport.unregisterProducer()
