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
