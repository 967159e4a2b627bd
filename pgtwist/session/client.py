"""One client's state machine: login, relaying (session and transaction pooling), release, closing.

Getting a server connection for the client's work, and surviving its loss, is in placement.py.
"""

from __future__ import annotations

from twisted.logger import Logger

from pgtwist.routing import sqlinspect

from pgtwist.session import standin

from pgtwist.transport import tls
from pgtwist.service import drain
from pgtwist.admin import audit
from pgtwist.admin.console import DATABASES as ADMIN_DATABASES
from pgtwist.admin.console import AdminConsole
from pgtwist.frontend.login import Authenticated, CancelReceived, ClientLogin, LoginError, Reply, StartTLS
from pgtwist.session.placement import UNSYNCED as _UNSYNCED
from pgtwist.session.placement import Placement
from pgtwist.pooling.relay import CLIENT_CAPTURE, HOT_RUN, SYNC, Relay
from pgtwist.routing.router import Decision
from pgtwist.routing.policy import parse_lsn, write_lsn
from pgtwist.pooling.settings import SERVER_OWNED, client_settings, parse_options, quote_literal, readback_sql, sync_sql
from pgtwist.session.states import ADMIN, CLOSED, IDLE, LINKED, LOGIN, PREPARING, WAITING
from pgtwist.pooling.statements import split_bind, split_parse
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import WireError
from pgtwist.transport.sendnow import write_now
from pgtwist.wire.framing import MessageScanner, frame

__all__ = ["ClientSession", "client_settings", "parse_options", "quote_literal"]

log = Logger()

_Z = p.READY_FOR_QUERY
_TERMINATE = p.TERMINATE
_SESSION_CAPTURE = frozenset((_TERMINATE,))
# Each Query, Sync and FunctionCall earns exactly one ReadyForQuery: counting them tells
# whether the server still owes the client an answer when the client goes away.
_SESSION_WATCH = frozenset((p.QUERY, p.SYNC, p.FUNCTION_CALL))
# Read-your-writes: what _watch_link/_watch_statement look at while a link on the primary has
# not been seen to write. _WATCH_FIRST: the statement the link was placed by is still to come
# (already classified); _WATCH_UNNAMED: the unnamed statement was parsed (and classified) on it.
_WATCH_ALL = 1
_WATCH_FIRST = 2
_WATCH_UNNAMED = 4
_WATCHED = frozenset((p.QUERY, p.PARSE, p.BIND, p.FUNCTION_CALL))
# ClientSession._tx_end: DDL went through the open transaction; it set a search_path of its own.
_DDL_SENT, _LOCAL_PATH = 1, 2
# Read-your-writes: where the primary's WAL ends after this client's write committed.
_WRITE_LSN_SQL = (
    "SELECT pg_catalog.pg_current_wal_insert_lsn()::text, pg_catalog.pg_current_wal_flush_lsn()::text,"
    " pg_catalog.current_setting('synchronous_commit')"
)


_READY_IDLE = m.ready_for_query()
# Logins with the same ParameterStatus set (nearly all of them, in a pool) send the same bytes:
# encoded once, not per login. Bounded: a set that varies (application_name...) is re-encoded.
_ENCODED_PARAMETERS: dict[tuple, bytes] = {}
_ENCODED_PARAMETERS_LIMIT = 256


def _encoded_parameters(parameters: dict[str, str]) -> bytes:
    key = tuple(parameters.items())
    data = _ENCODED_PARAMETERS.get(key)
    if data is None:
        data = b"".join(m.parameter_status(k, v) for k, v in key)
        if len(_ENCODED_PARAMETERS) >= _ENCODED_PARAMETERS_LIMIT:
            _ENCODED_PARAMETERS.clear()
        _ENCODED_PARAMETERS[key] = data
    return data


def _binds_unnamed(body: bytes) -> bool:
    """A Bind body names the unnamed statement (an empty name after the portal's)."""
    at = body.find(b"\x00") + 1
    return body[at : at + 1] == b"\x00"


def _peer_host(transport) -> str | None:
    """The client's address, for the words of a refused login."""
    return getattr(transport.getPeer(), "host", None)


class ClientSession(Placement):
    """Everything one client connection does; FrontendProtocol feeds it bytes.

    Session pooling links one server connection from login to logout. Transaction pooling
    links one per transaction (``IDLE`` in between) and translates named prepared statements
    and session settings so the client cannot tell (see Relay); work that cannot be shared
    (LISTEN, temporary tables, ...) pins the session to its server connection.
    """

    # Thousands of idle clients: no per-instance __dict__.
    __slots__ = (
        "proxy",
        "transport",
        "id",
        "state",
        "config",
        "transaction_mode",
        "login",
        "startup",
        "database",
        "user",
        "pool",
        "server",
        "scanner",
        "relay",
        "settings",
        "dirty",
        "dirty_all",
        "pinned",
        "_effects_of",
        "ready_count",
        "tx_status",
        "process_id",
        "secret_key",
        "backlog",
        "logged_in",
        "connected_at",
        "_waiting",  # the pool this client waits in for a server connection
        "_idle_tx_timer",
        "_login_timer",
        "console",
        "audit",
        "router",
        "user_route",
        "decision",
        "min_lsn",
        "orphaned",
        "_deadline",
        "_link_sent",
        "_link_replied",
        "_link_used",
        "_wrote",
        "_watch",
        "_async_commit",
        "_paused",
        "_pool",
        "_lent",
        "_primary",
        "_asked_at",
        "_read_link",
        "_holding",
        "_startup_settings",
        "_to_restore",
        "_orphan_error",
        "_orphan_told",
        "_tx_end",
        "admitted",
    )

    def __init__(self, proxy, transport, client_id: str):
        self.proxy = proxy
        self.transport = transport
        self.id = client_id
        self.state = LOGIN
        config = proxy.config
        self.config = config
        self.transaction_mode = config.pool_mode == "transaction"
        self.login = ClientLogin(
            config.auth_type,
            proxy.lookup_user,
            proxy.mock_secret,
            tls_mode=config.tls.mode,
            client_host=_peer_host(transport),
            admit=self._admit,
        )
        self.startup: m.StartupMessage | None = None
        self.database = None
        self.user = None
        self.pool = None
        self.server = None
        self.scanner: MessageScanner | None = None
        self.relay: Relay | None = None
        self.settings: dict[str, str] = {}
        self.dirty: set[str] = set()  # settings the client changed; read back before the server goes
        self.dirty_all = False
        self.pinned: str | None = None
        self._effects_of: dict = {}  # statement name -> SessionEffects, for statements that change session state
        self.ready_count = 0
        self.tx_status = p.TX_IDLE
        self.process_id = 0
        self.secret_key = b""
        self.backlog: list = []  # client messages that arrived while no server was linked
        self.logged_in = False
        self.connected_at = proxy.clock.seconds()
        self._waiting = None
        self._idle_tx_timer = None
        self.router = None
        self.user_route = "auto"
        self.decision: Decision | None = None
        self.min_lsn = 0  # read-your-writes: the WAL position of this client's last write
        self.orphaned = False  # its transaction died with a node: only ROLLBACK gets it out
        self._deadline = None  # until when waiting work may still be retried
        self._link_sent: list = []  # what this link forwarded before any reply (replayable reads)
        self._link_replied = False
        self._link_used = False
        self._wrote = False  # read-your-writes: this link may have written on the primary (see _watch_link)
        self._watch = 0
        self._async_commit = False  # ... and its transaction's commit may have been asynchronous (SET LOCAL)
        self._paused = False
        self._pool = None  # the pool the last transaction used
        self._lent = False  # linked between transactions on a connection the pool may reclaim
        self._primary = None  # the Decision for the primary, kept while the primary stays
        self._orphan_error = None  # the error an orphaned transaction's next statement gets (08006, 57P01...)
        self._orphan_told = False  # an orphaned batch's error went out at its Flush: its Sync gets ReadyForQuery alone
        self._tx_end = 0  # what to do when the open transaction ends: _DDL_SENT | _LOCAL_PATH
        self._asked_at: float | None = None  # when the client's pending request began (query latency)
        self._read_link = False  # linked to a replica for an autocommit read: writes behind it wait
        self._holding = False  # a write is waiting in the backlog for this read's replica to go
        self._startup_settings: dict[str, str] = {}  # what RESET returns to, for this client
        self._to_restore: set[str] | None = None  # startup settings a RESET sent to the server's defaults
        self.console = None
        self.admitted = False  # counted against max_client_conn (proxy.admit)
        self.audit = False  # statements are logged (the user is listed in `audit`)
        self._login_timer = (
            proxy.clock.callLater(config.client_login_timeout, self._login_timed_out) if config.client_login_timeout else None
        )

    def __repr__(self):
        return f"<ClientSession {self.id} {self.user}@{self.database and self.database.name} {self.state}>"

    # -- events from FrontendProtocol ---------------------------------------------------------

    def got_data(self, data: bytes) -> None:
        if self.state is LINKED and not self.transaction_mode:
            self._forward_session(data)
            return
        try:
            if self.state is LOGIN:
                self._login_data(data)
            elif self.state is ADMIN:
                self.console.got_data(data)
            elif self.state is not CLOSED:
                self._client_data(data)
        except WireError as e:
            if e.silent:
                self._close_silently(str(e))
            else:
                self.fatal(e.sqlstate, str(e), getattr(e, "detail", None))
        except LoginError as e:
            self.fatal(e.sqlstate, e.message, e.detail)
        except Exception:
            log.failure("client {client}: internal error", client=self.id)
            self.fatal(sqlstate.INTERNAL_ERROR, "internal error in pgtwist; the proxy log has the details")

    def connection_lost(self, reason) -> None:
        if tls.is_tls_failure(reason):
            log.info("client {client}: TLS failed: {why}", client=self.id, why=tls.failure_text(reason))
        previous = self.state
        self.state = CLOSED
        self._cancel_login_timer()
        self._cancel_idle_tx_timer()
        if self._waiting is not None:
            pool, self._waiting = self._waiting, None
            pool.cancel_wait(self)
        if previous is LINKED and self.server is not None:
            self._release_server()
        self.proxy.client_closed(self, reason)

    # -- login ---------------------------------------------------------------------------

    def tls_established(self) -> None:
        """The client's TLS handshake finished (FrontendProtocol.handshakeCompleted)."""
        if self.state is not LOGIN:
            return
        try:
            self._login_events(self.login.tls_started(**tls.client_handshake_info(self.transport)))
        except (WireError, LoginError) as e:
            self.fatal(e.sqlstate, e.message if isinstance(e, LoginError) else str(e), getattr(e, "detail", None))

    def _login_data(self, data: bytes) -> None:
        self._login_events(self.login.feed(data))

    def _login_events(self, events: list) -> None:
        for event in events:
            if isinstance(event, Reply):
                write_now(self.transport, event.data)  # (no epoll round for the login's replies)
            elif isinstance(event, StartTLS):
                tls.start_tls(self.transport, self.proxy.client_tls, event.initial)
            elif isinstance(event, CancelReceived):
                self.proxy.cancel(event.process_id, event.secret_key)
                self.state = CLOSED
                self.transport.loseConnection()
                return
            elif isinstance(event, Authenticated):
                self._authenticated(event)

    def _authenticated(self, event: Authenticated) -> None:
        self.startup = event.startup
        self.user = event.startup.user
        name = event.startup.database
        if name in ADMIN_DATABASES:
            self._admin_console()
            return
        database = self.proxy.config.databases.get(name)
        if database is None:
            raise LoginError(sqlstate.INVALID_CATALOG_NAME, f'database "{name}" does not exist')
        if name in getattr(self.proxy, "disabled", ()):
            raise LoginError(
                sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE,
                f'database "{name}" is not currently accepting connections',
                "An operator ran DISABLE on it in the admin console; ENABLE undoes it.",
            )
        self.database = database
        self.settings = client_settings(event.startup.parameters)
        self._startup_settings = dict(self.settings)
        if event.client_key is not None:
            self.proxy.remember_client_key(self.user, event.client_key)
        if self.transaction_mode:
            # A client's server connection changes from one transaction to the next: no node's
            # process id is its own, so it gets one of pgtwist's. (Session pooling gives the
            # server's own once it has one: _prepared.)
            self.process_id, self.secret_key = self.proxy.register_cancel_key(self)
            self.scanner = MessageScanner(CLIENT_CAPTURE, self.config.max_message_size, frontend=True)
            self.relay = Relay(self.proxy.schema_for(database), self.settings.get("search_path", ""))
        else:
            self.scanner = MessageScanner(_SESSION_CAPTURE, self.config.max_message_size, _SESSION_WATCH, frontend=True)
        if self.user in self.config.audit:
            self.audit = True
            self.scanner.capture = self.scanner.capture | audit.CAPTURE
        self.router = self.proxy.router_for(database)
        user = self.config.users.get(self.user)
        self.user_route = user.route if user is not None else "auto"
        leftover = self.login.leftover()
        if leftover:
            self.backlog.extend(self.scanner.feed(leftover))
        known = self._known_login() if self.transaction_mode else None
        if known is not None:
            self._logged_in(known)
            self.state = IDLE
            if self.backlog:
                self._acquire()
        else:
            # A server connection tells us what to report (and proves the node is there).
            self._acquire()

    def _admit(self, startup: m.StartupMessage) -> bool:
        """Whether there is room for this client (asked as soon as its startup packet is read).

        The admin console is never refused: an operator must get in while the proxy is full.
        """
        return startup.database in ADMIN_DATABASES or self.proxy.admit(self)

    def _admin_console(self) -> None:
        """dbname "pgbalance": the admin console answers instead of a node ([admin] users only)."""
        self.console = AdminConsole(self)  # LoginError 42501 for anyone else
        self._cancel_login_timer()
        self.state = ADMIN
        self.logged_in = True
        self.process_id, self.secret_key = self.proxy.register_cancel_key(self)
        leftover = self.login.leftover()
        self.login = None
        self.transport.write(self.console.welcome(self.process_id, self.secret_key))
        if leftover:
            self.console.got_data(leftover)

    def _login_key(self) -> tuple:
        """What, besides the pool (database, user, node), shapes the ParameterStatus a login reports."""
        return tuple(sorted(self.settings.items()))

    def _known_login(self) -> dict[str, str] | None:
        """Transaction pooling: the ParameterStatus set an earlier login like this one was told.

        Only from the pool this login would use (same database, user and node: the primary
        now), so that no user is ever told another's session_authorization or is_superuser,
        and a failover (another primary) means a real login; the pool forgets what it knew
        when its node changes (see Pool.node_changed).
        """
        node = self.router.primary()
        if node is None:
            return None
        pool = self.proxy.pools.get((self.database.name, self.user, str(node)))
        return pool.login_parameters.get(self._login_key()) if pool is not None else None

    def _logged_in(self, parameters: dict[str, str]) -> None:
        self._cancel_login_timer()
        self.logged_in = True
        self.login = None  # its buffers and exchange state are done with
        write_now(self.transport, _encoded_parameters(parameters) + m.backend_key_data(self.process_id, self.secret_key) + _READY_IDLE)

    def _cancel_login_timer(self) -> None:
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if self.state is LOGIN:
            # PostgreSQL closes silently when the startup packet never comes; after it, say why.
            if self.login.startup is None:
                self.state = CLOSED
                self.transport.loseConnection()
            else:
                self.fatal(sqlstate.QUERY_CANCELED, "canceling authentication due to timeout")
        # Waiting for a server connection at login: the pool's wait timeout speaks for that.

    # -- client bytes (all but session mode's linked fast path) ---------------------------------

    def _client_data(self, data: bytes) -> None:
        if self._idle_tx_timer is not None:
            self._cancel_idle_tx_timer()
        if self._asked_at is None:
            self._asked_at = self.proxy.clock.seconds()
        items = self.scanner.feed(data)
        if self.state is LINKED:
            if self._lent:  # its next transaction, on the connection it kept
                self._lent = False
                server = self.server
                server.pool.unlend(server)
                if self.router.clustered and not self._placed_on(server, items):
                    return  # placed on another node: the kept connection went back
                # A new transaction: what may be replayed if the node dies starts afresh.
                self._link_sent = []
                self._link_replied = server.replied = False
                if len(items) == 1:
                    if self._plain_query(items[0], data, server):
                        return
                elif self._plain_batch(items, data, server):
                    return
            self._client_items(items)
        elif self.state is IDLE:
            if len(items) == 1 and type(items[0]) is tuple and items[0][0] == _TERMINATE:
                self.state = CLOSED
                self.transport.loseConnection()
                return
            if self.orphaned:
                self._answer_orphaned(items)
                return
            self.backlog.extend(items)
            self._acquire()
        else:  # WAITING, PREPARING: keep it for the server connection on its way
            self.backlog.extend(items)
            self._pause()

    def _plain_query(self, item, data: bytes, server) -> bool:
        """The common case on a kept connection: one simple Query that leaves session state alone.

        It goes out as the very bytes the client sent; the relay only notes one more
        ReadyForQuery owed. Anything else takes the general path (_client_items).
        """
        if type(item) is not tuple or item[0] != p.QUERY or self.audit or not self.relay.idle:
            return False
        body = item[1]
        if len(body) + 5 != len(data):
            return False
        effects = sqlinspect.inspect_query(body)
        if effects.changes_state or effects.local_commit_mode:
            return False
        self._link_used = True
        self._watch &= _WATCH_ALL  # (this is the statement the link was placed by)
        self._link_sent.append(item)
        self.relay.expect_ready()
        write_now(server.transport, data)
        return True

    def _plain_backlog(self, backlog: list, server) -> bool:
        """A connection just handed over (clients outnumber server connections): its first work is
        most often what a kept connection's is, one plain Query or a prepared statement run again.
        It takes the same fast paths, so that its answer too is forwarded whole (whole_reply)
        rather than message by message through the relay."""
        if len(backlog) == 1:
            item = backlog[0]
            return type(item) is tuple and item[0] == p.QUERY and self._plain_query(item, frame(p.QUERY, item[1]), server)
        return self._plain_batch(backlog, None, server)

    def _plain_batch(self, items: list, data: bytes | None, server) -> bool:
        """The other common case: Bind (of a statement this connection holds), [Describe portal,]
        Execute, Sync — a prepared statement run again. Only the statement name is rewritten;
        the relay notes one ReadyForQuery owed, and the replies pass through untouched."""
        n = len(items)
        if n not in (3, 4) or self.audit or not self.relay.idle:
            return False
        first, last = items[0], items[-1]
        if type(first) is not tuple or first[0] != p.BIND or type(last) is not tuple or last[0] != p.SYNC:
            return False
        execute = items[-2]
        if type(execute) is not tuple or execute[0] != p.EXECUTE:
            return False
        if n == 4:
            describe = items[1]
            if type(describe) is not tuple or describe[0] != p.DESCRIBE or describe[1][:1] != b"P":
                return False
        body = first[1]
        portal_end = body.find(b"\x00")
        name_end = body.find(b"\x00", portal_end + 1)
        if portal_end < 0 or name_end < 0:
            return False  # (the general path reports the malformed Bind)
        relay = self.relay
        if name_end > portal_end + 1:
            name = body[portal_end + 1 : name_end].decode("utf-8", "replace")
            statement = relay.statements.get(name)
            if statement is None or name in self._effects_of or (relay.doomed and name in relay.doomed):
                return False
            # Relay.fresh(), inline: the connection's copy is newer than the client's Parse (and
            # than the last DDL, when the run describes its result).
            held = server.statements.names.get(statement.server_name)
            if held is None or held < statement.parsed_at or (n == 4 and held < relay.schema.ddl_at):
                return False
            server.statements.touch(statement.server_name)
            bind = frame(p.BIND, body[: portal_end + 1] + statement.server_name.encode() + body[name_end:])
            relay.queue.append(HOT_RUN)  # (Relay.expect_batch, inline)
            relay.hot = (items, server.statements, statement.server_name)
        else:
            if "" in self._effects_of:
                return False
            bind = frame(p.BIND, body)
            relay.expect_ready(simple=False)
        self._link_used = True
        self._watch &= _WATCH_ALL  # (this is the statement the link was placed by)
        self._link_sent.extend(items)
        if data is not None and self.scanner.at_boundary:
            # The read held exactly these messages (the scanner began it at a boundary, as a
            # lent client's always does): what follows the Bind goes out as the client sent it.
            write_now(server.transport, bind + data[5 + len(body) :])
        else:
            write_now(server.transport, bind + b"".join(frame(t, b) for t, b in items[1:]))
        return True

    def _client_items(self, items: list) -> None:
        if not self.transaction_mode:
            self._session_items(items)
            return
        if self._holding:
            self.backlog.extend(items)  # behind a write held back from a replica: waits for the primary
            return
        if self._read_link:
            items = self._hold_writes(items)
        relay = self.relay
        server = self.server
        to_server: list = []
        to_client: list = []
        self._link_used = True
        if not self._link_replied:
            if server.replied:
                self._link_replied = True
            else:
                self._link_sent.extend(items)
        watch = self._watch
        relay.upcoming = items  # (what follows a Bind: see Relay.fresh)
        for at, item in enumerate(items):
            if type(item) is bytes:  # COPY data and the like
                to_server.append(item)
                continue
            msg_type, body = item
            if msg_type == _TERMINATE:
                self._flush(to_server, to_client)
                self._terminate()
                return
            if watch and msg_type in _WATCHED:
                watch = self._watch_statement(msg_type, body, watch)
            if self.audit and (msg_type == p.QUERY or msg_type == p.PARSE):
                audit.statement(self, msg_type, body)
            if msg_type == p.QUERY:
                effects = sqlinspect.inspect_query(body)
                if effects.changes_state:
                    if self._query(body, effects, to_server, to_client):
                        continue
                elif effects.local_commit_mode:
                    self._async_commit = True
            elif msg_type == p.PARSE:
                name, definition = split_parse(body)
                text, _, types = definition.partition(b"\x00")
                sql = text + b"\x00"
                effects = sqlinspect.inspect_query(sql)
                if effects.changes_state or effects.local_commit_mode:
                    self._effects_of[name] = effects
                else:
                    self._effects_of.pop(name, None)
            elif msg_type == p.BIND:
                relay.at = at
                if not self._effects_of:
                    relay.client_message(msg_type, body, server, to_server, to_client)
                    continue
                # A statement acts where and when it runs: on this server, now.
                effects = self._effects_of.get(split_bind(body)[1])
                if effects is not None:
                    if effects.pin and not self.pinned and self.config.unpoolable == "error":
                        relay.fail(sqlstate.FEATURE_NOT_SUPPORTED, f"{effects.pin} is not supported in transaction pooling mode", to_client)
                        continue
                    if effects.deallocate:  # SQL DEALLOCATE of the client's own (protocol-level) statements
                        relay.stand_in(effects.deallocate, to_server)
                    relay.client_message(msg_type, body, server, to_server, to_client)
                    self._note_effects(effects)
                    continue
            relay.client_message(msg_type, body, server, to_server, to_client)
            if self._to_restore is not None and (msg_type == p.QUERY or msg_type == p.SYNC):
                self._restore_startup_settings(to_server)
        relay.upcoming = ()
        self._flush(to_server, to_client)
        self._maybe_release()

    def _restore_startup_settings(self, to_server: list) -> None:
        """After RESET, RESET ALL or DISCARD ALL: the startup values of what they reset, back in force.

        On its own session PostgreSQL would return to those values (a startup packet's settings
        are the session's defaults); on a pooled connection they were applied with set_config(),
        so the server's RESET went past them to its own defaults. A batch of the proxy's own
        follows the statement's at once, in the same transaction state, its answer unseen but
        for ParameterStatus, the client's unnamed statement and portal untouched; the release
        read-back then finds the settings as they are.
        """
        names, self._to_restore = self._to_restore, None
        statements = sync_sql({n: v for n, v in self._startup_settings.items() if n in names}, {}, {})
        if statements is not None:
            self.relay.inject(statements, to_server)

    def _hold_writes(self, items: list) -> list:
        """On a replica for an autocommit read: keep back whatever write the client pipelined behind it.

        What is kept back waits in the backlog; once the read is answered and the replica
        released, it is placed like any new work (on the primary). An extended-protocol batch is
        one implicit transaction: it is kept back whole, from its first message. (Its start can
        only have gone to the replica already when the client sent it in pieces after the
        replica's first batch; then the write goes there too and is refused with 25006, as
        PostgreSQL refuses a write in a read-only transaction, rather than split the batch.)
        """
        if self.pinned:
            # Pinned to this replica's connection (SQL PREPARE, ...): it is never released, so
            # whatever waited for that would wait for ever. The replica judges a write (25006).
            return items
        first = not self._link_used
        queue = self.relay.queue
        # Where the batch being sent began (None: before these items, or it is the batch the
        # replica was chosen for, placed whole: nothing of it is held back).
        # An extended batch still open (its Sync not come): never split inside it, Query messages
        # included, or the replica would wait for a Sync held back behind the replica's release.
        open_batch = self.relay.unsynced or bool(queue and queue[-1].kind is not SYNC)
        start = None if first or open_batch else 0
        for i, item in enumerate(items):
            if type(item) is not tuple:
                continue
            msg_type = item[0]
            if msg_type == p.SYNC:
                start = i + 1
                open_batch = False
                continue
            if msg_type != p.QUERY:
                if msg_type in _UNSYNCED:
                    open_batch = True
                if msg_type != p.PARSE and msg_type != p.BIND:
                    continue
            elif not open_batch:
                start = i  # (a Query is a batch of its own: the next one starts after it)
            texts = list(self._statement_texts([item]))
            if texts and first:
                first = False  # the statement this replica was chosen for
            elif texts:
                c = self.router.classify(texts[0])
                if not c.read_only or c.tx is not None:
                    if start is None:
                        return items
                    self._holding = True
                    self.backlog = items[start:] + self.backlog
                    return items[:start]
            if msg_type == p.QUERY and not open_batch:
                start = i + 1
        return items

    def _flush(self, to_server: list, to_client: list) -> None:
        if to_server:
            write_now(self.server.transport, b"".join(to_server))
        if to_client:
            self._link_replied = True
            write_now(self.transport, b"".join(to_client))
        if self.server is not None and self.server.scanner is not None:
            self.server.scanner.capture = self.relay.capture()

    def _query(self, body: bytes, effects, to_server: list, to_client: list) -> bool:
        """A simple Query that changes session state; True when the proxy answered it itself."""
        relay = self.relay
        if (effects.deallocate or effects.deallocate_all) and relay.tx_status == p.TX_FAILED:
            return False  # PostgreSQL refuses it (25P02) and nothing is deallocated: its answer, as is
        # (A pinned session's DEALLOCATE ALL must also reach SQL PREPAREd statements on its server.)
        if effects.statements == 1 and (effects.deallocate or (effects.deallocate_all and not self.pinned)):
            names = effects.deallocate
            if effects.deallocate_all or all(n in relay.statements for n in names):
                # The client's own statements live in the proxy; the server holds shared ones.
                if effects.deallocate_all:
                    relay.drop()
                    tag = "DEALLOCATE ALL"
                else:
                    for n in names:
                        relay.drop(n)
                    tag = "DEALLOCATE"
                relay.synth_reply(lambda: m.command_complete(tag) + m.ready_for_query(relay.tx_status), to_client)
                return True
        if effects.pin and not self.pinned and self.config.unpoolable == "error":
            message = f"{effects.pin} is not supported in transaction pooling mode"
            relay.synth_reply(
                lambda: m.error_response("ERROR", sqlstate.FEATURE_NOT_SUPPORTED, message) + m.ready_for_query(relay.tx_status),
                to_client,
            )
            return True
        self._note_effects(effects)
        return False

    def _note_effects(self, effects) -> None:
        if effects.local_commit_mode:
            self._async_commit = True
        if effects.ddl:
            # Every server connection's shared statements of this database may mean something
            # else now: each is prepared again on its next use there (statements.Schema). Once
            # more when the transaction ends: a copy prepared meanwhile elsewhere saw the old schema.
            self.relay.schema.ddl()
            self._tx_end |= _DDL_SENT
        if "search_path" in effects.settings or effects.all_settings or effects.local_path:
            # Its value is known again at the read-back (or when the transaction ends, for SET
            # LOCAL); until then what it prepares is its own.
            self.relay.scope = "\x00" + self.id
            if effects.local_path:
                self._tx_end |= _LOCAL_PATH
        if effects.pin and not self.pinned:
            self.pinned = effects.pin
            self.proxy.note_pinned(self, effects.pin)
        self.dirty.update(effects.settings)
        if effects.all_settings:
            self.dirty_all = True
        if self._to_restore is not None:
            self._to_restore -= effects.assigned  # (set again by a later statement of this batch)
        names = effects.to_restore(self._startup_settings)
        if names:
            self._to_restore = names if self._to_restore is None else self._to_restore | names
        if effects.deallocate_all or (
            effects.discard_all and effects.statements == 1 and self.relay.tx_status == p.TX_IDLE
        ):
            # It runs on the server: every prepared statement there goes, the client's own with
            # them (as PostgreSQL does), and the connection leaves the pool at release. (DISCARD
            # ALL in a transaction block, or in a multi-statement text, PostgreSQL refuses: 25001.)
            self.server.tainted = True
            self.server.statements.clear()
            self.relay.drop()

    def _terminate(self) -> None:
        """Terminate: the client is leaving; its server connection is not."""
        self.state = CLOSED
        if self.server is not None:
            self._release_server()
        self.transport.loseConnection()

    # -- session mode, linked: the hot path ------------------------------------------------

    def _forward_session(self, data: bytes) -> None:
        try:
            items = self.scanner.feed(data)
        except WireError as e:
            self.fatal(e.sqlstate, str(e))
            return
        if self._idle_tx_timer is not None:
            self._cancel_idle_tx_timer()
        if self._asked_at is None:
            self._asked_at = self.proxy.clock.seconds()  # query latency runs to the ReadyForQuery
        if len(items) == 1 and type(items[0]) is bytes:
            write_now(self.server.transport, items[0])
            return
        self._session_items(items)

    def _session_items(self, items: list) -> None:
        out = []
        for item in items:
            if type(item) is bytes:
                out.append(item)
            elif item[0] == _TERMINATE:
                if out:
                    write_now(self.server.transport, b"".join(out))
                self._terminate()
                return
            else:  # Query or Parse of an audited client
                audit.statement(self, item[0], item[1])
                out.append(frame(item[0], item[1]))
        if out:
            write_now(self.server.transport, b"".join(out))

    # -- server events --------------------------------------------------------------------------

    def server_items(self, server, items: list, data: bytes) -> None:
        """Messages from the linked server: bytes runs to forward, and the captured (type, body) ones."""
        if len(items) == 2:
            last = items[1]
            if type(last) is tuple and last[0] == _Z and len(last[1]) == 1 and len(items[0]) + 6 == len(data):
                # The common case: a reply ending with its ReadyForQuery in this very read.
                # The read goes out as it came, uncopied; only the status is looked at.
                self.reply_done(server, last[1][0], data)
                return
        self._server_messages(server, items)

    def _server_messages(self, server, items: list) -> None:
        out: list = []
        status = None
        if self.transaction_mode:
            relay = self.relay
            for item in items:
                if type(item) is bytes:
                    out.append(item)
                    relay.hot = None  # (an answer to the fast path's batch began: it is not retried)
                    continue
                msg_type, body = item
                if msg_type == p.PARAMETER_STATUS:
                    self._parameter_status(server, body)
                got = relay.server_message(msg_type, body, out)
                if got is not None:
                    status = got
            server.scanner.capture = relay.capture()
            if relay.again is not None:
                # A batch failed on a stale shared statement, and nothing of it reached the client:
                # it goes again, the statement prepared afresh first.
                write_now(self.transport, b"".join(out))
                self._send_again(relay)
                if status is not None:  # (an earlier request's ReadyForQuery in the same read)
                    self._ready(server, status)
                return
        else:
            ready = 0
            for item in items:
                if type(item) is bytes:
                    out.append(item)
                    continue
                msg_type, body = item
                out.append(frame(msg_type, body))
                if msg_type == _Z:
                    ready += 1
                    status = body[0] if body else p.TX_IDLE
                elif msg_type == p.ERROR_RESPONSE:
                    fields = m.decode_fields(body)
                    if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                        server.fatal = fields  # relayed as it came: when the node hangs up, nothing more is said
                else:
                    self._parameter_status(server, body)
            self.ready_count += ready
        write_now(self.transport, b"".join(out))
        if status is not None:
            self._ready(server, status)

    def _send_again(self, relay) -> None:
        items, relay.again = relay.again, None
        relay.replaying = True  # (once: if it fails again, the client hears why)
        try:
            self._client_items(items)
        finally:
            relay.replaying = False

    def reply_done(self, server, status: int, data: bytes) -> None:
        """The linked server's read *data* ends with a ReadyForQuery (transaction *status*) and
        holds nothing else to look at: it goes out as it came, uncopied."""
        if self.transaction_mode:
            relay = self.relay
            if relay.swallowing:  # that ReadyForQuery may be the proxy's own: look at it
                head = data[:-6]
                self._server_messages(server, ([head] if head else []) + [(_Z, data[-1:])])
                return
            after: list = []
            relay.ready(status, after)
            server.scanner.capture = relay.capture()
            write_now(self.transport, data + b"".join(after) if after else data)
        else:
            self.ready_count += 1
            write_now(self.transport, data)
        self._ready(server, status)

    def _parameter_status(self, server, body: bytes) -> None:
        try:
            name, value = m.decode_parameter_status(body)
        except WireError:
            return
        server.parameters[name] = value
        key = name.lower()
        if key not in SERVER_OWNED:
            # The client changed a reported setting itself (SET application_name, ...).
            self.settings[key] = value
            server.settings[key] = value
            if key == "search_path" and self.relay is not None:
                self.relay.scope = value

    def _ready(self, server, status: int) -> None:
        self.tx_status = status
        server.tx_status = status
        if self._tx_end and status == p.TX_IDLE:
            self._transaction_ended()
        decision = self.decision
        started, self._asked_at = self._asked_at, None
        self.proxy.counters.ready(
            self.id,
            server.node,
            decision.want if decision is not None else "primary",
            status,
            None if started is None else self.proxy.clock.seconds() - started,
            self.database.name,
        )
        if status != p.TX_IDLE and self.config.idle_transaction_timeout:
            # Several ReadyForQuery may come before the client speaks again: keep only the last timer.
            self._cancel_idle_tx_timer()
            self._idle_tx_timer = self.proxy.clock.callLater(self.config.idle_transaction_timeout, self._idle_tx_timed_out)
        if self.transaction_mode:
            self._maybe_release()
        if self.proxy.draining:
            drain.settle(self)  # shutting down: a client between transactions leaves now

    def _transaction_ended(self) -> None:
        done, self._tx_end = self._tx_end, 0
        if done & _DDL_SENT:
            self.relay.schema.ddl()  # (committed now: see _note_effects)
        if done & _LOCAL_PATH and not ("search_path" in self.dirty or self.dirty_all):
            self.relay.scope = self.settings.get("search_path", "")

    def _maybe_release(self) -> None:
        """Transaction pooling: give the server connection back once the client is between transactions."""
        if self.state is not LINKED or self.pinned:
            return
        scanner = self.scanner
        # (What the client sent after a held-back write is not on the server: only the relay counts then.)
        client_done = self._holding or (scanner.at_boundary and scanner.last_type not in _UNSYNCED)
        if not (self.relay.idle and self.relay.tx_status == p.TX_IDLE and client_done):
            return
        server = self.server
        if not (self.dirty or self.dirty_all or self.router.clustered):
            pool = server.pool
            if not pool.waiters and not pool.paused and not self.proxy.draining:
                self._lent = True  # (see lending below; nothing to read back first)
                pool.lend(server, self)
                return
        names: list[str] = []
        if self.dirty or self.dirty_all:
            names = sorted(set(self.settings) | set(server.settings) | self.dirty) if self.dirty_all else sorted(self.dirty)
            self.dirty = set()
            self.dirty_all = False
            names = [n for n in names if n not in SERVER_OWNED]
        batches = [[readback_sql(names)]] if names else []
        # (The link that only logged the client in wrote nothing.) The transaction has ended
        # (idle), so the query runs after its commit, outside it.
        track_lsn = self._wrote and self._link_used
        if track_lsn:
            batches.append([_WRITE_LSN_SQL])
        if batches:
            self.state = PREPARING
            server.unlink()
            server.run_for_client(batches).addCallbacks(
                lambda _: self._read_back(server, names, track_lsn), lambda _: self._read_back_failed(server)
            ).addErrback(self._crashed)
            return
        pool = server.pool
        placed_at_once = not self.router.clustered or self.router.hook is None
        if placed_at_once and not self.backlog and not pool.waiters and not pool.paused and not self.proxy.draining:
            # Lent, not returned: the connection stays linked while nobody else wants it, and
            # the pool takes it back the moment someone does (reclaim). The client's next
            # transaction then starts with no acquire, link or settings sync at all. (In a
            # cluster that transaction is placed anew first, and stays only if it belongs on
            # this node: _placed_on. A routing hook may answer later, so then it goes back.)
            self._lent = True
            pool.lend(server, self)
            return
        self._give_back(server)

    # -- read-your-writes: which transactions may have written ---------------------------------

    def _watch_link(self, decision, known: bool = True) -> None:
        """A link starts (or goes on with work of unknown text, *known* False) on *decision*'s node:
        note whether what runs there may write, so its release notes the primary's WAL position.

        Only work on the primary can write. There, work placed by a statement that may write
        counts at once; work placed by a read (BEGIN, a read-only first statement, a read sent to
        the primary because no replica had caught up) is watched: each further statement of the
        link is classified until one may write (_watch_statement). Links on replicas cost nothing.
        """
        self._async_commit = False
        if decision is None or not decision.on_primary or not self.config.read_your_writes or not self.router.clustered:
            self._wrote = False
            self._watch = 0
        elif known and decision.classification.read_only:
            self._wrote = False
            self._watch = _WATCH_ALL | _WATCH_FIRST
        else:
            self._wrote = True
            self._watch = 0

    def _watch_statement(self, msg_type: int, body: bytes, watch: int) -> int:
        """A watched link runs another statement (Query, Parse, Bind, FunctionCall): may it write?
        Returns what to watch next (0 once it may: the link's release notes the WAL position)."""
        if msg_type == p.BIND and watch & _WATCH_UNNAMED and _binds_unnamed(body):
            return watch  # it runs the unnamed statement, whose Parse was classified
        text = None if msg_type == p.FUNCTION_CALL else standin.statement_text(msg_type, body, self.relay.statements)
        if msg_type == p.PARSE and body[:1] == b"\x00":
            watch |= _WATCH_UNNAMED
        if text is not None and watch & _WATCH_FIRST:
            watch &= ~_WATCH_FIRST  # the statement the link was placed by: classified already
        elif text is None or not self.router.classify(text).read_only:
            self._wrote = True
            watch = 0
        self._watch = watch
        return watch

    def reclaim(self, server) -> None:
        """The pool needs the connection this client holds between transactions: give it back now."""
        if self._lent and self.server is server and self.state is LINKED:
            self._lent = False
            self._give_back(server)

    def _read_back_failed(self, server) -> None:
        """The server connection ended while the proxy read back what the client's transaction left."""
        self.server = None
        said = server.fatal
        self.router.server_ended(server.node, said, "connection lost after a transaction")
        if said is not None and said.get("C") == sqlstate.PROTOCOL_VIOLATION and self.state is not CLOSED:
            # What the client sent last made the node hang up: the client goes with the node's words.
            self.fatal_fields(dict(said, S="FATAL", V="FATAL"))
            return
        if self.state is not CLOSED:
            self.state = IDLE
            self._resume()
            if self.backlog:
                self._acquire()

    def _read_back(self, server, names: list[str], track_lsn: bool) -> None:
        rows = server.internal_rows
        if names:
            if rows and len(rows[0]) == len(names):
                for name, value in zip(names, rows[0]):
                    if value is None:
                        self.settings.pop(name, None)
                    else:
                        self.settings[name] = value.decode("utf-8", "replace")
                server.settings = dict(self.settings)
                self.relay.scope = self.settings.get("search_path", "")
            else:
                server.tainted = True
        if track_lsn and rows and len(rows[-1]) == 3 and None not in rows[-1]:
            insert, flush, synchronous_commit = (v.decode("ascii", "replace") for v in rows[-1])
            if self._async_commit:
                synchronous_commit = "off"  # (the session's value is back; the commit had its own)
            try:
                self.min_lsn = max(self.min_lsn, write_lsn(parse_lsn(insert), parse_lsn(flush), synchronous_commit))
            except ValueError:
                pass
        if self.state is CLOSED:
            self.server = None
            server.pool.release(server, reusable=True, reset=False)
            return
        self._give_back(server, linked=False)

    def _give_back(self, server, linked: bool = True) -> None:
        self._holding = False
        self._read_link = False
        if linked:
            server.unlink()
        self.server = None
        self.state = IDLE
        server.pool.release(server, reusable=True, reset=False)
        self._resume()
        if self.backlog:  # the client moved on while its settings were read back
            self._acquire()

    def _owes_nothing(self) -> bool:
        """The linked server owes this client no answer and is not mid-conversation with it."""
        scanner = self.scanner
        if self.relay is not None:
            in_flight = not self.relay.idle
        else:
            in_flight = scanner.watched != self.ready_count
        # (Not the last message only: after Close, CopyDone a server skipping to Sync is deaf.)
        return not in_flight and scanner.at_boundary and not scanner.unsynced

    def asked_before(self, deadline: float) -> bool:
        """Linked to a node that has owed this client an answer since before *deadline* (query_timeout)."""
        asked = self._asked_at
        return asked is not None and asked < deadline and self.state is LINKED and self.server is not None

    def at_rest(self) -> bool:
        """No transaction open and no answer owed: the client can be closed without loss (drain)."""
        state = self.state
        if state is LOGIN or state is IDLE or state is WAITING or state is ADMIN:
            # (Waiting: its work has not started anywhere yet; login: it has no session yet.)
            return True
        if state is not LINKED:
            return False  # preparing: a server is being set up for work the client sent
        if self.relay is not None:
            # Transaction pooling: linked means inside a transaction or batch, unless pinned or
            # merely keeping its connection between transactions (lent).
            return bool(self.pinned or self._lent) and self.relay.idle and self.relay.tx_status == p.TX_IDLE
        return self.tx_status == p.TX_IDLE and self._owes_nothing()

    def _release_server(self) -> None:
        """The client is gone (or failed): return its server connection, or close it if the node is still busy for it."""
        server, self.server = self.server, None
        self._lent = False
        if server is None:
            return
        reusable = self._owes_nothing()
        if server.state == "linked":
            server.unlink()
        if not reusable:
            # The node is still working for a client who left: stop that work, then drop the connection.
            self.proxy.cancel_server(server)
        server.pool.release(server, reusable=reusable, reset=not self.transaction_mode or bool(self.pinned))

    # -- timers -------------------------------------------------------------------------------

    def _cancel_idle_tx_timer(self) -> None:
        timer, self._idle_tx_timer = self._idle_tx_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _idle_tx_timed_out(self) -> None:
        self._idle_tx_timer = None
        if self.state is LINKED and self.tx_status != p.TX_IDLE:
            self.fatal("25P03", "terminating connection due to idle-in-transaction timeout")

    # -- ending --------------------------------------------------------------------------

    def _crashed(self, failure) -> None:
        """A bug of ours in a callback: log it, tell the client plainly, keep serving everyone else."""
        log.failure("client {client}: internal error", failure, client=self.id)
        if self.state is not CLOSED:
            self.fatal(sqlstate.INTERNAL_ERROR, "internal error in pgtwist; the proxy log has the details")

    def _close_silently(self, why: str) -> None:
        """Bytes that are not the protocol (a first packet of impossible length): as PostgreSQL,
        log it and close without a word, for the sender would not read one."""
        log.info("client {client} closed without a reply: {why}", client=self.id, why=why)
        self.state = CLOSED
        self._cancel_login_timer()
        self.transport.loseConnection()

    def fatal(self, code: str, message: str, detail: str | None = None) -> None:
        self.fatal_fields(m.error_fields("FATAL", code, message, detail))

    def fatal_fields(self, fields: dict[str, str]) -> None:
        if self.state is CLOSED and self.transport.disconnecting:
            return
        log.info(
            "client {client} closed: {code} {message}", client=self.id, code=fields.get("C"), message=fields.get("M")
        )
        self.proxy.counters.error(fields.get("C"))
        if self.server is not None and self.state is LINKED:
            self._release_server()
        # (While PREPARING, _prepared() returns the server once its internal query ends.)
        self.state = CLOSED
        self._cancel_idle_tx_timer()
        self.transport.write(m.error_response_from_fields(fields))
        self.transport.loseConnection()

