"""The running proxy's shared state: clients, pools, cancel keys; what sessions ask of the service."""

from __future__ import annotations

import hmac
import itertools
import secrets

from twisted.internet import defer
from twisted.logger import Logger

from pgtwist.service import reload as reloadmod
from pgtwist.transport import tls
from pgtwist.admin.counters import Counters
from pgtwist.backend.protocol import BackendFactory, CancelFactory, Keepalive
from pgtwist.cluster.health import ClusterMonitor
from pgtwist.pooling.pool import Pool
from pgtwist.routing.router import DatabaseRouter, load_hook
from pgtwist.routing.policy import format_lsn
from pgtwist.backend.connection import ServerConnection
from pgtwist.backend.login import ServerLogin
from pgtwist.session.client import ClientSession
from pgtwist.pooling.statements import Schema

log = Logger()

# Process ids of pgtwist's own BackendKeyData: above PID_MAX_LIMIT (2**22 on 64-bit Linux), so
# never a real backend's, up to the largest int32.
_OWN_PIDS_FROM = 2**22 + 1
_OWN_PIDS_SPAN = 0x7FFFFFFF - _OWN_PIDS_FROM + 1


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
        # BackendKeyData process id -> the session (or, rarely, the sessions) given it: in session
        # pooling it is the node's own process id, which sessions on different nodes may share.
        self.cancel_keys: dict[int, ClientSession | list[ClientSession]] = {}
        self.client_keys: dict[str, bytes] = {}
        self.pinned_sessions = 0
        self.counters = Counters(reactor)  # totals for SHOW STATS and /metrics
        self.service = None  # the PgBalanceService, for admin actions (reload, shutdown)
        self.worker = None  # workers.WorkerLink under workers = N: its keys name it, others' cancels go on
        self.draining = False  # shutting down: clients leave as soon as they are between transactions
        self.paused: set[str] = set()  # databases PAUSEd ("*": all)
        self.retired_pools: set[Pool] = set()  # removed by a reload, closing as their clients finish
        self.routers: dict[str, DatabaseRouter] = {}
        # Prepared statements' clock per node database (statements.Schema): outlives reloads and routers.
        self.schemas: dict[str, Schema] = {}
        self._failover_timers: dict = {}
        self.started = False
        self._client_ids = itertools.count(1)
        self.id_prefix = ""  # "w1." in worker 1 of a supervisor's: ids are unique in the whole tree (KILL, logs)
        self._server_ids = itertools.count(1)
        self.client_tls: tls.ClientTls | None = None  # [tls]: what clients' connections upgrade with
        self.node_tls: tls.NodeTls | None = None  # [server_tls]: what connections to nodes upgrade with
        self.reload_tls()

    # -- clients ---------------------------------------------------------------------------

    def new_client(self, transport) -> ClientSession:
        session = ClientSession(self, transport, f"{self.id_prefix}c{next(self._client_ids)}")
        self.clients[session.id] = session
        self.counters.client_connected()
        if self.config.log_connections:
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
        if self.config.log_disconnections:
            log.info(
                "client {client} disconnected: {user}@{database}, {state}, after {seconds:.1f} s ({why})",
                client=session.id,
                user=session.user,
                database=session.database.name if session.database is not None else None,
                state=session.state,
                seconds=self.clock.seconds() - session.connected_at,
                why=reason.getErrorMessage() if reason is not None else "closed",
            )
        self._forget_cancel_key(session)

    def note_pinned(self, session: ClientSession, reason: str) -> None:
        """Transaction pooling gave up sharing a client's server connection: say so once, count it."""
        self.pinned_sessions += 1
        log.info("client {client} pinned to its server connection: {reason}", client=session.id, reason=reason)

    def maintain(self) -> None:
        """Janitor tick: pools close stale connections and keep warm ones; query_timeout is enforced."""
        for pool in self.pools.values():
            pool.maintain()
        if self.config.query_timeout:
            self.expire_queries(self.config.query_timeout)
        if self.retired_pools:
            reloadmod.sweep(self)

    def expire_queries(self, limit: float) -> None:
        """query_timeout, checked by the janitor (so to within its tick), not by a timer per query:
        a client whose request has waited more than *limit* seconds for its ReadyForQuery from
        a linked node has that statement stopped (ClientSession.query_timed_out)."""
        deadline = self.clock.seconds() - limit
        for session in [s for s in self.clients.values() if s.asked_before(deadline)]:
            session.query_timed_out(limit)

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

    def register_cancel_key(self, session: ClientSession, process_id: int | None = None) -> tuple[int, bytes]:
        """Issue the BackendKeyData a client sees: a secret of ours, never a node's, and a process id.

        The process id is *process_id* when given (session pooling: the node's own, so that
        pg_backend_pid(), a notification's pid and pg_terminate_backend() agree with the
        driver), else one of ours above Linux's largest pid (PID_MAX_LIMIT, 2**22), which no
        PostgreSQL backend can have: pg_terminate_backend() of it ends nobody.
        """
        keys = self.cancel_keys
        if process_id is None:
            while True:
                process_id = _OWN_PIDS_FROM + secrets.randbelow(_OWN_PIDS_SPAN)
                if process_id not in keys:
                    break
        held = keys.get(process_id)
        holders = () if held is None else held if type(held) is list else (held,)
        while True:  # (two sessions sharing a process id must not share the secret too)
            secret = secrets.token_bytes(4)
            if self.worker is not None:
                secret = self.worker.tag(secret)
            if all(s.secret_key != secret for s in holders):
                break
        if held is None:
            keys[process_id] = session
        elif type(held) is list:
            held.append(session)
        else:
            keys[process_id] = [held, session]
        return process_id, secret

    def _forget_cancel_key(self, session: ClientSession) -> None:
        held = self.cancel_keys.get(session.process_id)
        if held is session:
            del self.cancel_keys[session.process_id]
        elif type(held) is list and session in held:
            held.remove(session)
            if len(held) == 1:
                self.cancel_keys[session.process_id] = held[0]

    def cancel(self, process_id: int, secret_key: bytes) -> None:
        """A CancelRequest from a client: forward it to the server serving that client now, if any."""
        if self.worker is not None and self.worker.forward_cancel(process_id, secret_key):
            return  # another worker's key: sent on to it
        held = self.cancel_keys.get(process_id)
        if held is None:
            return  # PostgreSQL ignores unknown keys silently, and so do we
        for session in held if type(held) is list else (held,):
            if hmac.compare_digest(session.secret_key, secret_key):
                if session.server is not None:
                    self.cancel_server(session.server)
                return

    def cancel_server(self, server: ServerConnection) -> None:
        if server.backend_key is None:
            return
        pid, key = server.backend_key
        node = server.node
        factory = CancelFactory(pid, key, self.node_tls, node)
        self.reactor.connectTCP(node.host, node.port, factory, timeout=self.config.server_connect_timeout)

    # -- pools and server connections ----------------------------------------------------------

    # -- routing ----------------------------------------------------------------------------

    def schema_for(self, database) -> Schema:
        schema = self.schemas.get(database.dbname)
        if schema is None:
            schema = self.schemas[database.dbname] = Schema()
        return schema

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
                log.info(
                    "database {db}: the health monitor probes {n} nodes as user {user}",
                    db=database.name, n=len(database.nodes), user=self._health_user_name(),
                )
            hook = None
            if self.config.routing_hook:
                try:
                    hook = load_hook(self.config.routing_hook)
                except Exception:
                    log.failure("cannot load routing_hook {hook}; using the built-in policy", hook=self.config.routing_hook)
            router = self.routers[database.name] = DatabaseRouter(database, self.config, monitor, hook)
        return router

    def _health_user_name(self) -> str:
        return self.config.health_user or next(iter(self.config.users), "")

    def _health_login(self, database, node) -> ServerLogin:
        name = self._health_user_name()
        user = self.config.users.get(name)
        return ServerLogin(name, database.dbname, user.credential if user else None, node_name=str(node))

    def _node_changed(self, database, state, what: str) -> None:
        log.info("database {db}: node {node} {what}", db=database.name, node=state.name, what=what)
        if what == "promoted":
            self.counters.failover()
        for pool in self.pools.values():
            if pool.key[0] == database.name and str(pool.node) == state.name:
                pool.node_changed()  # (what logins there report may differ now)
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
        """auto_promote: the primary stayed away for failover_timeout; promote the most advanced replica.

        Every node is probed once more first: what each replica has received may have grown since
        its last probe, and the choice (newest timeline, then most WAL received, then replayed)
        must be made on positions no older than the decision.
        """
        self._failover_timers.pop(database.name, None)
        router = self.routers.get(database.name)
        if router is None or router.monitor is None or router.primary() is not None:
            return  # an operator or an HA manager got there first
        monitor = router.monitor
        # Only a probe that fails now is evidence enough to promote: whatever marked the primary
        # down (live traffic, an earlier probe), the node must be asked once more first.
        d = monitor.probe_now() if monitor.running else defer.succeed(None)
        d.addBoth(lambda _: self._promote_most_advanced(database, router))
        d.addErrback(lambda f: log.failure("database {db}: auto_promote failed", f, db=database.name))

    def _promote_most_advanced(self, database, router) -> None:
        if self.routers.get(database.name) is not router or router.primary() is not None:
            log.info("database {db}: the primary answered again, or a reload came first; no promotion", db=database.name)
            return
        candidate = router.monitor.most_caught_up_replica()
        if candidate is None:
            log.warn("database {db}: no primary and no replica to promote", db=database.name)
            return
        log.warn(
            "database {db}: no primary for {t:g} s; promoting {node} (timeline {tl}, received {lsn})",
            db=database.name, t=self.config.failover_timeout, node=candidate.name, tl=candidate.timeline,
            lsn=format_lsn(candidate.receive_lsn),
        )
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
        """Reload: run with *config* from now on (pools resized, removed databases retired; see pgtwist.service.reload)."""
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
        conn = ServerConnection(f"{self.id_prefix}s{next(self._server_ids)}", pool, login)
        conn.tls = self.node_tls
        conn.keepalive = Keepalive.from_config(self.config)
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
