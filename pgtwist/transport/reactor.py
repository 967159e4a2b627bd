"""The reactor pgtwist runs on under twistd: Twisted's epoll reactor, minus a log context per event."""

from __future__ import annotations

import errno
import sys

from twisted.logger import Logger

log = Logger()

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # not Linux: twistd's default reactor serves
    EPollReactor = None


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
        turned into a lost connection) is Twisted's own, unchanged.
        """

        def doPoll(self, timeout):
            if timeout is None:
                timeout = -1  # wait indefinitely
            try:
                events = self._poller.poll(timeout, len(self._selectables))
            except OSError as err:
                if err.errno == errno.EINTR:
                    return
                raise
            selectables = self._selectables
            dispatch = self._doReadOrWrite
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue  # removed by an earlier event of this very batch
                try:
                    dispatch(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    # _doReadOrWrite already turns a descriptor's exceptions into a lost
                    # connection; what escapes it is a bug to report, not to die of.
                    log.failure("reactor: unhandled error dispatching {selectable!r}", selectable=selectable)

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
