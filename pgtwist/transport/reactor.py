"""The reactor pgtwist runs on under twistd: Twisted's epoll reactor, minus a log context per event."""

from __future__ import annotations

import errno
import sys

from twisted.internet import tcp
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import Logger
from twisted.python import log as twisted_log
from twisted.python.failure import Failure

from pgtwist.transport.accept import ClientConnection, nothing_queued

try:
    from select import EPOLLIN

    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # not Linux: twistd's default reactor serves
    EPollReactor = None

# Exactly these transports read as tcp.Connection.doRead does (a Unix socket's, a subclass, goes
# through Twisted's dispatch). A TLS connection is one too: its protocol is then the TLS layer.
_TCP = (ClientConnection, tcp.Client, tcp.Server)  # (the commonest first: each event tests them in turn)

log = Logger()
# What a clean close tells the protocol, as _disconnectSelectable tells it (Failure(CONNECTION_DONE),
# the same words in a log line), made once: no protocol of pgtwist's keeps or changes it.
_CLOSED = Failure(CONNECTION_DONE)


if EPollReactor is not None:

    class ProxyReactor(EPollReactor):
        """EPollReactor whose poll loop dispatches each ready descriptor directly.

        Twisted's loop wraps every read or write event in log.callWithLogger(): it asks the
        descriptor for its logPrefix(), copies a context dictionary and pushes it so that
        legacy log.msg() calls are tagged with a "system". pgtwist logs through
        twisted.logger with its own namespaces and never reads that context, yet on the
        proxy's hot path (one client read and one server read per simple query) the wrapper
        cost about a quarter of the CPU spent per transaction (docs/BENCHMARKS.md). The
        dispatch itself (_doReadOrWrite: disconnect detection, doRead/doWrite, exceptions
        turned into a lost connection) is Twisted's own, unchanged, but for the commonest
        event, a TCP connection with bytes to read: that is read here, as tcp.Connection.doRead
        reads it, in one call of ours instead of Twisted's three (two reads per transaction).
        """

        _closing: list | None = None  # connections that close at the end of this turn (close_soon)

        def close_soon(self, connection) -> None:
            """Close *connection* (a ClientConnection, reading stopped, marked disconnecting) at
            the end of this turn, or before the next poll if this is not inside one."""
            if self._closing is None:
                self._closing = []
            self._closing.append(connection)

        def _close_pending(self) -> None:
            closing, self._closing = self._closing, None
            for connection in closing:
                if connection.disconnected or connection._aborting:
                    continue  # (gone already, or abortConnection() has its own close on the way)
                if not nothing_queued(connection):
                    # Bytes written, or a producer registered, since loseConnection(): the rest is
                    # Twisted's own close, after a flush (doWrite sees disconnecting set).
                    connection.startWriting()
                    continue
                try:
                    fd = connection.fileno()
                    if type(connection) is ClientConnection and fd not in self._reads and fd not in self._writes:
                        connection.close_now(_CLOSED)
                    else:
                        self._disconnectSelectable(connection, CONNECTION_DONE, False)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.failure("reactor: unhandled error closing {selectable!r}", selectable=connection)

        def doPoll(self, timeout):
            if self._closing is not None:  # (asked for outside a poll turn: a timer's callback)
                self._close_pending()
                timeout = 0  # (what those closes set off may have scheduled a call for now)
            if timeout is None:
                timeout = -1  # wait indefinitely
            try:
                events = self._poller.poll(timeout, len(self._selectables))
            except OSError as err:
                if err.errno == errno.EINTR:
                    return
                raise
            selectables = self._selectables
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue  # removed by an earlier event of this very batch
                if event == EPOLLIN and type(selectable) in _TCP:
                    # The commonest event by far: bytes to read on a TCP connection. What
                    # _doReadOrWrite -> doRead -> _dataReceived do, here (three calls fewer).
                    try:
                        data = selectable.socket.recv(selectable.bufferSize)
                    except BlockingIOError:
                        continue
                    except OSError:
                        why = CONNECTION_LOST
                    else:
                        if data:
                            try:
                                selectable.protocol.dataReceived(data)
                                continue
                            except KeyboardInterrupt:
                                raise
                            except BaseException:
                                why = sys.exc_info()[1]
                                twisted_log.err()  # (as _doReadOrWrite reports it)
                        else:
                            why = CONNECTION_DONE
                    dispatch = self._disconnectSelectable
                    args = (selectable, why, True)
                else:
                    dispatch = self._doReadOrWrite
                    args = (selectable, fd, event)
                try:
                    dispatch(*args)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    # Both turn a descriptor's exceptions into a lost connection; what escapes
                    # them is a bug to report, not to die of.
                    log.failure("reactor: unhandled error dispatching {selectable!r}", selectable=selectable)
            if self._closing is not None:
                self._close_pending()

        doIteration = doPoll

else:  # pragma: no cover - only off Linux
    ProxyReactor = None


def install_if_free() -> bool:
    """Install ProxyReactor unless a reactor is installed already (twistd --reactor, a test's).

    Returns whether it was installed. twistd imports no reactor before it calls makeService(),
    so `twistd pgbalance` runs on this one and `twistd --reactor=NAME pgbalance` on NAME.
    """
    if ProxyReactor is None or "twisted.internet.reactor" in sys.modules:
        return False
    from twisted.internet.main import installReactor

    installReactor(ProxyReactor())
    return True
