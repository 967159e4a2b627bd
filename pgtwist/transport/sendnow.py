"""Writing to a plain TCP transport at once when nothing is queued, instead of a reactor turn later."""

from twisted.internet import tcp

from pgtwist.transport.accept import ClientConnection

# Twisted's transport.write() only queues: the bytes leave on the next reactor iteration,
# after an epoll registration for writability and before another to drop it. On the
# proxy's hot path that doubles the system calls per round trip. When the transport has
# nothing queued, sending right away keeps the order and skips all of that; whatever the
# socket does not take goes through write() as usual (buffering, producers, errors).
# This reads FileDescriptor's buffer attributes: it is checked against the Twisted
# versions setup.cfg admits by the unit tests, and TLS transports never take this path.
_PLAIN = (ClientConnection, tcp.Client, tcp.Server)  # (the commonest first)


def write_now(transport, data: bytes) -> None:
    if (
        type(transport) in _PLAIN
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # write() below meets the same error and reports it Twisted's way
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
