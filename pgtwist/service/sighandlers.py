"""The twistd process's own signal handlers (SIGHUP reloads, SIGTERM drains): installed, then the previous ones put back."""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping


def hold_sighup() -> None:
    """Hold SIGHUP until the handler is in (SignalHandlers.install, then SIG_UNBLOCK).

    A twistd process listens from startService, but its handlers go in once the reactor runs:
    a reload asked in between (`systemctl reload` just after a start, a client that saw the port
    open) found SIGHUP's default action, which ends the process. Held (blocked), it waits instead."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


class SignalHandlers:
    """Handlers that replace the previous ones until restore(); PgBalanceService and the Supervisor each hold one."""

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}

    def install(self, handlers: Mapping[int, Callable]) -> None:
        """Call from reactor.callWhenRunning: after the reactor's own handlers, which would replace ours.

        Each signal handled is unblocked once its handler is in: one held since startService
        (hold_sighup; a worker's since its spawn, workers.spawn_twistd) has waited for it, and is
        taken now."""
        for sig, handler in handlers.items():
            self._previous[sig] = signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(handlers))

    def restore(self, result=None):
        """Put the previous handlers back (once; later calls do nothing); passes *result* on, for Deferred.addBoth."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            # None: the previous handler was not installed from Python; the default is the closest we can restore.
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        return result
