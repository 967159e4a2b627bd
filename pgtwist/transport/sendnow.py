"""Writing to a plain TCP transport at once when nothing is queued, instead of a reactor turn later."""

from typing import Any, Final

from twisted.internet import tcp

from pgtwist.transport.accept import ClientConnection

# Twisted's transport.write() only queues: the bytes leave on the next reactor iteration,
# after an epoll registration for writability and before another to drop it. On the
# proxy's hot path that doubles the system calls per round trip. When the transport has
# nothing queued, sending right away keeps the order and skips all of that; whatever the
# socket does not take goes through write() as usual (buffering, producers, errors).
# This reads FileDescriptor's buffer attributes: it is checked against the Twisted
# versions setup.cfg admits by the unit tests, and TLS transports never take this path.
_PLAIN: Final = frozenset((ClientConnection, tcp.Client, tcp.Server))

# The attributes are read from the transport's instance dictionary, one read of __dict__ and then
# dictionary lookups, each missing one standing for its class default (FileDescriptor's and
# tcp.Connection's: TLS False, connected/disconnecting/disconnected 0, offset 0, dataBuffer b"",
# producer None; the unit tests hold Twisted to them). Compiled, each attribute read of a Twisted
# object is a generic lookup (the class's MRO, then the instance dictionary: about 200
# instructions); the interpreter's inline caches are not there to make it cheap. With two writes
# per transaction and a producer swapped at each handoff, that was about 4 % of a transaction.


def write_now(transport, data: bytes) -> None:
    if type(transport) in _PLAIN:
        state: dict[str, Any] = transport.__dict__
        if (
            not state.get("TLS")
            and state.get("connected")
            and not state.get("disconnecting")
            and not state["_tempDataBuffer"]
            and state.get("offset", 0) == len(state.get("dataBuffer", b""))
        ):
            try:
                sent = state["socket"].send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # write() below meets the same error and reports it Twisted's way
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)
