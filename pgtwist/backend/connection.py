"""One server connection to a node: login, idle in its pool, linked to a client, internal queries, reset."""

from __future__ import annotations

from struct import Struct
from typing import TYPE_CHECKING, Any, Final

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import classImplements
from twisted.logger import Logger

from pgtwist.transport.producers import attach_producer, detach_producer
from pgtwist.transport.sendnow import write_now
from pgtwist.backend.login import ServerLogin, ServerLoginError
from pgtwist.backend.states import CLOSED, CONNECTING, IDLE, INTERNAL, LINKED, LOGIN, TRANSITIONS, IllegalTransition
from pgtwist.pooling.statements import ServerStatements, internal_batch
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import WireError, error_fields
from pgtwist.wire.framing import MessageScanner, pop_message

if TYPE_CHECKING:
    from pgtwist.session.client import ClientSession

log = Logger(namespace=__name__)  # (named: compiled, the module has no frame Logger could read it from)

_Z: Final = p.READY_FOR_QUERY
_PARAMETER_STATUS: Final = p.PARAMETER_STATUS
# What a linked server connection looks inside: ReadyForQuery (transaction status) and
# ParameterStatus (the session's reported settings). Everything else is forwarded untouched.
_LINKED_CAPTURE: Final = frozenset((_Z, _PARAMETER_STATUS))
# What a node may send outside any answer: a notice, a setting, the FATAL of a shutdown. (An
# immediate shutdown sends every backend's client a WARNING, then the connection drops.)
_NOT_AN_ANSWER: Final = frozenset((p.NOTICE_RESPONSE, _PARAMETER_STATUS))
_INTERNAL_READS: Final = frozenset((_PARAMETER_STATUS, p.ERROR_RESPONSE, p.DATA_ROW, _Z))  # (what _internal_message reads)
_INT32: Final = Struct("!I")


def _starts_answer(data: bytes) -> bool:
    """Whether the first bytes a linked node sent hold more than whole notices, ParameterStatus or a FATAL."""
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < 5:
            return True
        msg_type = data[pos]
        end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        if end > n:
            return True
        if msg_type == p.ERROR_RESPONSE:
            fields = m.decode_fields(data[pos + 5 : end])
            if fields.get("V", fields.get("S")) not in ("FATAL", "PANIC"):
                return True
        elif msg_type not in _NOT_AN_ANSWER:
            return True
        pos = end
    return False


class Throttle:
    """One side's transport as the other side's producer: pause and resume, but never stop.

    Registering a transport itself would let Twisted stop it (close it!) when the other
    side's connection ends; whether a client outlives its server connection is the
    session's decision.
    """

    __slots__ = ("transport", "paused")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.paused: bool = False

    def pauseProducing(self):
        self.paused = True
        if self.transport is not None:  # (None: between links)
            self.transport.pauseProducing()

    def resumeProducing(self):
        self.paused = False
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self):
        pass


# (Declared after the class, not by @implementer: mypyc compiles a decorated class as a plain
# Python class, whose `paused` the handoff then reads and writes through generic lookups.)
classImplements(Throttle, IPushProducer)


class ServerConnection:
    """State machine of one pooled connection; BackendProtocol feeds it, the pool and sessions drive it."""

    def __init__(self, server_id: str, pool, login: ServerLogin):
        self.id = server_id
        self.pool = pool
        self.node = pool.node
        self.login = login
        self.state = CONNECTING  # (changed only by _enter)
        self.transport: Any = None
        self.parameters: dict[str, str] = {}
        # The node's role changed since this connection last spoke: PostgreSQL reports a changed
        # in_hot_standby only at a ReadyForQuery, so an idle connection's parameters may be old.
        self.parameters_stale = False
        self.backend_key: tuple[int, bytes] | None = None
        self.tx_status = p.TX_IDLE
        self.session: ClientSession | None = None  # the ClientSession while linked
        self.client_transport: Any = None
        self.scanner: MessageScanner | None = None
        self.buffer = bytearray()
        self.statements = ServerStatements(pool.max_prepared_statements)  # shared prepared statements held
        self.settings: dict[str, str] = {}  # settings applied beyond the session defaults (by us, for clients)
        self.tainted = False  # a client did something (e.g. DISCARD ALL) that leaves our records unsure
        self.canceling = 0  # CancelRequests sent to the node for this connection and not yet delivered
        self.internal_rows: list[list[bytes | None]] = []
        self.replied = False
        # The FATAL the node sent before hanging up (None: none, or not seen by us): why it ended,
        # which says whether the node or only this connection is in trouble (cluster/evidence.py).
        self.fatal: dict | None = None
        # Each side's transport as the other side's producer while linked (Throttle): made
        # once per connection and pointed at each new client, not allocated per link.
        self._server_throttle: Throttle = Throttle(None)  # (its transport: this connection's, once made)
        self._client_throttle: Throttle = Throttle(None)
        self._scanner: MessageScanner | None = None
        self.ready: defer.Deferred | None = defer.Deferred()  # fires self after login
        self._internal: defer.Deferred | None = None
        self._internal_owed = 0
        self._internal_timer: Any = None  # bounds the proxy's own statements (Pool.internal_timeout)
        self._timed_out: str | None = None  # why we aborted the connection, when it was that timer
        self._internal_errors: list[dict] = []
        self.created = pool.clock.seconds()
        self.last_used = self.created
        self.tls: Any = None  # tls.NodeTls when [server_tls] is on (set by the proxy)
        self.keepalive: Any = None  # backend.Keepalive when tcp_keepalive is on (set by the proxy)
        self.tls_step: Any = None  # "answer" (SSLRequest sent), then the tls.NodeHandshake, until TLS is up
        # counters.DatabaseStats of the pool's database (set by the proxy): bytes relayed to clients, one add per read.
        self.byte_stats: Any = None

    def __repr__(self):
        return f"<ServerConnection {self.id} {self.node} {self.state}>"

    # -- its state: one owner, one function -------------------------------------------------

    def _enter(self, state: str) -> None:
        """Move to *state*; a move TRANSITIONS does not list raises (once per login, link or reset: never per message)."""
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"server {self.id}: {self.state} -> {state}")
        self.state = state

    @property
    def linked(self) -> bool:
        return self.state is LINKED

    def taint(self, why: str) -> None:
        """Our records of this session are unsure now (*why*): it closes when released, never reused."""
        if not self.tainted:
            log.debug("server {server} tainted: {why}", server=self.id, why=why)
        self.tainted = True

    # What the proxy set on this session for clients (beyond the login's defaults): compared
    # with the next client's settings to sync only the difference.
    def settings_synced(self, settings: dict[str, str]) -> None:
        """The session now holds exactly *settings* (a sync ran, or was read back)."""
        if self.settings != settings:
            self.settings = dict(settings)

    def setting_reported(self, key: str, value: str) -> None:
        """The client changed a reported setting itself (ParameterStatus)."""
        self.settings[key] = value

    def forget_settings(self) -> None:
        """What the session holds is unknown (a failed sync) or back to the login's (a reset)."""
        self.settings = {}

    def was_reset(self, statements_dropped: bool) -> None:
        """The pool's reset_query ran: settings are the login's again, and prepared statements gone if it said ALL."""
        self.settings = {}
        if statements_dropped:
            self.statements.clear()

    # -- events from BackendProtocol ------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._server_throttle.transport = transport
        self._enter(LOGIN)
        if self.tls is not None:
            # [server_tls]: SSLRequest first; the StartupMessage (and any password) waits for TLS.
            self.tls_step = "answer"
            transport.write(m.ssl_request())
            return
        transport.write(self.login.start())

    def got_data(self, data: bytes) -> None:
        if self.state is LINKED:
            if self.byte_stats is not None:
                self.byte_stats.sent += len(data)
            self._forward(data)
            return
        if self.tls_step is not None:
            self._tls_answer(data)
            return
        try:
            if self.state is INTERNAL and not self.buffer:
                data = self._internal_read(data)
                if self.state is LINKED:
                    if data:
                        self._forward(data)  # (behind the last internal ReadyForQuery: the client's)
                    return
            self.buffer += data
            # One message at a time: once linked, what is still in the buffer is the client's.
            while (msg := pop_message(self.buffer, p.MAX_PROTOCOL_MESSAGE)) is not None:
                msg_type, body = msg
                if self.state is LOGIN:
                    self._login_message(msg_type, body)
                elif self.state is INTERNAL:
                    self._internal_message(msg_type, body)
                elif self.state is IDLE:
                    self._idle_message(msg_type, body)
                if self.state is LINKED or self.state is CLOSED:
                    break
        except ServerLoginError as e:
            self._fail_login(e)
        except WireError as e:
            log.warn("server {server} {node} sent bad bytes: {why}", server=self.id, node=self.node, why=str(e))
            self._fail_login(ServerLoginError(sqlstate.PROTOCOL_VIOLATION, f"node {self.node} sent an invalid message: {e}"))
            self.close()
        if self.state is LINKED and self.buffer:
            # Bytes that arrived behind the last internal ReadyForQuery belong to the client.
            rest = bytes(self.buffer)
            self.buffer.clear()
            self._forward(rest)

    def connect_failed(self, error: ServerLoginError) -> None:
        self._enter(CLOSED)
        self._fail_login(error)

    def login_timed_out(self) -> None:
        if self.ready is not None:
            self._fail_login(
                ServerLoginError(sqlstate.CONNECTION_FAILURE, f"timed out connecting to node {self.node}")
            )
            if self.transport is not None:
                self.transport.abortConnection()

    def connection_lost(self, reason) -> None:
        previous = self.state
        self._enter(CLOSED)
        if (previous is LOGIN or previous is CONNECTING) and self.tls_step not in (None, "answer") and self.ready is not None:
            error = self.tls_step.error(reason, str(self.node))
            log.warn("server {server}: {why}", server=self.id, why=error.fields.get("M"))
            self._fail_login(error)
        if previous is LOGIN or previous is CONNECTING:
            self._fail_login(
                ServerLoginError(sqlstate.CONNECTION_FAILURE, f"node {self.node} closed the connection during login")
            )
        self._stop_internal_timer()
        if self._internal is not None:
            d, self._internal = self._internal, None
            d.errback(ConnectionError(self._timed_out or f"node {self.node} closed the connection"))
        session = self.session
        if session is not None:
            self._unlink_transports()
            self.session = None
            session.server_lost(self, reason)
        self.pool.server_closed(self)

    # -- TLS to the node ----------------------------------------------------------------

    def _tls_answer(self, data: bytes) -> None:
        """The node's one-byte answer to our SSLRequest (the handshake itself is the TLS layer's)."""
        if self.tls_step != "answer":
            return  # (bytes come through the TLS layer only once the handshake is done)
        try:
            start = self.tls.answer(data, str(self.node))
        except ServerLoginError as e:
            log.warn("server {server}: {why}", server=self.id, why=e.fields.get("M"))
            self._fail_login(e)
            return
        if start:
            self.tls_step = self.tls.handshake(self.node.host)
            self.transport.startTLS(self.tls_step)
        else:
            self.tls_step = None  # mode "prefer" and a node without TLS: plaintext
            self.transport.write(self.login.start())

    def tls_established(self) -> None:
        """The handshake with the node finished and verified it (BackendProtocol.handshakeCompleted)."""
        if self.tls_step is not None and self.state is LOGIN:
            self.tls_step = None
            self.transport.write(self.login.start())

    # -- login --------------------------------------------------------------------------

    def _login_message(self, msg_type: int, body: bytes) -> None:
        reply = self.login.feed(msg_type, body)
        if reply:
            self.transport.write(reply)
        if self.login.done:
            self.parameters = dict(self.login.parameters)
            self.backend_key = self.login.backend_key
            self._enter(IDLE)
            d, self.ready = self.ready, None
            d.callback(self)

    def _fail_login(self, error: ServerLoginError) -> None:
        if self.ready is not None:
            d, self.ready = self.ready, None
            d.errback(error)
            if self.transport is not None:
                self.transport.loseConnection()

    # -- idle in the pool ---------------------------------------------------------------

    def _idle_message(self, msg_type: int, body: bytes) -> None:
        if msg_type == _PARAMETER_STATUS:
            name, value = m.decode_parameter_status(body)
            self.parameters[name] = value
        elif msg_type in (p.NOTICE_RESPONSE, p.NOTIFICATION_RESPONSE):
            pass
        else:
            # An idle connection has nothing to say; an ErrorResponse here is the node
            # terminating it (e.g. pg_terminate_backend, shutdown). Drop it.
            fields = m.decode_fields(body) if msg_type == p.ERROR_RESPONSE else {}
            if fields:
                self.fatal = fields
            log.info(
                "server {server} {node} closed while idle: {why}",
                server=self.id,
                node=self.node,
                why=fields.get("M", f"unexpected message {chr(msg_type)!r}"),
            )
            self.close()

    # -- internal queries (parameters before linking, reset after) ------------------------

    def run_internal(self, queries: list[str]) -> defer.Deferred:
        """Run simple queries whose results nobody sees; fires with the ErrorResponse fields of failures.

        For the pool, once the client is gone (ROLLBACK, server_reset_query): a simple Query
        drops the unnamed statement and portal, which then belong to nobody. On a client's
        behalf, run_for_client.
        """
        return self._run(b"".join(m.query(q) for q in queries), len(queries))

    def run_for_client(self, batches: list[list[str]]) -> defer.Deferred:
        """Run the proxy's own statements on the connection a client uses, as run_internal does,
        but leaving that client's unnamed statement and portal as they are (internal_batch).

        Each batch is one implicit transaction, as one multi-statement Query would be.
        """
        return self._run(b"".join(internal_batch(b) for b in batches), len(batches))

    def run_prepared(self, data: bytes, owed: int) -> defer.Deferred:
        """Run messages the proxy built itself (auth_query's Query + Parse/Bind/Execute/Sync) that
        end in *owed* ReadyForQuery; fires with the errors, the rows in ``internal_rows``."""
        return self._run(data, owed)

    def _run(self, data: bytes, owed: int) -> defer.Deferred:
        self._enter(INTERNAL)
        self._internal = defer.Deferred()
        self._internal_owed = owed
        self._internal_errors = []
        self.internal_rows = []
        timeout = self.pool.internal_timeout
        if timeout:
            # One timer per batch of our own statements (never per forwarded client message): a
            # node that stops answering must not keep this connection, and whoever waits on it.
            self._internal_timer = self.pool.clock.callLater(timeout, self._internal_timed_out, timeout)
        # (At once, as a client's bytes go: after every writing transaction in a cluster this
        # is the read-your-writes WAL position, and a queued write costs two epoll calls.)
        write_now(self.transport, data)
        return self._internal

    def _internal_timed_out(self, timeout: float) -> None:
        """The node owes an answer to our own statements for *timeout* s: give the connection up.

        Aborted (a hung node would never take part in a clean close), and ended as a connection to
        the node that failed, 08006, the code pgtwist gives a login that timed out: whoever waits
        hears of it through connection_lost, as for a node hanging up, and the node's health
        follows that same evidence (cluster/evidence.py).
        """
        self._internal_timer = None
        if self.state is not INTERNAL:
            return
        self._timed_out = f"node {self.node} did not answer pgtwist's own statements within {timeout:g} s"
        log.warn("server {server}: {why}, closing it", server=self.id, why=self._timed_out)
        self.fatal = error_fields("FATAL", sqlstate.CONNECTION_FAILURE, self._timed_out)
        if self.transport is not None:
            self.transport.abortConnection()

    def _stop_internal_timer(self) -> None:
        timer, self._internal_timer = self._internal_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _internal_read(self, data: bytes) -> bytes:
        """The answer to our own statements, read where it lies: only the messages that
        _internal_message looks at are sliced out (of the nine a read-your-writes position
        brings back, two). Returns what it did not take: a message not all here, or whatever
        follows the ReadyForQuery that ended the batch (the state has changed then)."""
        pos, end_of_data = 0, len(data)
        unpack = _INT32.unpack_from
        while end_of_data - pos >= 5:
            (length,) = unpack(data, pos + 1)
            end = pos + 1 + length
            if length < 4 or end > end_of_data:
                break  # (not all here, or not valid: pop_message judges it with the rest)
            msg_type = data[pos]
            if msg_type in _INTERNAL_READS:
                self._internal_message(msg_type, data[pos + 5 : end])
                if self.state is not INTERNAL:
                    return data[end:]
            pos = end
        return data[pos:]

    def _internal_message(self, msg_type: int, body: bytes) -> None:
        if msg_type == _PARAMETER_STATUS:
            name, value = m.decode_parameter_status(body)
            self.parameters[name] = value
        elif msg_type == p.ERROR_RESPONSE:
            fields = m.decode_fields(body)
            if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                self.fatal = fields
            self._internal_errors.append(fields)
        elif msg_type == p.DATA_ROW:
            self.internal_rows.append(m.decode_data_row(body))
        elif msg_type == _Z:
            self.tx_status = body[0] if body else p.TX_IDLE
            self.parameters_stale = False  # (what changed was reported before this ReadyForQuery)
            self._internal_owed -= 1
            if self._internal_owed == 0:
                self._stop_internal_timer()
                self._enter(IDLE)
                d, self._internal = self._internal, None
                d.callback(self._internal_errors)

    # -- linked to a client: the hot path ---------------------------------------------------

    def link(self, session, client_transport, capture: frozenset[int] | None = None) -> None:
        """Forward this connection's output to *client_transport*, with backpressure both ways."""
        self._enter(LINKED)
        self.session = session
        self.client_transport = client_transport
        scanner = self._scanner
        if scanner is None:
            scanner = self._scanner = MessageScanner(_LINKED_CAPTURE, p.MAX_PROTOCOL_MESSAGE)
        # One scanner per connection, reused: a link only ever ends at a message boundary.
        scanner.capture = capture or _LINKED_CAPTURE
        self.scanner = scanner
        self.replied = False
        # Each side's transport produces for the other's: a client that stops reading
        # pauses reads from the node instead of letting the proxy buffer a result set.
        self._client_throttle.transport = client_transport
        attach_producer(client_transport, self._server_throttle)
        attach_producer(self.transport, self._client_throttle)

    def relink(self, session, client_transport, capture: frozenset[int] | None = None) -> None:
        """Pass this linked connection from its client's session to *session* in place: what
        unlink() then link() would do, without the steps that cancel out. The connection stays
        linked (so no state moves), its scanner stays, and the node's side keeps its producer
        registered, which now throttles the new client. Transaction pooling's handoff while
        clients wait (Pool.hand_over): once per transaction there, so as few calls as it takes."""
        if self.state is not LINKED:
            raise IllegalTransition(f"server {self.id}: {self.state} -> relinked (only a linked connection passes on)")
        old = self.client_transport
        server_throttle, client_throttle = self._server_throttle, self._client_throttle
        if old is not None:
            if old.connected:
                detach_producer(old)
            if client_throttle.paused:  # (the old client must not stay paused after the link)
                client_throttle.paused = False
                old.resumeProducing()
        if server_throttle.paused:
            server_throttle.paused = False
            self.transport.resumeProducing()
        self.session = session
        self.client_transport = client_transport
        self.scanner.capture = capture or _LINKED_CAPTURE
        self.replied = False
        client_throttle.transport = client_transport
        attach_producer(client_transport, server_throttle)

    def unlink(self) -> None:
        self._enter(IDLE)  # (first: only a linked connection unlinks)
        self._unlink_transports()
        self.session = None
        self.scanner = None
        self.last_used = self.pool.clock.seconds()

    def _unlink_transports(self) -> None:
        client = self.client_transport
        self.client_transport = None
        if client is not None:
            # (A transport already disconnected has dropped its producer; a TLS one would raise.)
            if client.connected:
                detach_producer(client)
            server_throttle, client_throttle = self._server_throttle, self._client_throttle
            client_throttle.transport = None
            if self.transport is not None:
                if self.transport.connected:
                    detach_producer(self.transport)
                if server_throttle.paused:  # a paused side must not stay so after the link
                    server_throttle.paused = False
                    self.transport.resumeProducing()
            if client_throttle.paused:
                client_throttle.paused = False
                client.resumeProducing()

    @property
    def at_message_boundary(self) -> bool:
        return self.scanner is None or self.scanner.at_boundary

    def _forward(self, data: bytes) -> None:
        status = self.scanner.whole_reply(data)
        if status >= 0:
            # A whole answer ending with its ReadyForQuery, in this one read: the commonest case.
            self.replied = True
            self.session.reply_done(self, status, data)
            return
        if not self.replied:
            # A byte of an answer for the client exists: its work can no longer be replayed.
            self.replied = _starts_answer(data)
        try:
            items = self.scanner.feed(data)
        except WireError as e:
            log.warn("server {server} {node} sent bad bytes: {why}", server=self.id, node=self.node, why=str(e))
            self.close()
            return
        if len(items) == 1 and type(items[0]) is bytes:
            write_now(self.client_transport, items[0])
            return
        # ReadyForQuery, ParameterStatus (and, for a shared connection, the replies it
        # tracks): the session decides what the client sees.
        self.session.server_items(self, items, data)

    # -- closing ------------------------------------------------------------------------

    def abandon(self) -> None:
        """Drop this connection now, without a word to the node (it may be hung) or to its client:
        the session that gave it up has already moved on. (Its scanner stays: the session may
        still ask whether the client's stream stopped at a message boundary.)"""
        if self.session is not None:
            self._unlink_transports()
            self.session = None
        self._enter(CLOSED)
        if self.transport is not None:
            self.transport.abortConnection()

    def close(self) -> None:
        if self.transport is not None and self.state is not CLOSED:
            if self.state is IDLE:
                self.transport.write(m.terminate())
            self.transport.loseConnection()
