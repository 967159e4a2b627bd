"""SignalHandlers: installs handlers, puts back the previous ones once, passes a Deferred's result on."""

from __future__ import annotations

import signal

import pytest

from pgtwist.service import sighandlers
from pgtwist.service.sighandlers import SignalHandlers


@pytest.fixture
def usr():
    # SIGUSR1/2, not SIGHUP/SIGTERM: a stray delivery while a test runs does no harm.
    sigs = (signal.SIGUSR1, signal.SIGUSR2)
    before = {sig: signal.getsignal(sig) for sig in sigs}
    yield sigs
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_installs_then_restores_the_previous_handlers(usr):
    def previous(signum, frame):
        pass

    def ours(signum, frame):
        pass

    signal.signal(usr[0], previous)
    signal.signal(usr[1], signal.SIG_IGN)
    handlers = SignalHandlers()
    handlers.install({usr[0]: ours, usr[1]: ours})
    assert signal.getsignal(usr[0]) is ours and signal.getsignal(usr[1]) is ours
    handlers.restore()
    assert signal.getsignal(usr[0]) is previous and signal.getsignal(usr[1]) == signal.SIG_IGN


def test_a_second_restore_changes_nothing(usr):
    handlers = SignalHandlers()
    handlers.install({usr[0]: lambda signum, frame: None})
    handlers.restore()

    def later(signum, frame):
        pass

    signal.signal(usr[0], later)
    handlers.restore()
    assert signal.getsignal(usr[0]) is later


def test_restore_passes_the_result_on_for_addBoth(usr):
    handlers = SignalHandlers()
    marker = object()
    assert handlers.restore(marker) is marker
    handlers.install({usr[0]: lambda signum, frame: None})
    assert handlers.restore(marker) is marker


def test_a_handler_not_set_from_python_comes_back_as_the_default(monkeypatch):
    # signal.signal returns None for a handler installed outside Python; SIG_DFL is what restore can offer.
    calls = []

    def fake_signal(sig, handler):
        calls.append((sig, handler))
        return None

    monkeypatch.setattr(sighandlers.signal, "signal", fake_signal)
    handlers = SignalHandlers()
    ours = lambda signum, frame: None  # noqa: E731
    handlers.install({signal.SIGUSR1: ours})
    handlers.restore()
    assert calls == [(signal.SIGUSR1, ours), (signal.SIGUSR1, signal.SIG_DFL)]


def test_nothing_installed_restores_nothing(monkeypatch):
    monkeypatch.setattr(sighandlers.signal, "signal", lambda *a: pytest.fail("signal.signal called"))
    SignalHandlers().restore()
