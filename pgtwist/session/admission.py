"""A client's login, from its startup packet to its first ReadyForQuery (or the admin console): the ClientSession's first state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from types import MappingProxyType

from twisted.logger import Logger

from pgtwist.config import ADMIN_DATABASES
from pgtwist.frontend.login import Authenticated, ClientLogin, CancelReceived, LoginError, LookupUser, Reply, StartTLS
from pgtwist.pooling.relay import CLIENT_CAPTURE, Relay
from pgtwist.pooling.settings import client_settings
from pgtwist.session.states import ADMIN, CLOSED, IDLE, LOGIN
from pgtwist.transport import tls
from pgtwist.transport.sendnow import write_now
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import WireError
from pgtwist.wire.framing import MessageScanner

log = Logger(namespace=__name__)  # (named: compiled, the module has no frame Logger could read it from)

# What an audited user's scanner captures besides: the texts proxy.audit_statement logs.
_AUDITED: Final = frozenset((p.QUERY, p.PARSE))
SESSION_CAPTURE: Final = frozenset((p.TERMINATE,))
# Each Query, Sync and FunctionCall earns exactly one ReadyForQuery: counting them tells
# whether the server still owes the client an answer when the client goes away.
SESSION_WATCH: Final = frozenset((p.QUERY, p.SYNC, p.FUNCTION_CALL))

_READY_IDLE: Final = m.ready_for_query()
# Logins with the same ParameterStatus set (nearly all of them, in a pool) send the same bytes:
# encoded once, not per login. Bounded: a set that varies (application_name...) is re-encoded.
_ENCODED_PARAMETERS: dict[tuple, bytes] = {}
_ENCODED_PARAMETERS_LIMIT = 256
# What a login derives from its startup parameters: its settings (read-only: what RESET returns
# to) and the key under which its pool remembers the ParameterStatus set a login like it was
# told (_known_login). A pool's startup packet is decoded once (frontend/login.py), so logins
# share StartupMessage objects: derived once per message, kept with it (so its id is not
# reused while the entry lives), bounded as that cache is. A packet whose options are refused
# (LoginError) is refused anew each time.
_DERIVED: dict[int, tuple[m.StartupMessage, MappingProxyType, tuple]] = {}
_DERIVED_LIMIT = 256


def _derived(startup: m.StartupMessage) -> tuple[m.StartupMessage, MappingProxyType, tuple]:
    entry = _DERIVED.get(id(startup))
    if entry is None or entry[0] is not startup:
        settings = client_settings(startup.parameters)
        if len(_DERIVED) >= _DERIVED_LIMIT:
            _DERIVED.clear()
        entry = _DERIVED[id(startup)] = (startup, MappingProxyType(settings), tuple(sorted(settings.items())))
    return entry


def _encoded_parameters(parameters: dict[str, str]) -> bytes:
    key = tuple(parameters.items())
    data = _ENCODED_PARAMETERS.get(key)
    if data is None:
        data = b"".join(m.parameter_status(k, v) for k, v in key)
        if len(_ENCODED_PARAMETERS) >= _ENCODED_PARAMETERS_LIMIT:
            _ENCODED_PARAMETERS.clear()
        _ENCODED_PARAMETERS[key] = data
    return data



class Admission:
    """ClientSession's login (a mixin: the session's fields are ClientSession's slots). It ends in
    _logged_in (the ParameterStatus set, BackendKeyData, ReadyForQuery), the admin console, or a
    FATAL; relaying begins in client.py."""

    __slots__ = ()
    # The session's fields this mixin sets, declared here for mypyc, which compiles both classes
    # (pgtwist/compiled.py) and types an attribute where it is first set.
    login: ClientLogin | None
    startup: m.StartupMessage | None
    user: str | None
    scanner: MessageScanner | None
    relay: Relay | None
    _startup_settings: Mapping[str, str]
    database: Any  # config.Database once known
    settings: dict[str, str]
    router: Any  # routing.router.DatabaseRouter
    console: Any  # admin.console.AdminConsole on the admin database


    def tls_established(self) -> None:
        """The client's TLS handshake finished (FrontendProtocol.handshakeCompleted)."""
        if self.state is not LOGIN:
            return
        try:
            self._login_events(self.login.tls_started(**tls.client_handshake_info(self.transport)))
        except (WireError, LoginError) as e:
            self._refuse(e)

    def _login_data(self, data: bytes) -> None:
        self._login_events(self.login.feed(data))

    def _login_events(self, events: list) -> None:
        # The login's replies leave at once (write_now: no epoll round), those of one read in one
        # send: AuthenticationOk (after SCRAM's final message) goes out with the ParameterStatus
        # set, BackendKeyData and ReadyForQuery when pgtwist knows them (_authenticated). Each
        # send on loopback costs the receiver's side of TCP too, in this process's CPU time.
        said = b""
        for event in events:
            if isinstance(event, Reply):
                said += event.data
                continue
            if isinstance(event, Authenticated):
                self._authenticated(event, said)
                said = b""
                continue
            if said:
                write_now(self.transport, said)
                said = b""
            if isinstance(event, StartTLS):
                tls.start_tls(self.transport, self.proxy.client_tls, event.initial)
            elif isinstance(event, CancelReceived):
                self._enter(CLOSED)
                # Closed once the cancel has reached the node (or could not), as PostgreSQL does.
                self.proxy.cancel(event.process_id, event.secret_key, self.transport.loseConnection)
                return
            elif isinstance(event, LookupUser):
                d = self.proxy.fetch_user(event.user, event.database)
                d.addCallbacks(self._user_looked_up, self._user_lookup_failed)
        if said:
            write_now(self.transport, said)

    def _user_looked_up(self, credential) -> None:
        """auth_query answered: the login goes on (or fails as it would for an unknown user)."""
        if self.state is not LOGIN or self.login is None:
            return  # the client left (or timed out) meanwhile
        try:
            self._login_events(self.login.user_found(credential))
        except Exception as e:
            self._refuse(e)

    def _user_lookup_failed(self, failure) -> None:
        if self.state is not LOGIN:
            return
        log.warn("client {client}: auth_query failed: {why}", client=self.id, why=failure.getErrorMessage())
        # The node could not be asked (down, auth_user refused, a broken query): the client cannot
        # be checked. Never the node's own SQLSTATE: a 28P01 for auth_user would read as the client's.
        self.fatal(sqlstate.CONNECTION_FAILURE, "could not look up the user's password (auth_query failed)", "the proxy log says why")

    def _authenticated(self, event: Authenticated, said: bytes = b"") -> None:
        """The client proved who it is; *said* is what the login has yet to send (AuthenticationOk)."""
        self.startup = event.startup
        self.user = event.startup.user
        try:
            if event.startup.database in ADMIN_DATABASES:
                self._admin_console(said)
                return
            known = self._set_up(event)
        except BaseException:
            if said and self.state is LOGIN:
                write_now(self.transport, said)  # (then the error, as PostgreSQL orders them)
            raise
        if known is not None:
            self._logged_in(known, said)
            self._enter(IDLE)
            if self.backlog:
                self.placement.place()
        else:
            if said:
                write_now(self.transport, said)
            # A server connection tells us what to report (and proves the node is there).
            self.placement.place()

    def _set_up(self, event: Authenticated) -> dict[str, str] | None:
        """The session's database, settings, scanner and router; the ParameterStatus set if known."""
        name = event.startup.database
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
        # pool_mode per database and per user: known only now (until now, the global one).
        self.transaction_mode = self.config.pool_mode_for(name, self.user) == "transaction"
        _, startup_settings, login_key = _derived(event.startup)
        self.settings = dict(startup_settings)
        self._startup_settings = startup_settings
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
            self.scanner = MessageScanner(SESSION_CAPTURE, self.config.max_message_size, SESSION_WATCH, frontend=True)
        if self.user in self.config.audit:
            self.audit = True
            self.scanner.capture = self.scanner.capture | _AUDITED
        self.router = self.proxy.router_for(database)
        user = self.config.users.get(self.user)
        self.user_route = user.route if user is not None else "auto"
        leftover = self.login.leftover()
        if leftover:
            self.backlog.extend(self.scanner.feed(leftover))
        return self._known_login(login_key) if self.transaction_mode else None

    def _admit(self, startup: m.StartupMessage) -> bool:
        """Whether there is room for this client (asked as soon as its startup packet is read).

        The admin console is never refused: an operator must get in while the proxy is full.
        """
        return startup.database in ADMIN_DATABASES or self.proxy.admit(self)

    def _admin_console(self, said: bytes = b"") -> None:
        """dbname "pgbalance": the admin console answers instead of a node ([admin] users only)."""
        self.console = self.proxy.admin_session(self)  # LoginError 42501 for anyone else
        self._stop_login_timeout()
        self._enter(ADMIN)
        self.logged_in = True
        self.process_id, self.secret_key = self.proxy.register_cancel_key(self)
        leftover = self.login.leftover()
        self.login = None
        self.transport.write(said + self.console.welcome(self.process_id, self.secret_key))
        if leftover:
            self.console.got_data(leftover)

    def _login_key(self) -> tuple:
        """What, besides the pool (database, user, node), shapes the ParameterStatus a login reports."""
        return tuple(sorted(self.settings.items()))

    def _known_login(self, login_key: tuple) -> dict[str, str] | None:
        """Transaction pooling: the ParameterStatus set an earlier login like this one was told.

        Only from the pool this login would use (same database, user and node: the primary
        now), so that no user is ever told another's session_authorization or is_superuser,
        and a failover (another primary) means a real login; the pool forgets what it knew
        when its node changes (see Pool.node_changed). *login_key*: _login_key() of the settings
        the client logs in with (derived once per startup message: _derived).
        """
        node = self.router.primary()
        if node is None:
            return None
        pool = self.proxy.pools.get((self.database.name, self.user, str(node)))
        return pool.login_parameters.get(login_key) if pool is not None else None

    def _logged_in(self, parameters: dict[str, str], said: bytes = b"") -> None:
        self._stop_login_timeout()
        self.logged_in = True
        self.login = None  # its buffers and exchange state are done with
        write_now(
            self.transport, said + _encoded_parameters(parameters) + m.backend_key_data(self.process_id, self.secret_key) + _READY_IDLE
        )

    def _stop_login_timeout(self) -> None:
        self.proxy.logging_in.pop(self.id, None)

    def login_timed_out(self) -> None:
        """client_login_timeout passed (Proxy.expire_logins, which has let go of this client)."""
        if self.state is LOGIN:
            # PostgreSQL closes silently when the startup packet never comes; after it, say why.
            if self.login.startup is None:
                self._enter(CLOSED)
                self.transport.loseConnection()
            else:
                self.fatal(sqlstate.QUERY_CANCELED, "canceling authentication due to timeout")
        # Waiting for a server connection at login: the pool's wait timeout speaks for that.
