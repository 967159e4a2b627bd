"""The running proxy's shared state: clients, pools, cancel keys; what sessions ask of the service."""

from __future__ import annotations

import hmac
import itertools
import secrets

from twisted.internet import defer
from twisted.logger import Logger

from pgtwist.service import reload as reloadmod
from pgtwist.service.entropy import random_bytes
from pgtwist.transport import tls
from pgtwist.transport.connect import NodeDialer, is_unix_host
from pgtwist.admin import audit
from pgtwist.admin.console import AdminConsole
from pgtwist.admin import bouncer
from pgtwist.admin.counters import Counters
from pgtwist.backend.protocol import BackendFactory, CancelFactory, Keepalive
from pgtwist.cluster.health import FUNCTIONS_REFRESH, ClusterMonitor
from pgtwist.pooling.pool import Pool, PoolSettings, internal_timeout
from pgtwist.pooling.limits import ConnectionLimits
from pgtwist.routing.router import DatabaseRouter, load_hook
from pgtwist.routing.policy import format_lsn
from pgtwist.backend.connection import ServerConnection
from pgtwist.backend.login import ServerLogin
from pgtwist.session.client import ClientSession
from pgtwist.pooling.statements import Schema
from pgtwist.auth.authquery import AuthCache, credential_from_rows, lookup_messages
from pgtwist.admin.console import DATABASE as ADMIN_DATABASE

log = Logger()

# Process ids of pgtwist's own BackendKeyData: above PID_MAX_LIMIT (2**22 on 64-bit Linux), so
# never a real backend's, up to the largest int32.
_OWN_PIDS_FROM = 2**22 + 1
_OWN_PIDS_SPAN = 0x7FFFFFFF - _OWN_PIDS_FROM + 1
# auth_query runs on its own few connections: lookups are short, and a burst of logins for
# unknown names must not take a node's connection slots.
AUTH_POOL_SIZE = 2
# Seconds a health monitor keeps its probe connection away from a database a client's DROP
# DATABASE found in use (free_databases): PostgreSQL waits up to 5 s for sessions to leave; the
# statement is sent again at once, and a probe after this finds the database gone or still there.
STEP_ASIDE = 5.0


class Proxy:
    """Owned by the service; one per running pgtwist. *reactor* provides time and connections."""

    def __init__(self, config, reactor):
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        # Makes mock SCRAM salts for unknown users stable within a run but unguessable.
        self.mock_secret = secrets.token_bytes(32)
        self.clients: dict[str, ClientSession] = {}
        self.logging_in: dict[str, ClientSession] = {}  # clients under client_login_timeout, oldest first
        self.admitted = 0  # clients past their startup packet, but the admin console's (max_client_conn)
        self.pools: dict[tuple, Pool] = {}
        # BackendKeyData process id -> the session (or, rarely, the sessions) given it: in session
        # pooling it is the node's own process id, which sessions on different nodes may share.
        self.cancel_keys: dict[int, ClientSession | list[ClientSession]] = {}
        self.client_keys: dict[str, bytes] = {}
        # auth_query: fresh answers by user (AuthCache), the last secret found for each user (its
        # server connections log in with it), lookups under way, and the auth_user's own pools.
        self.auth_cache = AuthCache(config.auth_cache_ttl)
        self.fetched_credentials: dict = {}
        self._lookups: dict[str, list[defer.Deferred]] = {}
        self.auth_pools: dict[tuple, Pool] = {}
        self._busy_marks: dict[str, float] = {}  # client id -> the last janitor tick it was busy at (client_idle_timeout)
        # (auth_user's pools count too: their connections are the database's and auth_user's on
        # the node, as PgBouncer's auth_query connections are)
        self.limits = ConnectionLimits(
            lambda: itertools.chain(self.pools.values(), self.retired_pools, self.auth_pools.values()), lambda: self.config, reactor
        )
        self.pinned_sessions = 0
        self.counters = Counters(reactor)  # totals for SHOW STATS and /metrics
        self.counters.periods = bouncer.StatsPeriods()  # (stats_period: ticked by maintain)
        self.service = None  # the PgBalanceService, for admin actions (reload, shutdown)
        # The admin side, wired in here so that the core never imports pgtwist.admin: the console
        # that answers a client of the admin database, and the log of audited users' statements.
        self.admin_session = AdminConsole
        self.audit_statement = audit.statement
        self.worker = None  # workers.WorkerLink under workers = N: its keys name it, others' cancels go on
        self.notices = None  # notices.Receiver under workers = N: what the other workers tell this one
        self.draining = False  # shutting down: clients leave as soon as they are between transactions
        self.paused: set[str] = set()  # databases PAUSEd ("*": all)
        self.disabled: set[str] = set()  # databases DISABLEd: new clients refused (55000)
        # SET key = value since the file was last read (key -> the value as typed; a reload drops
        # them): with paused and disabled, what a restarted worker takes on (actions.console_state).
        self.overrides: dict[str, str] = {}
        # workers = N: False once this worker, restarted, could not take the console's state from
        # another (it knows only the file): a worker restarted later asks another first.
        self.console_sure = True
        self.retired_pools: set[Pool] = set()  # removed by a reload, closing as their clients finish
        self.routers: dict[str, DatabaseRouter] = {}
        # The [routing_hook] callable, loaded once per configuration (start, each reload), shared by every router.
        self.routing_hook = self._load_routing_hook(config)
        # Prepared statements' clock per node database (statements.Schema): outlives reloads and routers.
        self.schemas: dict[str, Schema] = {}
        self._failover_timers: dict = {}
        self.started = False
        self._client_ids = itertools.count(1)
        self.id_prefix = ""  # "w1." in worker 1 of a supervisor's: ids are unique in the whole tree (KILL, logs)
        self._server_ids = itertools.count(1)
        # Opens connections to nodes (TCP or Unix socket; names re-resolved): started by the Service.
        self.dialer = NodeDialer(reactor, lambda: self.config.dns_max_ttl)
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
            addr = f"{peer.host}:{peer.port}" if hasattr(peer, "host") else "the Unix socket"
            log.info("client {client} connected from {addr}", client=session.id, addr=addr)
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
        self._busy_marks.pop(session.id, None)
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

    def expire_logins(self, now: float) -> None:
        """client_login_timeout: clients still logging in that long are told so and closed.

        logging_in holds them in the order they connected, so the sweep stops at the first that
        still has time: each tick costs what has expired, not what is connected. A reload that
        sets the timeout to 0 stops it for everyone (as no timer would be left running).
        """
        timeout = self.config.client_login_timeout
        if not timeout:
            return
        due = now - timeout
        expired = []
        for session in self.logging_in.values():
            if session.connected_at > due:
                break
            expired.append(session)
        for session in expired:
            del self.logging_in[session.id]
            try:
                session.login_timed_out()
            except Exception:  # (one client's failure must not stop the janitor's LoopingCall)
                log.failure("client {client}: closing at client_login_timeout", client=session.id)

    def free_databases(self, names: tuple[str, ...], client_id: str, node, tell_others: bool = True) -> None:
        """PostgreSQL on *node* refused a client's DROP DATABASE (ALTER DATABASE ... RENAME TO,
        CREATE DATABASE ... TEMPLATE) of databases *names* because sessions are in them
        (session/dropdb.py): pgtwist's connections there that nobody uses go, in every worker
        (*tell_others*: asked here, not by another worker).

        Connections in use stay. The health monitor of a database with several nodes closes its
        probe connection to *node* and opens none for STEP_ASIDE seconds, its state kept as last
        probed (closed for good, every node would look down for that database). Replicas of
        *node* apply the statement themselves (PostgreSQL ends the sessions in the way there).
        """
        closed = 0
        where = str(node)
        for router in self.routers.values():
            if router.monitor is not None and router.database.dbname in names:
                router.monitor.step_aside(where, STEP_ASIDE)
        if tell_others and self.worker is not None:
            self.worker.free(names, where)
        for pool in list(self.pools.values()) + list(self.retired_pools):
            if pool.database.dbname in names and str(pool.node) == where:
                closed += pool.let_go()
        for pool in list(self.auth_pools.values()):
            if (self.config.auth_dbname or pool.database.dbname) in names and str(pool.node) == where:
                closed += pool.let_go()
        if closed:
            log.info("client {client} needs databases {names} free on node {node}: closed {n} idle server connections there",
                     client=client_id, names=", ".join(names), node=where, n=closed)

    def note_pinned(self, session: ClientSession, reason: str) -> None:
        """Transaction pooling gave up sharing a client's server connection: say so once, count it."""
        self.pinned_sessions += 1
        log.info("client {client} pinned to its server connection: {reason}", client=session.id, reason=reason)

    def maintain(self) -> None:
        """Janitor tick: pools close stale connections and keep warm ones; query_timeout is enforced."""
        now = self.clock.seconds()
        for pool in self.pools.values():
            pool.maintain()
            pool.flag_for_check(now)
            if pool.waiters:
                pool.refresh()  # reserve_pool_timeout passed, or room freed under a shared limit
        for pool in self.auth_pools.values():
            pool.maintain()
            if pool.waiters:
                pool.refresh()  # a lookup held by max_db/user_connections: room may have freed since
        for router in self.routers.values():
            if router.told:
                router.renew_told()  # (workers = N: the other workers' holds for DDL here go on)
        if self.logging_in:
            self.expire_logins(now)
        if self.config.query_timeout:
            self.expire_queries(self.config.query_timeout)
        if self.config.client_idle_timeout:
            self.expire_idle_clients(self.config.client_idle_timeout)
        if self.retired_pools:
            reloadmod.sweep(self)
        self.counters.periods.tick(self, now)

    def expire_queries(self, limit: float) -> None:
        """query_timeout, checked by the janitor (so to within its tick), not by a timer per query:
        a client whose request has waited more than *limit* seconds for its ReadyForQuery from
        a linked node has that statement stopped (ClientSession.query_timed_out)."""
        deadline = self.clock.seconds() - limit
        for session in [s for s in self.clients.values() if s.asked_before(deadline)]:
            session.query_timed_out(limit)

    def expire_idle_clients(self, limit: float) -> None:
        """client_idle_timeout, checked by the janitor (to within its tick), no timer per client.

        A client is busy at a tick when it owes or awaits an answer, or is in a transaction; it
        has been idle since the later of its last busy tick and the start of its last request
        (ClientSession.last_request, kept at each ReadyForQuery: requests between ticks count).
        """
        now = self.clock.seconds()
        marks = self._busy_marks
        expired = []
        for session in self.clients.values():
            if not session.logged_in or session.console is not None:
                continue  # (logins have client_login_timeout; the admin console is never closed)
            if not session.idle_at_rest():
                marks[session.id] = now
            elif now - max(marks.get(session.id, 0.0), session.last_request) >= limit:
                expired.append(session)
        for session in expired:
            session.idle_timed_out(limit)

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

    # -- auth_query -------------------------------------------------------------------------------

    def fetch_user(self, name: str, database_name: str) -> defer.Deferred:
        """auth_query: a Deferred firing with the Credential PostgreSQL stores for *name*, or None.

        Answers (absence too) are reused for auth_cache_ttl; logins of the same name waiting at
        once share one query. Runs as auth_user on a pool of its own, which no client ever uses.
        """
        config = self.config
        if not config.auth_user or database_name == ADMIN_DATABASE:
            return defer.succeed(None)  # (the admin console's users are configured ones)
        fresh, credential = self.auth_cache.get(name, self.clock.seconds())
        if fresh:
            return defer.succeed(credential)
        d = defer.Deferred()
        waiting = self._lookups.get(name)
        if waiting is not None:
            waiting.append(d)
            return d
        self._lookups[name] = [d]
        database = config.databases.get(config.auth_dbname or database_name) or next(iter(config.databases.values()))
        self._run_auth_query(name, database).addBoth(self._lookup_done, name)
        return d

    def _run_auth_query(self, name: str, database) -> defer.Deferred:
        pool = self._auth_pool(database)
        data, owed = lookup_messages(self.config.auth_query, name)

        def run(conn):
            def answered(errors):
                rows = conn.internal_rows
                pool.release(conn, True, reset=False)
                if errors:
                    raise RuntimeError(f"auth_query failed on {pool.node}: {errors[-1].get('C')} {errors[-1].get('M')}")
                return credential_from_rows(name, rows)

            def lost(failure):
                pool.release(conn, False)
                return failure

            return conn.run_prepared(data, owed).addCallbacks(answered, lost)

        return pool.acquire().addCallback(run)

    def _lookup_done(self, result, name: str) -> None:
        waiting = self._lookups.pop(name, [])
        if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
            for d in waiting:
                d.errback(result)
            return
        self.auth_cache.put(name, result, self.clock.seconds())
        if result is not None:
            self.fetched_credentials[name] = result
        for d in waiting:
            d.callback(result)

    def _auth_pool(self, database) -> Pool:
        node = self.router_for(database).primary() or database.nodes[0]
        key = (database.name, str(node))
        pool = self.auth_pools.get(key)
        if pool is None:
            pool = self.auth_pools[key] = Pool(
                (database.name, self.config.auth_user, str(node), "auth_query"),
                node,
                database,
                self.config.auth_user,
                PoolSettings(
                    AUTH_POOL_SIZE,
                    wait_timeout=self.config.query_wait_timeout,
                    idle_timeout=self.config.server_idle_timeout,
                    lifetime=self.config.server_lifetime,
                    # (a frozen node must not hold the lookup, and every login waiting on it, for ever)
                    internal_timeout=internal_timeout(self.config),
                ),
                connect=self.connect_server,
                clock=self.clock,
            )
            pool.limits = self.limits  # max_db_connections, max_user_connections (of auth_user); no reserve
        return pool

    def _credential_for(self, user: str):
        """What server connections of *user* log in with: the configured secret, else auth_query's."""
        configured = self.config.users.get(user)
        if configured is not None and configured.credential is not None:
            return configured.credential
        return self.fetched_credentials.get(user)

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
            while True:  # (uniform below the span: the rare 31-bit draw at or above it is drawn again)
                drawn = int.from_bytes(random_bytes(4), "big") & 0x7FFFFFFF
                if drawn < _OWN_PIDS_SPAN and _OWN_PIDS_FROM + drawn not in keys:
                    process_id = _OWN_PIDS_FROM + drawn
                    break
        held = keys.get(process_id)
        holders = () if held is None else held if type(held) is list else (held,)
        while True:  # (two sessions sharing a process id must not share the secret too)
            secret = random_bytes(4)
            if self.worker is not None:
                secret = self.worker.tag(secret)
            if not holders or all(s.secret_key != secret for s in holders):
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

    def cancel(self, process_id: int, secret_key: bytes, done=None) -> None:
        """A CancelRequest from a client: forward it to the server serving that client now, if any.

        *done* is called once that is over: as PostgreSQL's postmaster signals the backend before
        it closes the cancel connection, the client's cancel connection should close only then,
        or a client that sends its next statement at once could have the late cancel land on it.
        """
        done = done or _nothing
        if self.worker is not None and self.worker.forward_cancel(process_id, secret_key, done, self.config.server_connect_timeout):
            return  # another worker's key: sent on to it, which calls done when the owner is
        held = self.cancel_keys.get(process_id)
        if held is None:
            done()
            return  # PostgreSQL ignores unknown keys silently, and so do we
        for session in held if type(held) is list else (held,):
            if hmac.compare_digest(session.secret_key, secret_key):
                if session.cancel_waiting():
                    break  # its work had reached no node: answered 57014 here
                if session.server is not None:
                    self.cancel_server(session.server, done)
                    return
                break
        done()

    def node_tls_for(self, node):
        """[server_tls] for a node over TCP; none over a Unix socket (PostgreSQL answers N there)."""
        return None if is_unix_host(node.host) else self.node_tls

    def cancel_server(self, server: ServerConnection, done=None) -> None:
        if server.backend_key is None:
            if done is not None:
                done()
            return
        pid, key = server.backend_key
        node = server.node
        timeout = self.config.server_connect_timeout
        # Until the node has it, the connection serves no other client (Pool.release holds it):
        # a cancel that arrived after the statement ended would stop the next client's.
        server.canceling += 1

        def delivered():
            server.canceling -= 1
            if not server.canceling:
                server.pool.cancel_delivered(server)
            if done is not None:
                done()

        factory = CancelFactory(pid, key, self.node_tls_for(node), node, self.clock, timeout, delivered)
        try:
            self.dialer.connect(node.host, node.port, factory, timeout=timeout)
        except Exception:  # noqa: BLE001 - not sent: the connection must not stay held for it
            log.failure("cancel to node {node} not sent", node=node)
            factory.clientConnectionFailed(None, None)

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
                    dialer=self.dialer,
                    interval=self.config.health_check_interval,
                    timeout=self.config.health_check_timeout,
                    on_change=lambda state, what, db=database: self._node_changed(db, state, what),
                    functions_refresh=FUNCTIONS_REFRESH,
                )
                if self.started:
                    monitor.start()
                log.info(
                    "database {db}: the health monitor probes {n} nodes as user {user}",
                    db=database.name, n=len(database.nodes), user=self._health_user_name(),
                )
            router = self.routers[database.name] = DatabaseRouter(database, self.config, monitor, self.routing_hook)
            router.elsewhere = self.worker
        return router

    def schema_changed_elsewhere(self, name: str) -> None:
        """Another worker's DDL in database *name* committed (workers = N): this worker's shared
        prepared statements of it are prepared again on their next use, as after DDL here."""
        database = self.config.databases.get(name)
        if database is None:
            return
        self.schema_for(database).ddl()
        self.router_for(database).schema_changed()

    @staticmethod
    def _load_routing_hook(config):
        if not config.routing_hook:
            return None
        try:
            return load_hook(config.routing_hook)
        except Exception:
            log.failure("cannot load routing_hook {hook}; using the built-in policy", hook=config.routing_hook)
            return None

    def _health_user_name(self) -> str:
        # (The first user with a secret of its own: a settings-only table cannot log in unaided.)
        return self.config.health_user or next((n for n, u in self.config.users.items() if u.credential is not None), "")

    def _health_login(self, database, node) -> ServerLogin:
        name = self._health_user_name()
        user = self.config.users.get(name)
        return ServerLogin(name, database.dbname, user.credential if user else None, node_name=str(node))

    def _node_changed(self, database, state, what: str) -> None:
        log.info("database {db}: node {node} {what}", db=database.name, node=state.name, what=what)
        if what == "promoted":
            self.counters.failover()
            router = self.routers.get(database.name)
            if router is not None:
                router.new_primary(state.lsn or 0)  # (its position as primary: where its timeline is)
        for pool in self.pools.values():
            if pool.key[0] == database.name and str(pool.node) == state.name:
                pool.node_changed()  # (what logins there report may differ now)
        if not state.up:
            # Idle server connections to a dead node are useless; busy ones fail on their own.
            # (Only this database's when the node is there but the database is not: dropped.)
            for pool in self.pools.values():
                if str(pool.node) == state.name and (not state.database_missing or pool.key[0] == database.name):
                    for conn in list(pool.idle):
                        conn.close()
        router = self.routers.get(database.name)
        if router is None:
            return
        waiting = self._failover_timers.get(database.name)
        if waiting is not None and router.primary() is not None:
            # The primary answered (or another was promoted): a later outage waits its own
            # failover_timeout, not what is left of this one's.
            del self._failover_timers[database.name]
            if waiting.active():
                waiting.cancel()
        elif (
            what in ("down", "demoted", "fenced", "up") and self.config.auto_promote and self.promotes
            and waiting is None and router.primary() is None and not state.database_missing
        ):
            # ("up" as well: a pgtwist, or a worker 0, started while the primary is away never
            # hears of it going down, only of replicas coming up with no primary beside them.
            # Not for a database dropped on the primary: the node is there, serving the others.)
            self._failover_timers[database.name] = self.clock.callLater(self.config.failover_timeout, self._auto_promote, database)

    @property
    def promotes(self) -> bool:
        """Whether this process acts on auto_promote: under workers = N, worker 0 alone.

        Every worker probes the nodes with its own monitor. Were each to promote on its own view,
        a probe that failed in one worker only (a timeout, a refused connection) would leave it
        choosing another replica than the rest: two primaries. The others learn of the promotion
        from their probes, as of one by an operator; while worker 0 is being restarted nobody
        promotes.
        """
        return self.worker is None or self.worker.spec.index == 0

    def _auto_promote(self, database) -> None:
        """auto_promote: the primary stayed away for failover_timeout; promote the most advanced replica.

        Every node is probed once more first: what each replica has received may have grown since
        its last probe, and the choice (newest timeline, then most WAL received, then replayed)
        must be made on positions no older than the decision.
        """
        self._failover_timers.pop(database.name, None)
        router = self.routers.get(database.name)
        if router is None or router.monitor is None or router.primary() is not None or not self.config.auto_promote:
            return  # an operator or an HA manager got there first (or a reload turned it off)
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
        # (Its role is "unknown" when pgtwist started after the DROP: anything but a replica.)
        gone = [s.name for s in router.monitor.states.values() if s.database_missing and s.role != "replica"]
        if gone:
            log.warn("database {db}: no promotion: it does not exist on the primary {nodes} (dropped?), which is otherwise there",
                     db=database.name, nodes=", ".join(gone))
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
                PoolSettings.from_config(self.config, database),
                connect=self.connect_server,
                clock=self.clock,
            )
            if self.paused and ("*" in self.paused or database.name in self.paused):
                pool.paused = True
            pool.limits = self.limits
        return pool

    def apply_config(self, config, changes) -> None:
        """Reload: run with *config* from now on (pools resized, removed databases retired; see pgtwist.service.reload)."""
        self.routing_hook = self._load_routing_hook(config)  # (a new version of its module too)
        reloadmod.apply(self, config, changes)
        for router in self.routers.values():
            router.hook = self.routing_hook
        # auth_query's answers are asked again under the new settings; its pools are rebuilt.
        self.auth_cache = AuthCache(config.auth_cache_ttl)
        for pool in self.auth_pools.values():
            pool.retire()
            self.retired_pools.add(pool)  # (still counted under the limits until its lookups finish)
        self.auth_pools.clear()

    def connect_server(self, pool: Pool):
        """Open and log in one server connection for *pool*; a Deferred firing with it."""
        login = ServerLogin(
            pool.user,
            pool.database.dbname,
            self._credential_for(pool.user),
            client_key=self.client_keys.get(pool.user),
            node_name=str(pool.node),
        )
        conn = ServerConnection(f"{self.id_prefix}s{next(self._server_ids)}", pool, login)
        conn.tls = self.node_tls_for(pool.node)
        conn.keepalive = Keepalive.from_config(self.config)
        conn.byte_stats = self.counters.database(pool.database.name)
        ready = conn.ready
        ready.addCallbacks(self._server_logged_in, self._server_login_failed, errbackArgs=(str(pool.node),))
        timeout = self.config.server_connect_timeout
        connector = self.dialer.connect(pool.node.host, pool.node.port, BackendFactory(conn), timeout=timeout or 30)
        if timeout:
            timer = self.clock.callLater(timeout, self._login_timed_out, conn, connector)

            def stop_timer(result):
                if timer.active():
                    timer.cancel()
                return result

            ready.addBoth(stop_timer)
        return ready

    def _server_logged_in(self, conn):
        self.counters.server_login(str(conn.node), "ok")
        return conn

    def _server_login_failed(self, failure, node: str):
        # A node that answered with an ErrorResponse refused the login; anything else never got that far.
        fields = getattr(failure.value, "fields", None) or {}
        code = fields.get("C", "")
        refused = bool(code) and not code.startswith("08") and not code.startswith("57P0")
        self.counters.server_login(node, "login_failed" if refused else "connect_failed")
        if self.config.log_pooler_errors:
            log.warn("server login to {node} failed: {why}", node=node, why=fields.get("M") or str(failure.value))
        return failure

    def _login_timed_out(self, conn: ServerConnection, connector) -> None:
        conn.login_timed_out()
        connector.disconnect()

    def close(self):
        for pool in list(self.pools.values()) + list(self.auth_pools.values()):
            pool.close_all()
        stops = [r.monitor.stop() for r in self.routers.values() if r.monitor is not None and r.monitor.running]
        return defer.gatherResults(stops) if stops else None


def _nothing() -> None:
    pass
