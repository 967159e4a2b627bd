"""One client's state machine: login, waiting for a server, linked (forwarding), closed."""

from __future__ import annotations

from twisted.logger import Logger

from pgtwist.login import Authenticated, CancelReceived, ClientLogin, LoginError, Reply
from pgtwist.pool import PoolError
from pgtwist.server_login import ServerLoginError
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import WireError
from pgtwist.wire.framing import MessageScanner

log = Logger()

LOGIN, WAITING, PREPARING, LINKED, CLOSED = "login", "waiting", "preparing", "linked", "closed"

_TERMINATE = p.TERMINATE
_CLIENT_CAPTURE = frozenset((_TERMINATE,))
# Each Query, Sync and FunctionCall earns exactly one ReadyForQuery: counting them tells
# whether the server still owes the client an answer when the client goes away.
_CLIENT_WATCH = frozenset((p.QUERY, p.SYNC, p.FUNCTION_CALL))
# An extended-protocol batch not yet closed by Sync leaves the server mid-conversation.
_UNSYNCED = frozenset((p.PARSE, p.BIND, p.EXECUTE, p.DESCRIBE, p.CLOSE, p.FLUSH))
# Startup parameters that are not session settings.
_NOT_SETTINGS = frozenset(("user", "database", "replication", "options"))


def quote_literal(value: str) -> str:
    """An E'' literal safe whatever standard_conforming_strings says (startup values never reach SQL raw)."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def parse_options(options: str) -> dict[str, str]:
    """The 'options' startup parameter: '-c name=value' and '--name=value', backslash-escaped spaces."""
    words, word, escaped = [], [], False
    for ch in options:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
    if word:
        words.append("".join(word))
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            setting, i = words[i + 1], i + 2
        elif w.startswith("--"):
            setting, i = w[2:], i + 1
        elif w.startswith("-c"):
            setting, i = w[2:], i + 1
        else:
            raise LoginError(sqlstate.FEATURE_NOT_SUPPORTED, f'unsupported startup option "{w}"', "pgtwist accepts only -c name=value")
        name, eq, value = setting.partition("=")
        if not eq or not name:
            raise LoginError(sqlstate.PROTOCOL_VIOLATION, f'invalid option "{setting}": expected name=value')
        out[name.replace("-", "_")] = value
    return out


def client_settings(parameters: dict[str, str]) -> dict[str, str]:
    """Session settings a client asked for at startup, as name -> value."""
    settings = {k: v for k, v in parameters.items() if k not in _NOT_SETTINGS}
    if parameters.get("options"):
        settings.update(parse_options(parameters["options"]))
    return settings


def settings_query(wanted: dict[str, str], current: dict[str, str]) -> str | None:
    """One statement applying the client's settings that differ from what the server reports.

    set_config() takes the value as a startup packet would (a list for search_path,
    not one quoted name), and quoting keeps the names and values data, never SQL.
    """
    calls = [
        f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"
        for name, value in wanted.items()
        if current.get(name) != value
    ]
    return "SELECT " + ", ".join(calls) if calls else None


class ClientSession:
    """Everything one client connection does; FrontendProtocol feeds it bytes."""

    def __init__(self, proxy, transport, client_id: str):
        self.proxy = proxy
        self.transport = transport
        self.id = client_id
        self.state = LOGIN
        config = proxy.config
        self.login = ClientLogin(config.auth_type, proxy.lookup_user, proxy.mock_secret)
        self.startup: m.StartupMessage | None = None
        self.database = None
        self.user = None
        self.pool = None
        self.server = None
        self.scanner: MessageScanner | None = None
        self.ready_count = 0
        self.tx_status = p.TX_IDLE
        self.process_id = 0
        self.secret_key = b""
        self.pending = bytearray()
        self.connected_at = proxy.clock.seconds()
        self._waiting = None
        self._login_timer = (
            proxy.clock.callLater(config.client_login_timeout, self._login_timed_out) if config.client_login_timeout else None
        )

    def __repr__(self):
        return f"<ClientSession {self.id} {self.user}@{self.database} {self.state}>"

    # -- events from FrontendProtocol ---------------------------------------------------------

    def got_data(self, data: bytes) -> None:
        if self.state is LINKED:
            self._forward(data)
            return
        try:
            if self.state is LOGIN:
                self._login_data(data)
            elif self.state is WAITING or self.state is PREPARING:
                # Clients wait for ReadyForQuery; whatever comes early waits with them, and
                # we stop reading so that it cannot grow.
                self.pending += data
                self.transport.pauseProducing()
        except (WireError, LoginError) as e:
            self.fatal(e.sqlstate, e.message if isinstance(e, LoginError) else str(e), getattr(e, "detail", None))
        except Exception:
            log.failure("client {client}: internal error", client=self.id)
            self.fatal(sqlstate.INTERNAL_ERROR, "internal error in pgtwist; the proxy log has the details")

    def connection_lost(self, reason) -> None:
        previous = self.state
        self.state = CLOSED
        self._cancel_login_timer()
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.cancel()
        if previous is LINKED and self.server is not None:
            self._release_server()
        self.proxy.client_closed(self)

    # -- login ---------------------------------------------------------------------------

    def _login_data(self, data: bytes) -> None:
        for event in self.login.feed(data):
            if isinstance(event, Reply):
                self.transport.write(event.data)
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
        database = self.proxy.config.databases.get(name)
        if database is None:
            raise LoginError(sqlstate.INVALID_CATALOG_NAME, f'database "{name}" does not exist')
        if not self.proxy.admit(self):
            raise LoginError(sqlstate.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
        self.database = database
        self.settings = client_settings(event.startup.parameters)
        if event.client_key is not None:
            self.proxy.remember_client_key(self.user, event.client_key)
        self.process_id, self.secret_key = self.proxy.register_cancel_key(self)
        self.pending += self.login.leftover()
        self.state = WAITING
        self.pool = self.proxy.pool_for(database, self.user)
        self._waiting = self.pool.acquire()
        self._waiting.addCallbacks(self._got_server, self._no_server).addErrback(self._crashed)

    def _cancel_login_timer(self) -> None:
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if self.state is LOGIN:
            # PostgreSQL closes silently when the startup packet never comes; after it, say why.
            if self.startup is None and self.login.startup is None:
                self.state = CLOSED
                self.transport.loseConnection()
            else:
                self.fatal(sqlstate.QUERY_CANCELED, "canceling authentication due to timeout")
        elif self.state is WAITING or self.state is PREPARING:
            pass  # the pool's wait timeout speaks for this phase

    # -- getting a server ----------------------------------------------------------------------

    def _no_server(self, failure) -> None:
        self._waiting = None
        if self.state is CLOSED:
            return
        e = failure.value
        if isinstance(e, PoolError):
            self.fatal(e.sqlstate, e.message, e.detail)
        elif isinstance(e, ServerLoginError):
            self.fatal_fields(e.fields)
        elif failure.check(Exception):
            if not isinstance(e, ServerLoginError):
                log.failure("client {client}: no server", failure, client=self.id)
            self.fatal(sqlstate.CONNECTION_FAILURE, f"could not get a server connection: {e}")

    def _got_server(self, server) -> None:
        self._waiting = None
        if self.state is CLOSED:
            self.pool.release(server, reusable=True)
            return
        self.server = server
        self.state = PREPARING
        query = settings_query(self.settings, server.parameters)
        if query is None:
            self._prepared([])
        else:
            server.run_internal([query]).addCallbacks(self._prepared, self._prepare_failed).addErrback(self._crashed)

    def _prepare_failed(self, failure) -> None:
        self.server = None
        if self.state is not CLOSED:
            self.fatal(sqlstate.CONNECTION_FAILURE, f"lost the connection to node {self.pool.node} while preparing the session")

    def _prepared(self, errors: list[dict]) -> None:
        server = self.server
        if self.state is CLOSED:
            self.server = None
            self.pool.release(server, reusable=True)
            return
        if errors:
            # As PostgreSQL does for a bad startup parameter: the login fails with the server's reason.
            self.server = None
            self.pool.release(server, reusable=True)
            self.fatal_fields(dict(errors[0], S="FATAL", V="FATAL"))
            return
        self._cancel_login_timer()
        params = b"".join(m.parameter_status(k, v) for k, v in server.parameters.items())
        self.transport.write(params + m.backend_key_data(self.process_id, self.secret_key) + m.ready_for_query())
        self.scanner = MessageScanner(_CLIENT_CAPTURE, self.proxy.config.max_message_size, _CLIENT_WATCH)
        self.ready_count = 0
        self.state = LINKED
        server.link(self, self.transport)
        self.transport.resumeProducing()
        if self.pending:
            data = bytes(self.pending)
            self.pending.clear()
            self._forward(data)

    # -- linked: the hot path -----------------------------------------------------------------

    def _forward(self, data: bytes) -> None:
        try:
            items = self.scanner.feed(data)
        except WireError as e:
            self.fatal(e.sqlstate, str(e))
            return
        if len(items) == 1 and type(items[0]) is bytes:
            self.server.transport.write(items[0])
            return
        out = []
        for item in items:
            if type(item) is bytes:
                out.append(item)
            else:  # Terminate: the client is leaving; its server connection is not.
                if out:
                    self.server.transport.write(b"".join(out))
                self.state = CLOSED
                self._release_server()
                self.transport.loseConnection()
                return
        if out:
            self.server.transport.write(b"".join(out))

    def server_ready(self, status: int, count: int) -> None:
        """The server sent *count* ReadyForQuery messages, the last with *status*."""
        self.ready_count += count
        self.tx_status = status

    def server_lost(self, server, reason) -> None:
        """The node closed our server connection while this client was linked to it."""
        if self.server is not server or self.state is CLOSED:
            return
        self.server = None
        if server.at_message_boundary:
            self.fatal(
                sqlstate.CONNECTION_FAILURE,
                f"lost the connection to node {server.node}",
                "The server connection closed unexpectedly; the session cannot continue.",
            )
        else:
            self.state = CLOSED
            self.transport.loseConnection()

    def _release_server(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        scanner = self.scanner
        owed = scanner.watched - self.ready_count
        reusable = owed == 0 and scanner.at_boundary and scanner.last_type not in _UNSYNCED
        if server.state == "linked":
            server.unlink()
        if not reusable:
            # The node is still working for a client who left: stop that work, then drop the connection.
            self.proxy.cancel_server(server)
        self.pool.release(server, reusable=reusable)

    def _crashed(self, failure) -> None:
        """A bug of ours in a callback: log it, tell the client plainly, keep serving everyone else."""
        log.failure("client {client}: internal error", failure, client=self.id)
        if self.state is not CLOSED:
            self.fatal(sqlstate.INTERNAL_ERROR, "internal error in pgtwist; the proxy log has the details")

    # -- ending --------------------------------------------------------------------------

    def fatal(self, code: str, message: str, detail: str | None = None) -> None:
        self.fatal_fields(m.error_fields("FATAL", code, message, detail))

    def fatal_fields(self, fields: dict[str, str]) -> None:
        if self.state is CLOSED and self.transport.disconnecting:
            return
        log.info(
            "client {client} closed: {code} {message}", client=self.id, code=fields.get("C"), message=fields.get("M")
        )
        if self.server is not None and self.state is LINKED:
            self._release_server()
        # (While PREPARING, _prepared() returns the server once its internal query ends.)
        self.state = CLOSED
        self.transport.write(m.error_response_from_fields(fields))
        self.transport.loseConnection()
