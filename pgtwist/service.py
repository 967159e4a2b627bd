"""The routing Service: owns the config, the listener and the proxy state; start, stop, reload."""

from __future__ import annotations

import resource

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from pgtwist.frontend import FrontendFactory
from pgtwist.proxy import Proxy

log = Logger()


def raise_nofile_limit() -> int:
    """Lift RLIMIT_NOFILE to its hard limit so that thousands of clients fit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


class PgBalanceService(service.MultiService):
    """Children start in order and stop in reverse; the listener stops first, so no client arrives late."""

    name = "pgbalance"

    def __init__(self, config, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.proxy = Proxy(config, reactor)
        self.factory = FrontendFactory(self.proxy)
        self.port = None  # the listening port, once started

    @property
    def address(self):
        """Where clients connect (useful with port 0)."""
        return self.port.getHost() if self.port is not None else None

    def startService(self):
        limit = raise_nofile_limit()
        log.info(
            "pgtwist listening on {listen} ({mode} pooling, {n} database(s), file limit {limit})",
            listen=str(self.config.listen),
            mode=self.config.pool_mode,
            n=len(self.config.databases),
            limit=limit,
        )
        self._janitor = task.LoopingCall(self.proxy.maintain)
        self._janitor.clock = self.reactor
        self._janitor.start(1.0, now=False)
        listen = self.config.listen
        self.port = self.reactor.listenTCP(listen.port, self.factory, backlog=4096, interface=listen.host)
        super().startService()

    def stopService(self):
        # Stop accepting first; then close what is open.
        d = defer.maybeDeferred(self.port.stopListening) if self.port is not None else defer.succeed(None)
        d.addCallback(lambda _: super(PgBalanceService, self).stopService())
        d.addCallback(lambda _: self.proxy.close())
        if self._janitor.running:
            self._janitor.stop()
        return d
