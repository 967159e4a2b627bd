"""The routing Service: owns the config, the listener and the proxy state; start, stop, reload."""

from __future__ import annotations

import gc
import os
import resource
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from pgtwist import compiled
from pgtwist.transport import connect
from pgtwist.transport.accept import set_client_keepalive
from pgtwist.service import drain, sdnotify
from pgtwist.service.sighandlers import SignalHandlers, hold_sighup
from pgtwist.service import reload as reloadmod
from pgtwist.frontend.protocol import FrontendFactory
from pgtwist.service.proxy import Proxy

log = Logger()

# How often the janitor runs (Proxy.maintain): query_timeout, client_login_timeout and
# client_idle_timeout are enforced at its ticks, so each may fire up to this late.
JANITOR_INTERVAL = 1.0


EX_CONFIG = 78  # sysexits.h; systemd units carry RestartPreventExitStatus=78


def settle_garbage_collector() -> None:
    """Once serving: keep the cyclic garbage collector off what lives as long as the process.

    Everything made before the reactor ran (modules, classes, functions, the config, the
    reactor) stays for good, yet every full collection walked it again; under load that was
    about a tenth of pgtwist's instructions per pooled transaction (callgrind, bench/
    instructions.sh). gc.freeze() moves it to a generation no collection visits. Young objects
    are then collected every 10,000 allocations rather than 700: a transaction allocates a few
    dozen short-lived objects and nearly none of them is in a reference cycle.
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


class ListenError(Exception):
    """A listener named in the config cannot be opened: one line naming its key."""


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

    def __init__(self, config, reactor=None, signals: bool = False, worker=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.proxy = Proxy(config, reactor)
        self.proxy.service = self
        self.worker = worker  # a workers.WorkerSpec when this is one of a supervisor's workers
        if worker is not None:
            from pgtwist.service import workers

            self.proxy.worker = workers.WorkerLink(worker, reactor)
            self.proxy.limits.part = (worker.index, worker.count)  # (max_db/user_connections: a share each)
            self.proxy.id_prefix = f"w{worker.index}."
        self.factory = FrontendFactory(self.proxy)
        self.port = None  # the first listening port, once started
        self.ports: list = []  # every listener: each TCP address, then the Unix socket
        self.signals = signals  # SIGHUP reloads, SIGTERM drains (twistd; not in tests)
        self._signal_handlers = SignalHandlers()
        self._graceful = False  # set by SIGTERM / SHUTDOWN; SIGINT and plain stops are fast
        self._stopping = False
        # Under a supervisor: SIGTERM / SIGHUP came from it (else an admin asked this worker alone).
        self._term_signalled = False
        self._reload_signalled = False
        # Optional listeners, started and stopped with the service (errors surface here, before twistd starts).
        if config.manhole is not None:
            from dataclasses import replace

            from pgtwist.admin import manhole

            mh = config.manhole if worker is None else replace(config.manhole, listen=worker.manhole_listen(config.manhole.listen))
            manhole.make_service(self, mh, reactor).setServiceParent(self)
        if worker is not None:  # (its metrics are served by the supervisor, which asks every worker)
            for child in workers.worker_services(self, worker, reactor):
                child.setServiceParent(self)
        elif config.metrics is not None:
            from pgtwist.admin import metrics

            metrics.make_service(self, config.metrics, reactor).setServiceParent(self)

    @property
    def address(self):
        """Where clients connect (useful with port 0)."""
        return self.port.getHost() if self.port is not None else None

    def privilegedStartService(self):
        # twistd calls this before dropping privileges (--uid): every listener binds here, the
        # children's (metrics, manhole) too, so a port below 1024 works and a taken port is
        # reported before anything else has started.
        try:
            self._listen()
            super().privilegedStartService()
        except CannotListenError as e:
            self._cannot_listen(e)

    def _listen(self) -> None:
        if self.port is not None:
            return
        config = self.config
        listen = config.listen
        if self.worker is not None:
            from pgtwist.service import workers

            family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
            self.port = workers.adopt_listener(self.worker, self.factory, self.reactor, family, config.tcp_defer_accept)
            self.ports = [self.port]
        else:
            self.ports = connect.listen(
                self.reactor, self.factory, config.listen_addresses, config.unix_socket_dir, config.unix_socket_mode,
                config.tcp_defer_accept,
            )
            self.port = self.ports[0]
        self._keep_clients_alive()

    def _keep_clients_alive(self) -> None:
        """tcp_keepalive and tcp_keep* on the listening sockets, for the clients accepted from now on."""
        config = self.config
        for port in self.ports:
            try:
                set_client_keepalive(port, config.tcp_keepalive, config.tcp_keepidle, config.tcp_keepintvl, config.tcp_keepcnt)
            except OSError as e:
                log.warn("cannot set TCP keepalive on the listening socket: {why}", why=e)

    def _cannot_listen(self, e: CannotListenError):
        keys = {(self.config.listen.host, self.config.listen.port): "listen"}
        for key in ("metrics", "manhole"):
            table = getattr(self.config, key, None)
            if table is not None:
                keys[(table.listen.host, table.listen.port)] = f"{key}.listen"
        key = keys.get((e.interface, e.port), "listen")
        why = getattr(e.socketError, "strerror", None) or str(e.socketError)
        where = f"[{e.interface}]:{e.port}" if ":" in (e.interface or "") else f"{e.interface}:{e.port}"
        message = f"{self.config.source}: {key}: cannot listen on {where}: {why}"
        if self.signals:  # under twistd: one line and EX_CONFIG rather than a traceback and a restart loop
            # The process's own stderr: twistd has pointed sys.stderr at its log by now, where a
            # line would get a timestamp prefix (and, with --logfile, miss the terminal or journal).
            err = sys.__stderr__ or sys.stderr
            err.write(message + "\n")
            err.flush()
            raise SystemExit(EX_CONFIG)
        raise ListenError(message) from None

    def startService(self):
        if self.signals:
            hold_sighup()  # (taken once the handler is in: _install_signal_handlers)
        try:
            self._listen()
        except CannotListenError as e:
            self._cannot_listen(e)
        limit = raise_nofile_limit()
        where = [str(a) for a in self.config.listen_addresses]
        if self.config.unix_socket_dir:
            where.append(connect.socket_path(self.config.unix_socket_dir, self.config.listen.port))
        log.info(
            "pgtwist {who}listening on {listen} ({mode} pooling, {n} database(s), file limit {limit}, {core} core)",
            who=f"worker {self.worker.index} of {self.worker.count} " if self.worker is not None else "",
            listen=", ".join(where),
            mode=self.config.pool_mode,
            n=len(self.config.databases),
            limit=limit,
            core=compiled.FORM,  # compiled, pure or stale (pgtwist/compiled.py): what an operator asks first about CPU
        )
        for warning in self.config.warnings if self.worker is None or self.worker.index == 0 else ():  # (once, not per worker)
            log.warn("{source}: {warning}", source=self.config.source, warning=warning)
        self.proxy.start()
        if self.signals:
            self.reactor.callWhenRunning(self._running)  # after the reactor's own signal handlers
        self._janitor = task.LoopingCall(self.proxy.maintain)
        self._janitor.clock = self.reactor
        self._janitor.start(JANITOR_INTERVAL, now=False)
        self.proxy.dialer.start()
        try:
            super().startService()
        except CannotListenError as e:
            self._cannot_listen(e)
        if self.worker is not None and self.worker.restarted:
            # Before it serves (the reactor runs after this; every socket of its own is bound): a
            # worker restarted after a death is paused, disabled and SET as the live ones are.
            from pgtwist.service import workers

            workers.take_console_state(self)

    def stopService(self):
        # Stop accepting first; let open transactions finish (graceful) and close the clients; then the rest.
        self._stopping = True
        timeout = self.config.shutdown_timeout if self._graceful else 0.0
        ports, self.ports, self.port = self.ports, [], None
        d = defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])
        d.addCallback(lambda _: drain.drain(self.proxy, self.reactor, timeout))
        d.addCallback(lambda _: super(PgBalanceService, self).stopService())
        d.addCallback(lambda _: self.proxy.close())
        if self._janitor.running:
            self._janitor.stop()
        # Restored once stopped (not before: a SIGHUP or SIGTERM during the drain must not kill the process).
        d.addBoth(self._signal_handlers.restore)
        return d

    # -- operations ------------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """The client listener is open and the proxy is not shutting down (for /readyz)."""
        return self.port is not None and not self.proxy.draining and not self._stopping

    def reload(self) -> reloadmod.ReloadOutcome:
        """SIGHUP, RELOAD, reload(): read, validate, diff and apply the config file; a broken one changes nothing."""
        outcome = reloadmod.reload_file(self.proxy)
        self.config = self.proxy.config
        self._keep_clients_alive()
        if self.worker is not None and not self._reload_signalled:
            # RELOAD on one worker's console (or reload() in its manhole): the supervisor has
            # every worker reload (this one again, harmlessly), as a SIGHUP to it would.
            os.kill(os.getppid(), signal.SIGHUP)
        return outcome

    def shutdown(self, graceful: bool = True) -> None:
        """SIGTERM, SHUTDOWN: stop the reactor; stopService drains first (up to shutdown_timeout) when graceful."""
        if self._stopping:
            log.info("shutdown already under way")
            return
        self._graceful = graceful
        if self.worker is not None and not self._term_signalled:
            # SHUTDOWN on one worker's console stops the whole tree: the supervisor drains every worker.
            os.kill(os.getppid(), signal.SIGTERM if graceful else signal.SIGINT)
            return
        if self.signals:
            sdnotify.notify("STOPPING=1\nSTATUS=draining" if graceful else "STOPPING=1")
        log.info(
            "shutting down: {how}",
            how=f"new clients refused, open transactions get up to {self.config.shutdown_timeout:g} s" if graceful else "fast",
        )
        self.reactor.stop()

    def _running(self) -> None:
        self._install_signal_handlers()
        settle_garbage_collector()
        # Type=notify: systemd counts the unit as started from here: the listener is open (since
        # startService) and a SIGTERM from now on drains rather than stops at once.
        sdnotify.notify(f"READY=1\nSTATUS=accepting clients on {self.config.listen}\nMAINPID={os.getpid()}")

    def _install_signal_handlers(self) -> None:
        def on_hup(signum, frame):
            self.reactor.callFromThread(self._signalled_reload)

        def on_term(signum, frame):
            self._term_signalled = True
            self.reactor.callFromThread(self.shutdown, True)

        self._signal_handlers.install({signal.SIGHUP: on_hup, signal.SIGTERM: on_term})  # (and takes a held SIGHUP)

    def _signalled_reload(self) -> None:
        log.info("SIGHUP: reloading {source}", source=self.config.source)
        self._reload_signalled = True
        try:
            self.reload()
        except Exception:
            log.failure("reload failed")
        finally:
            self._reload_signalled = False
