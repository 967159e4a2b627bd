"""The running proxy's shared state: clients, pools, cancel keys; what sessions ask of the service."""

from __future__ import annotations

import hmac
import itertools
import secrets

from twisted.internet import defer
from twisted.logger import Logger

from pgtwist import reload as reloadmod
from pgtwist import tls
from pgtwist.admin.counters import Counters
from pgtwist.backend import BackendFactory, CancelFactory
from pgtwist.cluster.health import ClusterMonitor
from pgtwist.pool import Pool
from pgtwist.router import DatabaseRouter, load_hook
from pgtwist.server import ServerConnection
from pgtwist.server_login import ServerLogin
from pgtwist.session import ClientSession

log = Logger()


class Proxy:
    """Owned by the service; one per running pgtwist. *reactor* provides time and connections."""

    def __init__(self, config, reactor):
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        # Makes mock SCRAM salts for unknown users stable within a run but unguessable.
        self.mock_secret = secrets.token_bytes(32)
        self.clients: dict[str, ClientSession] = {}
        self.admitted = 0  # clients past their startup packet, but the admin console's (max_client_conn)
        self.pools: dict[tuple, Pool] = {}
        self.cancel_keys: dict[int, ClientSession] = {}
        self.client_keys: dict[str, bytes] = {}
        self.pinned_sessions = 0
        self.counters = Counters(reactor)  # totals for SHOW STATS and /metrics
        self.service = None  # the PgBalanceService, for admin actions (reload, shutdown)
        self.draining = False  # shutting down: clients leave as soon as they are between transactions
        self.paused: set[str] = set()  # databases PAUSEd ("*": all)
        self.retired_pools: set[Pool] = set()  # removed by a reload, closing as their clients finish
        self.routers: dict[str, DatabaseRouter] = {}
        self._failover_timers: dict = {}
        self.started = False
        self._client_ids = itertools.count(1)
        self._server_ids = itertools.count(1)
        self.client_tls: tls.ClientTls | None = None  # [tls]: what clients' connections upgrade with
        self.node_tls: tls.NodeTls | None = None  # [server_tls]: what connections to nodes upgrade with
        self.reload_tls()

    # -- clients ---------------------------------------------------------------------------

    def new_client(self, transport) -> ClientSession:
        session = ClientSession(self, transport, f"c{next(self._client_ids)}")
        self.clients[session.id] = session
        self.counters.client_connected()
        peer = transport.getPeer()
        log.info("client {client} connected from {addr}", client=session.id, addr=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}")
        return session

    def admit(self, session: ClientSession) -> bool:
        """Room for one more client under max_client_conn? Asked once its startup packet is read.

        Connections that have not sent one yet do not count: a flood of silent connections
        cannot lock real clients out, and each is dropped at client_login_timeout.
        """
        if self.admitted >= self.config.max_client_conn:
            return False
        self.admitted += 1
        session.admitted = True
        return True

    def client_closed(self, session: ClientSession, reason=None) -> None:
        self.clients.pop(session.id, None)
        if session.admitted:
            session.admitted = False
            self.admitted -= 1
        self.counters.client_closed(session.id)
        log.info(
            "client {client} disconnected: {user}@{database}, {state}, after {seconds:.1f} s ({why})",
            client=session.id,
            user=session.user,
            database=session.database.name if session.database is not None else None,
            state=session.state,
            seconds=self.clock.seconds() - session.connected_at,
            why=reason.getErrorMessage() if reason is not None else "closed",
        )
        if self.cancel_keys.get(session.process_id) is session:
            del self.cancel_keys[session.process_id]

    def note_pinned(self, session: ClientSession, reason: str) -> None:
        """Transaction pooling gave up sharing a client's server connection: say so once, count it."""
        self.pinned_sessions += 1
        log.info("client {client} pinned to its server connection: {reason}", client=session.id, reason=reason)

    def maintain(self) -> None:
        """Janitor tick: pools close stale connections and keep warm ones."""
        for pool in self.pools.values():
            pool.maintain()
        if self.retired_pools:
            reloadmod.sweep(self)

    def reload_tls(self) -> None:
        """(Re)read the certificates and keys of [tls] and [server_tls] from self.config's paths.

        New connections use the new ones; open connections keep theirs. Raises tls.TlsSetupError
        and keeps the current ones when a file does not load.
        """
        self.use_tls(*tls.from_config(self.config))

    def use_tls(self, client_tls, node_tls) -> None:
        """New connections, health probes included, use these TLS contexts from now on."""
        self.client_tls, self.node_tls = client_tls, node_tls
        for router in getattr(self, "routers", {}).values():
            if router.monitor is not None:
                router.monitor.node_tls = node_tls

    def lookup_user(self, name: str):
        user = self.config.users.get(name)
        return user.credential if user is not None else None

    def remember_client_key(self, user: str, client_key: bytes) -> None:
        self.client_keys[user] = client_key

    # -- cancel keys -------------------------------------------------------------------------

    def register_cancel_key(self, session: ClientSession) -> tuple[int, bytes]:
        """Issue the BackendKeyData a client sees: ours, never a node's."""
        while True:
            pid = secrets.randbelow(0x7FFFFFFF) + 1
            if pid not in self.cancel_keys:
                break
        self.cancel_keys[pid] = session
        return pid, secrets.token_bytes(4)

    def cancel(self, process_id: int, secret_key: bytes) -> None:
        """A CancelRequest from a client: forward it to the server serving that client now, if any."""
        session = self.cancel_keys.get(process_id)
        if session is None or not hmac.compare_digest(session.secret_key, secret_key):
            return  # PostgreSQL ignores unknown keys silently, and so do we
        if session.server is not None:
            self.cancel_server(session.server)

    def cancel_server(self, server: ServerConnection) -> None:
        if server.backend_key is None:
            return
        pid, key = server.backend_key
        node = server.node
        factory = CancelFactory(pid, key, self.node_tls, node)
        self.reactor.connectTCP(node.host, node.port, factory, timeout=self.config.server_connect_timeout)

    # -- pools and server connections ----------------------------------------------------------

    # -- routing ----------------------------------------------------------------------------

    def router_for(self, database) -> DatabaseRouter:
        router = self.routers.get(database.name)
        if router is None:
            monitor = None
            if len(database.nodes) > 1:
                monitor = ClusterMonitor(
                    self.reactor,
                    list(database.nodes),
                    lambda node, db=database: self._health_login(db, node),
                    node_tls=self.node_tls,
                    interval=self.config.health_check_interval,
                    timeout=self.config.health_check_timeout,
                    on_change=lambda state, what, db=database: self._node_changed(db, state, what),
                )
                if self.started:
                    monitor.start()
            hook = None
            if self.config.routing_hook:
                try:
                    hook = load_hook(self.config.routing_hook)
                except Exception:
                    log.failure("cannot load routing_hook {hook}; using the built-in policy", hook=self.config.routing_hook)
            router = self.routers[database.name] = DatabaseRouter(database, self.config, monitor, hook)
        return router

    def _health_login(self, database, node) -> ServerLogin:
        name = self.config.health_user or next(iter(self.config.users), "")
        user = self.config.users.get(name)
        return ServerLogin(name, database.dbname, user.credential if user else None, node_name=str(node))

    def _node_changed(self, database, state, what: str) -> None:
        log.info("database {db}: node {node} {what}", db=database.name, node=state.name, what=what)
        if what == "promoted":
            self.counters.failover()
        if not state.up:
            # Idle server connections to a dead node are useless; busy ones fail on their own.
            for pool in self.pools.values():
                if str(pool.node) == state.name:
                    for conn in list(pool.idle):
                        conn.close()
        if what in ("down", "demoted", "fenced") and self.config.auto_promote:
            router = self.routers.get(database.name)
            if router is not None and router.primary() is None and database.name not in self._failover_timers:
                self._failover_timers[database.name] = self.clock.callLater(
                    self.config.failover_timeout, self._auto_promote, database
                )

    def _auto_promote(self, database) -> None:
        """auto_promote: the primary stayed away for failover_timeout; promote the most caught-up replica."""
        self._failover_timers.pop(database.name, None)
        router = self.routers.get(database.name)
        if router is None or router.monitor is None or router.primary() is not None:
            return  # an operator or an HA manager got there first
        candidate = router.monitor.most_caught_up_replica()
        if candidate is None:
            log.warn("database {db}: no primary and no replica to promote", db=database.name)
            return
        log.warn("database {db}: no primary for {t:g} s; promoting {node}", db=database.name, t=self.config.failover_timeout, node=candidate.name)
        router.monitor.promote(candidate.name).addErrback(
            lambda f: log.failure("database {db}: promoting {node} failed", f, db=database.name, node=candidate.name)
        )

    def start(self) -> None:
        """Start health monitoring of every clustered database (the service calls this)."""
        self.started = True
        for database in self.config.databases.values():
            self.router_for(database)
        for router in self.routers.values():
            if router.monitor is not None and not router.monitor.running:
                router.monitor.start()

    def pool_for(self, database, user: str, node=None) -> Pool:
        if node is None:
            node = self.router_for(database).primary() or database.nodes[0]
        key = (database.name, user, str(node))
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(
                key,
                node,
                database,
                user,
                database.pool_size,
                connect=self.connect_server,
                clock=self.clock,
                reset_query=self.config.server_reset_query,
                wait_timeout=self.config.query_wait_timeout,
                max_prepared_statements=self.config.max_prepared_statements,
                min_size=self.config.min_pool_size,
                idle_timeout=self.config.server_idle_timeout,
                lifetime=self.config.server_lifetime,
            )
            if self.paused and ("*" in self.paused or database.name in self.paused):
                pool.paused = True
        return pool

    def apply_config(self, config, changes) -> None:
        """Reload: run with *config* from now on (pools resized, removed databases retired; see pgtwist.reload)."""
        reloadmod.apply(self, config, changes)

    def connect_server(self, pool: Pool):
        """Open and log in one server connection for *pool*; a Deferred firing with it."""
        user = self.config.users.get(pool.user)
        login = ServerLogin(
            pool.user,
            pool.database.dbname,
            user.credential if user is not None else None,
            client_key=self.client_keys.get(pool.user),
            node_name=str(pool.node),
        )
        conn = ServerConnection(f"s{next(self._server_ids)}", pool, login)
        conn.tls = self.node_tls
        ready = conn.ready
        timeout = self.config.server_connect_timeout
        connector = self.reactor.connectTCP(pool.node.host, pool.node.port, BackendFactory(conn), timeout=timeout or 30)
        if timeout:
            timer = self.clock.callLater(timeout, self._login_timed_out, conn, connector)

            def stop_timer(result):
                if timer.active():
                    timer.cancel()
                return result

            ready.addBoth(stop_timer)
        return ready

    def _login_timed_out(self, conn: ServerConnection, connector) -> None:
        conn.login_timed_out()
        connector.disconnect()

    def close(self):
        for pool in self.pools.values():
            pool.close_all()
        stops = [r.monitor.stop() for r in self.routers.values() if r.monitor is not None and r.monitor.running]
        return defer.gatherResults(stops) if stops else None
