"""ProxyReactor's poll loop: dispatches as Twisted's does, minus the per-event log context."""

import errno
import sys

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from pgtwist.transport import reactor as reactormod

pytestmark = pytest.mark.skipif(reactormod.ProxyReactor is None, reason="epoll is Linux-only")


class FakePoller:
    def __init__(self, events=(), error=None):
        self.events = list(events)
        self.error = error
        self.asked = []

    def poll(self, timeout, maxevents):
        self.asked.append((timeout, maxevents))
        if self.error is not None:
            raise self.error
        return self.events


def close(r):
    """Release what a never-run reactor opened: its epoll descriptor and its waker's pipe."""
    r.waker.connectionLost(None)
    r._poller.close()


@pytest.fixture
def proxy_reactor():
    r = reactormod.ProxyReactor()
    poller = r._poller
    yield r
    r._poller = poller
    close(r)


def test_each_ready_descriptor_is_dispatched_in_order(proxy_reactor):
    seen = []
    proxy_reactor._selectables = {5: "a", 7: "b"}
    proxy_reactor._poller = FakePoller([(5, 1), (7, 4)])
    proxy_reactor._doReadOrWrite = lambda sel, fd, ev: seen.append((sel, fd, ev))
    proxy_reactor.doIteration(0.5)
    assert seen == [("a", 5, 1), ("b", 7, 4)]
    assert proxy_reactor._poller.asked == [(0.5, 2)]


def test_no_timeout_waits_indefinitely(proxy_reactor):
    proxy_reactor._poller = FakePoller()
    proxy_reactor.doPoll(None)
    assert proxy_reactor._poller.asked[0][0] == -1


def test_a_descriptor_removed_by_an_earlier_event_is_skipped(proxy_reactor):
    seen = []
    proxy_reactor._selectables = {5: "a", 7: "b"}

    def dispatch(sel, fd, ev):
        seen.append(fd)
        proxy_reactor._selectables.pop(7)  # the first event closed the second descriptor

    proxy_reactor._poller = FakePoller([(5, 1), (7, 1)])
    proxy_reactor._doReadOrWrite = dispatch
    proxy_reactor.doPoll(0)
    assert seen == [5]


def test_an_interrupted_poll_is_no_error(proxy_reactor):
    proxy_reactor._poller = FakePoller(error=OSError(errno.EINTR, "interrupted"))
    proxy_reactor.doPoll(0)  # returns quietly; the main loop polls again


def test_other_poll_errors_are_raised(proxy_reactor):
    proxy_reactor._poller = FakePoller(error=OSError(errno.EBADF, "bad fd"))
    with pytest.raises(OSError):
        proxy_reactor.doPoll(0)


def test_an_escaping_error_is_logged_and_the_loop_goes_on(proxy_reactor):
    seen, events = [], []
    proxy_reactor._selectables = {5: "a", 7: "b"}

    def dispatch(sel, fd, ev):
        if fd == 5:
            raise RuntimeError("boom")
        seen.append(fd)

    proxy_reactor._poller = FakePoller([(5, 1), (7, 1)])
    proxy_reactor._doReadOrWrite = dispatch
    globalLogPublisher.addObserver(events.append)
    try:
        proxy_reactor.doPoll(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert seen == [7]
    (failure,) = [e for e in events if e.get("log_level") is LogLevel.critical]
    assert failure["log_failure"].check(RuntimeError)


def test_keyboard_interrupt_is_not_swallowed(proxy_reactor):
    proxy_reactor._selectables = {5: "a"}
    proxy_reactor._poller = FakePoller([(5, 1)])

    def dispatch(sel, fd, ev):
        raise KeyboardInterrupt

    proxy_reactor._doReadOrWrite = dispatch
    with pytest.raises(KeyboardInterrupt):
        proxy_reactor.doPoll(0)


def test_install_only_when_no_reactor_is_installed(monkeypatch):
    installed = []
    monkeypatch.setattr("twisted.internet.main.installReactor", installed.append)
    monkeypatch.setitem(sys.modules, "twisted.internet.reactor", object())
    assert reactormod.install_if_free() is False and installed == []
    monkeypatch.delitem(sys.modules, "twisted.internet.reactor")
    assert reactormod.install_if_free() is True
    (r,) = installed
    assert isinstance(r, reactormod.ProxyReactor)
    close(r)


# -- the fast read of a TCP connection (what _doReadOrWrite -> doRead -> _dataReceived do) --


class Recording:
    def __init__(self, fail=False):
        self.got = []
        self.fail = fail

    def dataReceived(self, data):
        if self.fail:
            raise ValueError("bad bytes")
        self.got.append(data)


@pytest.fixture
def tcp_pair(proxy_reactor):
    """A tcp.Server over one end of a socket pair, as the reactor would hold it; the other end to write."""
    import socket

    from twisted.internet import tcp

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    selectable = tcp.Server.__new__(tcp.Server)  # (no port or reactor wiring: only what doRead uses)
    selectable.socket = ours
    selectable.bufferSize = 65536
    selectable.protocol = Recording()
    lost = []
    proxy_reactor._disconnectSelectable = lambda sel, why, in_read: lost.append((sel, why, in_read))
    proxy_reactor._doReadOrWrite = lambda sel, fd, ev: lost.append(("dispatched", fd, ev))
    proxy_reactor._selectables = {ours.fileno(): selectable}
    yield selectable, theirs, lost
    ours.close()
    theirs.close()


def _poll_in(r, selectable, event=None):
    import select

    r._poller = FakePoller([(selectable.socket.fileno(), select.EPOLLIN if event is None else event)])
    r.doPoll(0)


def test_bytes_to_read_go_straight_to_the_protocol(proxy_reactor, tcp_pair):
    selectable, theirs, lost = tcp_pair
    theirs.sendall(b"Q\x00\x00\x00\x05")
    _poll_in(proxy_reactor, selectable)
    assert selectable.protocol.got == [b"Q\x00\x00\x00\x05"] and lost == []


def test_nothing_to_read_is_no_event(proxy_reactor, tcp_pair):
    selectable, theirs, lost = tcp_pair
    _poll_in(proxy_reactor, selectable)
    assert selectable.protocol.got == [] and lost == []


def test_end_of_stream_is_a_clean_close(proxy_reactor, tcp_pair):
    from twisted.internet.main import CONNECTION_DONE

    selectable, theirs, lost = tcp_pair
    theirs.shutdown(2)
    _poll_in(proxy_reactor, selectable)
    assert lost == [(selectable, CONNECTION_DONE, True)]


def test_a_failed_recv_is_a_lost_connection(proxy_reactor, tcp_pair):
    from twisted.internet.main import CONNECTION_LOST

    selectable, theirs, lost = tcp_pair
    broken = selectable.socket
    selectable.socket = type("Broken", (), {"recv": lambda self, n: (_ for _ in ()).throw(ConnectionResetError()), "fileno": broken.fileno})()
    _poll_in(proxy_reactor, selectable)
    assert lost == [(selectable, CONNECTION_LOST, True)]
    selectable.socket = broken


def test_a_protocol_error_loses_that_connection_and_is_logged(proxy_reactor, tcp_pair):
    selectable, theirs, lost = tcp_pair
    selectable.protocol = Recording(fail=True)
    theirs.sendall(b"x")
    from twisted.python import log as legacy

    events = []
    legacy.addObserver(events.append)  # (reported with Twisted's log.err(), as _doReadOrWrite does)
    try:
        _poll_in(proxy_reactor, selectable)
    finally:
        legacy.removeObserver(events.append)
    ((sel, why, in_read),) = lost
    assert sel is selectable and isinstance(why, ValueError) and in_read
    assert any(e.get("isError") and e["failure"].check(ValueError) for e in events)


def test_other_events_of_a_tcp_connection_take_twisteds_dispatch(proxy_reactor, tcp_pair):
    import select

    selectable, theirs, lost = tcp_pair
    _poll_in(proxy_reactor, selectable, select.EPOLLIN | select.EPOLLHUP)
    _poll_in(proxy_reactor, selectable, select.EPOLLOUT)
    fd = selectable.socket.fileno()
    assert lost == [("dispatched", fd, select.EPOLLIN | select.EPOLLHUP), ("dispatched", fd, select.EPOLLOUT)]
