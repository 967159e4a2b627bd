"""One client's state machine: login, relaying (session and transaction pooling), release, closing.

The login phase is its mixin Admission (admission.py). Its states and the legal moves between them are the table in states.py (every change goes
through ClientSession._enter); what belongs to one lending of a server connection is a Lease
(lease.py); getting a server connection for the work, and what losing one means, is its
collaborator Placement (placement.py), which changes the session only through its methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from twisted.logger import Logger
from twisted.python.failure import Failure

from pgtwist.transport.connect import is_local_peer
from pgtwist.routing import analysis, temporaries

from pgtwist.session import dropdb, standin
from pgtwist.session.admission import Admission

from pgtwist.transport import tls
from pgtwist.service import drain
from pgtwist.frontend.login import ClientLogin, LoginError
from pgtwist.session.placement import AWAIT_END, SESSION_SERVER_CAPTURE, UNPLACED, Placement
from pgtwist.session.placement import UNSYNCED as _UNSYNCED
from pgtwist.session.lease import Lease
from pgtwist.pooling.relay import HOT_RUN, SYNC
from pgtwist.routing.analysis import NO_EFFECTS, classify
from pgtwist.routing.router import Decision
from pgtwist.routing.policy import UNREPLAYED, parse_lsn, write_lsn
from pgtwist.pooling.settings import SERVER_OWNED, client_settings, parse_options, quote_literal, readback_sql, sync_sql
from pgtwist.session.states import ADMIN, CLOSED, IDLE, LINKED, LOGIN, NEXT, PREPARING, WAITING, IllegalTransition
from pgtwist.pooling.statements import split_bind, split_parse
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import WireError
from pgtwist.transport.sendnow import write_now
from pgtwist.wire.framing import frame

__all__ = ["ClientSession", "client_settings", "parse_options", "quote_literal"]

if TYPE_CHECKING:
    from pgtwist.backend.connection import ServerConnection
    from pgtwist.pooling.pool import Pool

log = Logger(namespace=__name__)  # (named: compiled, the module has no frame Logger could read it from)

_Z: Final = p.READY_FOR_QUERY
_TERMINATE: Final = p.TERMINATE
_TERMINATE_MESSAGE: Final = frame(p.TERMINATE)
_SYNC: Final = p.SYNC
_SYNC_FLUSH: Final = (p.SYNC, p.FLUSH)
_IDLE_READY: Final = m.ready_for_query(p.TX_IDLE)
_ENDS_WORK: Final = frozenset((p.QUERY, p.FUNCTION_CALL, p.SYNC, p.TERMINATE))  # (what ends one statement, or batch)
# Read-your-writes: what _watch_link/_watch_statement look at while a link on the primary has
# not been seen to write. _WATCH_FIRST: the statement the link was placed by is still to come
# (already classified); _WATCH_UNNAMED: the unnamed statement was parsed (and classified) on it.
_WATCH_ALL: Final = 1
_WATCH_FIRST: Final = 2
_WATCH_UNNAMED: Final = 4
_WATCHED: Final = frozenset((p.QUERY, p.PARSE, p.BIND, p.FUNCTION_CALL))
# ClientSession._tx_end: DDL went through the open transaction; it set a search_path of its own;
# some of that DDL other sessions can see (not only on its temporary relations: temporaries.py).
_DDL_SENT, _LOCAL_PATH, _SHARED_DDL = 1, 2, 4
# Read-your-writes: the client wrote, but where its write ends in the WAL could not be read back
# (the primary froze or died right after the commit): no replica is known to hold it, so its
# reads stay on the primary until a read-back there tells a position again (ClientSession.min_lsn).
POSITION_UNKNOWN = UNREPLAYED
# Read-your-writes: where the primary's WAL ends after this client's write committed.
_WRITE_LSN_SQL = (
    "SELECT pg_catalog.pg_current_wal_insert_lsn()::text, pg_catalog.pg_current_wal_flush_lsn()::text,"
    " pg_catalog.current_setting('synchronous_commit')"
)


def _has_refusal(items: list) -> bool:
    """Whether a server read holds a 55006 ErrorResponse (errors are rare: a loop over a few items)."""
    for item in items:
        if type(item) is tuple and item[0] == p.ERROR_RESPONSE and dropdb.IN_USE in item[1]:
            return True
    return False


def _binds_unnamed(body: bytes) -> bool:
    """A Bind body names the unnamed statement (an empty name after the portal's)."""
    start, end = m.bind_statement_span(body)
    return start == end and start > 0


def _is_prepared_run(items: list) -> bool:
    """*items* are Bind, [Describe portal,] Execute, Sync: a prepared statement run again."""
    n = len(items)
    if n != 3 and n != 4:
        return False
    first, last, execute = items[0], items[-1], items[-2]
    if type(first) is not tuple or first[0] != p.BIND or type(last) is not tuple or last[0] != p.SYNC:
        return False
    if type(execute) is not tuple or execute[0] != p.EXECUTE:
        return False
    if n == 4:
        describe = items[1]
        return type(describe) is tuple and describe[0] == p.DESCRIBE and describe[1][:1] == b"P"
    return True


def _is_unnamed_run(items: list) -> bool:
    """*items* are Parse, Bind, [Describe,] Execute, Sync of the unnamed statement and portal:
    how psycopg, node-postgres and pgbench -M extended send a query with parameters."""
    n = len(items)
    if n != 4 and n != 5:
        return False
    for item in items:
        if type(item) is not tuple:
            return False
    parse, bind, execute, sync = items[0], items[1], items[-2], items[-1]
    if parse[0] != p.PARSE or bind[0] != p.BIND or execute[0] != p.EXECUTE or sync[0] != p.SYNC:
        return False
    return _names_unnamed(items) and (n == 4 or (items[2][0] == p.DESCRIBE and items[2][1] in _DESCRIBE_UNNAMED))


def _names_unnamed(items: list) -> bool:
    """Unnamed all through: Parse "" (its body starts with the name's NUL), Bind portal "" of
    statement "", Execute portal "" (of a run whose layout is known)."""
    return items[0][1][:1] == b"\x00" and items[1][1][:2] == b"\x00\x00" and items[-2][1][:1] == b"\x00"


_DESCRIBE_UNNAMED: Final = frozenset((b"P\x00", b"S\x00"))


def _peer_host(transport) -> str | None:
    """The client's address, for the words of a refused login."""
    return getattr(transport.getPeer(), "host", None)


class ClientSession(Admission):
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
        "temporaries",
        "_effects_of",
        "ready_count",
        "_copy_syncs",
        "tx_status",
        "process_id",
        "secret_key",
        "backlog",
        "logged_in",
        "connected_at",
        "placement",
        "_idle_tx_timer",
        "console",
        "audit",
        "router",
        "user_route",
        "decision",
        "min_lsn",
        "orphaned",
        "lease",
        "_paused",
        "_asked_at",
        "_startup_settings",
        "_to_restore",
        "_orphan_error",
        "_orphan_told",
        "_tx_end",
        "admitted",
        "last_request",
        "_read",
        "_last_read",
        "_refused",
        "counters",
        "byte_stats",
    )

    def __init__(self, proxy, transport, client_id: str):
        # (What Admission also sets is declared there, not again here: mypyc would give each
        # such field a second slot, and the cyclic collector would count it twice.)
        self.proxy = proxy
        self.transport = transport
        self.id = client_id
        self.state = LOGIN
        config = proxy.config
        self.config = config
        self.counters = proxy.counters  # (admin's Counters, bumped at each ReadyForQuery: kept at hand)
        self.byte_stats: Any = None  # counters.DatabaseStats of the client's database, once it is known (got_data)
        self.transaction_mode = config.pool_mode == "transaction"
        self.login = ClientLogin(
            config.auth_type,
            proxy.lookup_user,
            proxy.mock_secret,
            # On a Unix socket PostgreSQL answers SSLRequest with N and requires no TLS: so do we.
            tls_mode="disable" if is_local_peer(transport) else config.tls.mode,
            client_host=_peer_host(transport),
            admit=self._admit,
            look_up=bool(config.auth_user),
        )
        self.startup = None
        self.database = None
        self.user = None
        self.pool: Pool | None = None
        self.server: ServerConnection | None = None
        self.scanner = None
        self.relay = None
        self.settings = {}
        self.dirty: set[str] = set()  # settings the client changed; read back before the server goes
        self.dirty_all = False
        self.pinned: str | None = None
        self.temporaries = temporaries.NONE  # the relations it made temporary, which DDL on shows nobody
        self._effects_of: dict = {}  # statement name -> SessionEffects, for statements that change session state
        self.ready_count = 0
        # Session pooling, COPY FROM STDIN under way: the client's Syncs the node ignores while it
        # reads the data, counted as answered by the ReadyForQuery that ends it (_syncs_ignored_by_copy).
        self._copy_syncs: int | None = None
        self.tx_status = p.TX_IDLE
        self.process_id = 0
        self.secret_key = b""
        self.backlog: list = []  # client messages that arrived while no server was linked
        self._read: tuple | None = None  # (first message, the read that held it and the next ones whole, how many): see _plain_backlog
        self._last_read: bytes | None = None  # the client's last read, should PostgreSQL refuse it 55006 (_on_refusal)
        self._refused: tuple | None = None  # (its server connection, the refusal's body, the Query to send again, its databases)
        self.logged_in = False
        self.connected_at = proxy.clock.seconds()
        self._idle_tx_timer: Any = None
        self.router = None
        self.user_route = "auto"
        self.decision: Decision | None = None
        self.min_lsn = 0  # read-your-writes: the WAL position of this client's last write
        self.orphaned = False  # its transaction died with a node: only ROLLBACK gets it out
        self.lease: Lease | None = None  # what belongs to the current lending of self.server (lease.py)
        self._paused = False
        self._orphan_error: Any = None  # the error an orphaned transaction's next statement gets (08006, 57P01...)
        self._orphan_told = False  # an orphaned batch's error went out at its Flush: its Sync gets ReadyForQuery alone
        self._tx_end = 0  # what to do when the open transaction ends: _DDL_SENT | _LOCAL_PATH | _SHARED_DDL
        self._asked_at: float | None = None  # when the client's pending request began (query latency)
        self.last_request = self.connected_at  # when its last answered request began (client_idle_timeout)
        self._startup_settings = {}  # what RESET returns to, for this client (read-only)
        self._to_restore: set[str] | None = None  # startup settings a RESET sent to the server's defaults
        self.console = None
        self.placement = Placement(self)  # getting a server connection for the work, and surviving its loss
        self.admitted = False  # counted against max_client_conn (proxy.admit)
        self.audit = False  # statements are logged (the user is listed in `audit`)
        # client_login_timeout: the janitor's sweep of proxy.logging_in (Proxy.expire_logins), not a
        # reactor timer per connection, which would cost a heap insertion and a cancellation per login.
        if config.client_login_timeout:
            proxy.logging_in[client_id] = self

    def _enter(self, state: str, _next=NEXT) -> None:
        """Move to *state*: the only way the state changes. A move the table (states.TRANSITIONS)
        does not list raises, as PgBouncer's change_server_state() asserts; on the per-transaction
        path (IDLE, WAITING, PREPARING, LINKED) it is one dict lookup and one set test."""
        if state not in _next[self.state]:
            raise IllegalTransition(self.state, state)
        self.state = state

    def __repr__(self):
        return f"<ClientSession {self.id} {self.user}@{self.database and self.database.name} {self.state}>"

    # -- events from FrontendProtocol ---------------------------------------------------------

    def got_data(self, data: bytes) -> None:
        # SHOW STATS total_received: one integer add per read (what PgBouncer pays too).
        stats = self.byte_stats
        if stats is not None:
            stats.received += len(data)
        elif self.database is not None:
            stats = self.byte_stats = self.counters.database(self.database.name)
            stats.received += len(data)
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
        except Exception as e:
            self._refuse(e)

    def connection_lost(self, reason) -> None:
        if tls.is_tls_failure(reason):
            log.info("client {client}: TLS failed: {why}", client=self.id, why=tls.failure_text(reason))
        previous = self.state
        self._enter(CLOSED)
        if self.console is not None:
            self.console.connection_lost()
        self._stop_login_timeout()
        self._cancel_idle_tx_timer()
        self.placement.give_up()  # (out of any pool queue before its connection goes back; no retry)
        if previous is LINKED and self.server is not None:
            self._release_server("client gone")
        self.proxy.client_closed(self, reason)
        # Last: what holds the session and is held by it lets go of it (a login cut short holds
        # its admit callback), so that it is freed at once: see Placement.closed.
        self.placement.closed()
        self.login = None

    # -- client bytes (all but session mode's linked fast path) ---------------------------------

    def _client_data(self, data: bytes) -> None:
        if data == _TERMINATE_MESSAGE and self._leaves_between_transactions():
            return
        # (One reference kept, read again only if PostgreSQL answers 55006: _on_refusal. A read
        # that does not start a message is no statement of the client's, whatever it spells.)
        self._last_read = data if self.scanner.at_boundary else dropdb.FRAGMENT
        if self._idle_tx_timer is not None:
            self._cancel_idle_tx_timer()
        if self._asked_at is None:
            self._asked_at = self.proxy.clock.seconds()
        items = self.scanner.feed(data)
        if self.state is LINKED:
            kept = self.lease
            if kept.lent:  # its next transaction, on the connection it kept: a lending of its own
                server = self.server
                server.pool.unlend(server)
                self.lease = Lease()
                if self.router.clustered and not self._placed_on(server, items, kept):
                    return  # placed on another node: the kept connection went back
                server.replied = False
                if len(items) == 1:
                    if self._plain_query(items[0], data, server):
                        return
                elif self._plain_batch(items, data, server):
                    return
            elif not (kept.watch or kept.holding or kept.read_link) and self._to_restore is None:
                # Inside a transaction (or a pinned session), where writes in BEGIN..COMMIT run
                # statement after statement: the same fast paths, on the connection it holds. Its
                # read goes out as it came only when it began at a boundary (a lent client's always
                # does): the rest of a message split across reads is not the message.
                whole = self._last_read is data
                if len(items) == 1:
                    if whole and self._plain_query(items[0], data, self.server):
                        return
                elif self._plain_batch(items, data if whole else None, self.server):
                    return
            self._client_items(items)
        elif self.state is IDLE:
            if not items:
                # Part of a message, held by the scanner until it is whole: nothing to place yet,
                # nor asked (client_idle_timeout still applies). Placed now, a client sending a
                # byte at a time would hold a server connection between its bytes, and a few such
                # clients the whole pool.
                self._asked_at = None
                return
            if len(items) == 1 and type(items[0]) is tuple and items[0][0] == _TERMINATE:
                self._terminate()  # (a Terminate split across reads: see _leaves_between_transactions)
                return
            if self.orphaned:
                self._answer_orphaned(items)
                return
            if (
                len(data) <= 10 and items and not self.backlog  # (Sync, Flush: 5 bytes each; the usual Query is more)
                and all(type(i) is tuple and i[0] in _SYNC_FLUSH for i in items)
            ):
                # Syncs (and Flushes) with nothing before them: libpq's PQpipelineSync as psycopg
                # leaves an empty pipeline block, or one whose statement was cancelled while it
                # waited; a driver resynchronising. PostgreSQL answers each Sync with
                # ReadyForQuery at once, and so does pgtwist between transactions, rather than
                # wait for a server connection (query_wait_timeout on a full pool) to ask one.
                self._asked_at = None
                syncs = sum(1 for i in items if i[0] == _SYNC)
                if syncs:
                    # (A Sync ends a skip to Sync after an error, as it does on the node; a Flush
                    # after it opens nothing.)
                    if self.relay is not None:
                        self.relay.skipping = False
                    self.scanner.unsynced = False
                    write_now(self.transport, _IDLE_READY * syncs)
                return
            if not self.backlog and items and self._last_read is data and self.scanner.at_boundary:
                self._read = (items[0], data, len(items))  # (whole messages, from a boundary to a boundary)
            self.backlog.extend(items)
            self.placement.place()
        else:  # WAITING, PREPARING: keep it for the server connection on its way
            self.backlog.extend(items)
            self.pause_reading()

    def _leaves_between_transactions(self) -> bool:
        """A read that is exactly a Terminate came between two transactions (a short-lived
        client's every logout): the client goes now, without the scanner's walk, the latency
        clock or the idle-transaction timer of a statement: when no connection is held (IDLE) and
        the read begins a message (the scanner's to say), or when the one held is kept between
        transactions (lent, which it is only at a boundary), which the client owes nothing and
        which goes back as it is (_release_server). Otherwise it takes the general path (False)."""
        state = self.state
        if state is LINKED:
            if not self.lease.lent:
                return False
            server = self.server
            server.pool.unlend(server)
        elif state is not IDLE or not self.scanner.at_boundary:
            return False
        self._terminate()
        return True

    def _plain_query(self, item, data: bytes, server: ServerConnection) -> bool:
        """The common case on a kept connection: one simple Query that leaves session state alone.

        It goes out as the very bytes the client sent; the relay only notes one more
        ReadyForQuery owed. Anything else takes the general path (_client_items).
        """
        if type(item) is not tuple or item[0] != p.QUERY or self.audit or not self.relay.idle:
            return False
        body = item[1]
        if len(body) + 5 != len(data):
            return False
        effects = analysis.query_effects(body)
        if effects is not NO_EFFECTS and (effects.changes_state or effects.local_commit_mode):
            return False
        lease = self.lease
        lease.watch &= _WATCH_ALL  # (this is the statement the link was placed by)
        self._note_sent(lease, server, (item,))
        self.relay.expect_ready()
        write_now(server.transport, data)
        return True

    def _plain_backlog(self, backlog: list, server: ServerConnection, read: tuple | None) -> bool:
        """A connection just handed over (clients outnumber server connections): its first work is
        most often what a kept connection's is, one plain Query or a prepared statement run again.
        It takes the same fast paths, so that its answer too is forwarded whole (whole_reply)
        rather than message by message through the relay. *read*: (first message, the read
        that held it, how many messages that read held whole), when the backlog began with a
        read of whole messages (ClientSession._read)."""
        # The very read it came in, when the backlog is just what it held (as a waiting client's most often is).
        data = read[1] if read is not None and read[0] is backlog[0] and read[2] == len(backlog) else None
        if len(backlog) == 1:
            item = backlog[0]
            if type(item) is not tuple or item[0] != p.QUERY:
                return False
            return self._plain_query(item, data if data is not None else frame(p.QUERY, item[1]), server)
        return self._plain_batch(backlog, data, server)

    def _plain_batch(self, items: list, data: bytes | None, server: ServerConnection) -> bool:
        """The other common cases: Bind (of a statement this connection holds), [Describe portal,]
        Execute, Sync — a prepared statement run again — or Parse, Bind, [Describe,] Execute,
        Sync of the unnamed statement (_unnamed_run). Only the statement name is rewritten; the
        relay notes one ReadyForQuery owed, and the replies pass through untouched."""
        if self.audit or not self.relay.idle or len(items) < 3:
            return False
        first = items[0]
        scanner = self.scanner
        if first is scanner.run_head and len(items) == scanner.run_size:
            scanner.run_head = None  # (compared once: not kept alive with its body)
            # One read the scanner walked in one pass (MessageScanner._run): its layout is known,
            # only the names are left to tell (_is_unnamed_run and _is_prepared_run, shortened).
            if first[0] == p.PARSE:
                return _names_unnamed(items) and self._unnamed_run(items, data, server)
            if len(items) == 4 and items[1][1][:1] != b"P":
                return False
        elif not _is_prepared_run(items):
            return _is_unnamed_run(items) and self._unnamed_run(items, data, server)
        body = first[1]
        start, end = m.bind_statement_span(body)
        if start < 0:
            return False  # (the general path reports the malformed Bind)
        if end > start:
            bind = self._renamed_bind(body, start, end, len(items) == 4, items, server)
            if bind is None:
                return False
        elif "" in self._effects_of:
            return False
        else:
            bind = frame(p.BIND, body)
            self.relay.expect_ready(simple=False)
        lease = self.lease
        lease.watch &= _WATCH_ALL  # (this is the statement the link was placed by)
        self._note_sent(lease, server, items)
        if data is not None and self.scanner.at_boundary:
            # The read held exactly these messages (the scanner began it at a boundary, as a
            # lent client's always does): what follows the Bind goes out as the client sent it.
            write_now(server.transport, bind + data[5 + len(body) :])
        else:
            write_now(server.transport, bind + b"".join(frame(t, b) for t, b in items[1:]))
        return True

    def _unnamed_run(self, items: list, data: bytes | None, server) -> bool:
        """A query with parameters in the extended protocol, unnamed: nothing to rename and
        nothing the relay keeps (it keeps no unnamed statement; the general path only forwards
        each message and counts their replies). Its statement's effects on the session are
        judged as a plain Query's; one that has any takes the general path."""
        body = items[0][1]
        end = body.find(b"\x00", 1)
        if end < 0:
            return False
        effects = analysis.query_effects(body[1 : end + 1])
        if effects is not NO_EFFECTS and (effects.changes_state or effects.local_commit_mode):
            return False
        if self._effects_of:
            self._effects_of.pop("", None)  # (this Parse replaces the unnamed statement: _client_parse)
        self.relay.expect_ready(simple=False)
        lease = self.lease
        watch = lease.watch
        # (This is the statement the link was placed by; a later Bind of it alone needs no new verdict.)
        lease.watch = watch & _WATCH_ALL | (_WATCH_UNNAMED if watch & _WATCH_ALL else 0)
        self._note_sent(lease, server, items)
        if data is not None and self.scanner.at_boundary:
            write_now(server.transport, data)  # the read held exactly these messages
        else:
            write_now(server.transport, b"".join([frame(t, b) for t, b in items]))
        return True

    def _renamed_bind(self, body: bytes, start: int, end: int, described: bool, items: list, server) -> bytes | None:
        """The fast path's Bind of the client's statement body[start:end], renamed to the shared
        copy *server* holds; None when that copy is missing or stale, or the statement changes
        session state (the general path then decides)."""
        relay = self.relay
        name = body[start:end].decode("utf-8", "replace")
        statement = relay.statements.get(name)
        if statement is None or name in self._effects_of or (relay.doomed and name in relay.doomed):
            return None
        # Relay.fresh(), inline: the connection's copy is newer than the client's Parse (and
        # than the last DDL, when the run describes its result).
        held = server.statements.names.get(statement.server_name)
        if held is None or held < statement.parsed_at or (described and held < relay.schema.ddl_at):
            return None
        server.statements.touch(statement.server_name)
        relay.queue.append(HOT_RUN)  # (Relay.expect_batch, inline)
        relay.hot = (items, server.statements, statement.server_name)
        return frame(p.BIND, body[:start] + statement.server_name.encode() + body[end:])

    def _client_items(self, items: list) -> None:
        """The client's messages for its linked server. Transaction pooling looks at each one
        (_client_message) and relays it; session pooling forwards them (_session_items)."""
        if not self.transaction_mode:
            self._session_items(items)
            return
        lease = self.lease
        if lease.holding:
            self.backlog.extend(items)  # behind a write held back from a replica: waits for the primary
            return
        if lease.read_link:
            items = self._hold_writes(items)
        server = self.server
        self._note_sent(lease, server, items)
        relay = self.relay
        to_server: list = []
        to_client: list = []
        relay.upcoming = items  # (what follows a Bind: see Relay.fresh)
        for at, item in enumerate(items):
            if type(item) is bytes:  # COPY data and the like
                to_server.append(item)
            elif item[0] == _TERMINATE:
                self._flush(to_server, to_client)
                self._terminate()
                return
            else:
                self._client_message(item[0], item[1], at, server, to_server, to_client)
        relay.upcoming = ()
        self._flush(to_server, to_client)
        self._maybe_release()

    @staticmethod
    def _note_sent(lease: Lease, server: ServerConnection, items: list | tuple) -> None:
        """Until the node's first reply, what this lending forwarded may be replayed elsewhere (_link_lost)."""
        lease.used = True
        if not lease.replied:
            if server.replied:
                lease.replied = True
            else:
                lease.sent.extend(items)

    def _client_message(self, msg_type: int, body: bytes, at: int, server, to_server: list, to_client: list) -> None:
        """One message of the client's: watched (read-your-writes), audited, its effects on the
        session noted, then relayed (or answered by the proxy itself)."""
        watch = self.lease.watch
        if watch and msg_type in _WATCHED:
            self._watch_statement(msg_type, body, watch)
        if self.audit and (msg_type == p.QUERY or msg_type == p.PARSE):
            self.proxy.audit_statement(self, msg_type, body)
        if msg_type == p.QUERY:
            if self._client_query(body, to_server, to_client):
                return
        elif msg_type == p.PARSE:
            self._client_parse(body)
        elif msg_type == p.BIND:
            self.relay.at = at
            self._client_bind(body, server, to_server, to_client)
            return
        self.relay.client_message(msg_type, body, server, to_server, to_client)
        if self._to_restore is not None and (msg_type == p.QUERY or msg_type == p.SYNC):
            self._restore_startup_settings(to_server)

    def _client_query(self, body: bytes, to_server: list, to_client: list) -> bool:
        """A simple Query: True when the proxy answered it itself (_query)."""
        effects = analysis.query_effects(body)
        if effects.changes_state:
            return self._query(body, effects, to_server, to_client)
        if effects.local_commit_mode:
            self.lease.async_commit = True
        return False

    def _client_parse(self, body: bytes) -> None:
        """A Parse: what its statement will do to the session is noted now; it acts when bound (_client_bind)."""
        name, definition = split_parse(body)
        text = definition.partition(b"\x00")[0]
        effects = analysis.query_effects(text + b"\x00")
        if effects.changes_state or effects.local_commit_mode:
            self._effects_of[name] = effects
        else:
            self._effects_of.pop(name, None)

    def _client_bind(self, body: bytes, server, to_server: list, to_client: list) -> None:
        """A Bind: a statement acts where and when it runs, on this server, now."""
        relay = self.relay
        effects = self._effects_of.get(split_bind(body)[1]) if self._effects_of else None
        if effects is not None:
            if effects.pin and not self.pinned and self.config.unpoolable == "error":
                relay.fail(sqlstate.FEATURE_NOT_SUPPORTED, f"{effects.pin} is not supported in transaction pooling mode", to_client)
                return
            if effects.deallocate:  # SQL DEALLOCATE of the client's own (protocol-level) statements
                relay.stand_in(effects.deallocate, to_server)
        relay.client_message(p.BIND, body, server, to_server, to_client)
        if effects is not None:
            self._note_effects(effects)

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
        first = not self.lease.used
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
                    self.lease.holding = True
                    self.backlog = items[start:] + self.backlog
                    return items[:start]
            if msg_type == p.QUERY and not open_batch:
                start = i + 1
        return items

    def _flush(self, to_server: list, to_client: list) -> None:
        if to_server:
            write_now(self.server.transport, b"".join(to_server))
        if to_client:
            self.lease.replied = True
            write_now(self.transport, b"".join(to_client))
            if not to_server and self.relay.idle:
                self._answered_here()  # (a Query pgtwist answered itself: DEALLOCATE, an unpoolable one refused)
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
            self.lease.async_commit = True
        temporary = False
        if effects.ddl_steps:
            # Statement by statement: DDL on the relations this session made temporary shows no
            # other session anything, whatever pins the session; any other DDL shows them all.
            temporary, self.temporaries = self.temporaries.after(effects.ddl_steps)
        if effects.ddl:
            self._tx_end |= _DDL_SENT
            if not temporary:
                # Every server connection's shared statements of this database may mean something
                # else now: each is prepared again on its next use there (statements.Schema). Once
                # more when the transaction ends: a copy prepared meanwhile elsewhere saw the old
                # schema. Not for DDL on this session's temporary relations, which no other
                # session's statements can name (an ORM's temporary table per request would have
                # every connection prepare its statements again each time); its own statements
                # meet PostgreSQL's own check, as on a direct connection.
                self.relay.schema.ddl()
                self._tx_end |= _SHARED_DDL
                if self.proxy.worker is not None:
                    # workers = N: the other workers' clocks too, now and at the commit (a copy
                    # they prepare in between saw the old schema), as this one's (_transaction_ended).
                    self.proxy.worker.schema_changed(self.database.name)
                lease = self.lease
                if lease.ddl is False:
                    lease.ddl = True  # (under workers = N the others hold their reads from its commit: _answering)
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
            self.server.taint("DISCARD ALL or DEALLOCATE ALL")
            self.server.statements.clear()
            self.relay.drop()

    def _terminate(self) -> None:
        """Terminate: the client is leaving; its server connection is not.

        Acted on at once, even while the node still runs the client's statement: that work is
        cancelled and its server connection closed (_release_server), and the client hears
        nothing more, only the end of the connection, as from PgBouncer. PostgreSQL reads no
        message while it runs a statement, so there the Terminate waits until the statement
        ends (its answer goes to a socket the client has closed). A driver that closes a
        connection from one thread while another waits in it sees the hang-up sooner here.
        """
        self._enter(CLOSED)
        if self.server is not None:
            self._release_server("Terminate")
        self.transport.loseConnection()

    # -- session mode, linked: the hot path ------------------------------------------------

    def _forward_session(self, data: bytes) -> None:
        self._last_read = data if self.scanner.at_boundary else dropdb.FRAGMENT  # (see _client_data)
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
                self.proxy.audit_statement(self, item[0], item[1])
                out.append(frame(item[0], item[1]))
        if out:
            write_now(self.server.transport, b"".join(out))

    def _placed_on(self, server, items: list, kept: Lease) -> bool:
        """In a cluster, a client keeping *server* between transactions (the *kept* lease) sent
        *items*: True when Placement puts them on *server*'s node, the placement being the new
        lease's from now on; otherwise the connection goes back to its pool and the work to
        where it was placed (False)."""
        decision = self.placement.decide_kept(items)
        lease = self.lease
        if decision is UNPLACED:
            # Nothing to place by: it stays where it is, and goes on as the kept lease's work did.
            lease.read_link = kept.read_link
            lease.used = kept.used
            self._watch_link(self.decision, known=False)
            return True
        if decision is not None and decision is not AWAIT_END and decision.node == server.node:
            self.decision = decision
            self.counters.routed(decision.reason)
            # What a new link starts with (as in _prepared): the replica read and what may be held behind it.
            lease.read_link = decision.want == "replica" and decision.classification.tx is None and not decision.on_primary
            self._watch_link(decision)
            return True
        self._give_back(server)
        self.backlog.extend(items)
        if decision is not AWAIT_END:
            self.placement.place(decision)  # (None: no node now; Placement asks again and waits for one)
        return False

    # -- what Placement calls ------------------------------------------------------------------

    def start_waiting(self) -> None:
        """Placement looks for a node and a server connection for the session's work."""
        self._enter(WAITING)

    def defer_work(self) -> None:
        """Placement put the work off (an extended batch bound for a replica waits for its end): read on."""
        self._enter(IDLE)
        self.resume_reading()

    def cancel_waiting(self) -> bool:
        """A CancelRequest with this client's key came while its work is still in pgtwist: queued
        for a server connection (WAITING), or behind pgtwist's own statements on the one it got
        (PREPARING: settings sync, or the read-back after its last transaction). True: it was for
        this work, which is answered here as PostgreSQL answers a cancelled statement (57014);
        the caller sends nothing to any node. False: the caller sends it to the session's server.

        Sent on, it would cancel pgtwist's own statement on the connection (the client then lost
        its session to an error it had no part in) or be ignored while the statement still ran
        later: PgBouncer ignores it (pgbouncer#1222, #1314). Only the first statement, or batch
        up to its Sync, is cancelled, as a cancel stops only the statement running; what the
        client sent behind it still runs."""
        state = self.state
        if state is not WAITING and state is not PREPARING:
            return False
        if not self.logged_in or (state is WAITING and self.router.hook is not None):
            return True  # (a login, or a routing hook's answer on its way: nothing to cancel now)
        backlog = self.backlog
        end = next((i for i, item in enumerate(backlog) if type(item) is tuple and item[0] in _ENDS_WORK), None)
        if end is None or backlog[end][0] == _TERMINATE:
            return True  # (no whole statement yet, or it is leaving: as PostgreSQL, idle when the cancel comes)
        rest = backlog[end + 1 :]
        if rest and self.router.clustered and state is PREPARING:
            # What follows was placed with it, on the node its first statement chose (a read's
            # replica, for a write behind it): it runs as placed, as a cancel that came before
            # a statement started would have found PostgreSQL idle.
            return True
        work, self.backlog = backlog[: end + 1], rest
        self._read = None  # (the backlog no longer begins with that read)
        if state is WAITING:
            self.placement.give_up()
            self._enter(IDLE)
            self.resume_reading()
        self._answer_locally(work, m.error_fields("ERROR", sqlstate.QUERY_CANCELED, "canceling statement due to user request"))
        if rest and state is WAITING:
            self.placement.place()  # (the rest is placed by its own first statement)
        return True

    def fail_waiting_work(self, fields: dict) -> None:
        """No server could be had within failover_wait: the waiting work fails as a statement would, the session stays."""
        backlog, self.backlog = self.backlog, []
        self._read = None
        self._enter(IDLE)
        self.resume_reading()
        self._answer_locally(backlog, fields)

    def follow_reload(self) -> None:
        """A reload rebuilt this database's router (its nodes changed): place work with the new one.

        The old router's health monitor has stopped, so its view of the nodes is frozen; and
        its nodes may be gone. (A removed database keeps what it had: its sessions may finish.)
        """
        database = self.proxy.config.databases.get(self.database.name)
        if database is None:
            return
        self.database = database
        self.router = self.proxy.router_for(database)
        self.placement.forget()

    def pause_reading(self) -> None:
        """Stop reading the client while its work waits: what it sends meanwhile stays in its socket."""
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        # Only if we paused it: on the per-transaction path every pause/resume is two epoll calls.
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    # -- the pool's answers to a waiting client (Pool.wait_for) -------------------------------------

    def server_ready(self, server) -> None:
        """The pool hands this waiting client a server connection."""
        try:
            if self.state is CLOSED:
                # (Not after cancel_wait; but should an answer come late, the placement has let
                # go of this session: link_server gives the connection back.)
                self.link_server(server)
                return
            self.placement.server_ready(server)
        except Exception:
            self.crashed(Failure())

    def server_unavailable(self, failure) -> None:
        """The pool could not serve this waiting client (wait timeout, the node refused, ...)."""
        try:
            self.placement.server_unavailable(failure)
        except Exception:
            self.crashed(Failure())

    # -- linking a server connection ------------------------------------------------------------

    def link_server(self, server: ServerConnection) -> None:
        """Placement got *server* for the waiting work: make it ready (its settings synced), then link it."""
        if self.state is CLOSED:
            server.pool.release(server, reusable=True, reset=not self.transaction_mode)
            return
        self.server = server
        self._enter(PREPARING)
        statements = None if self.settings == server.settings else sync_sql(self.settings, server.settings, server.parameters)
        if statements is None and not self.logged_in and server.parameters_stale:
            statements = []  # an empty batch: its ReadyForQuery brings what changed (in_hot_standby)
        if statements is None:
            self._prepared([])
        else:
            server.run_for_client([statements]).addCallbacks(self._prepared, self._prepare_failed).addErrback(self.crashed)

    def _prepare_failed(self, failure) -> None:
        server, self.server = self.server, None
        if self.state is CLOSED or server is None:
            return
        self.router.server_ended(server.node, server.fatal)
        self._enter(WAITING)
        self.placement.retry_or_fail(
            m.error_fields("FATAL", sqlstate.CONNECTION_FAILURE, f"lost the connection to node {server.node} while preparing the session")
        )

    def _prepared(self, errors: list[dict]) -> None:
        server = self.server
        if self.state is CLOSED:
            self.server = None
            server.pool.release(server, reusable=True, reset=not self.transaction_mode)
            return
        if errors:
            self.server = None
            server.forget_settings()  # the failed statement rolled back; what it held is unknown
            server.taint("restoring the session's settings failed")
            server.pool.release(server, reusable=False)
            if not self.logged_in:
                # As PostgreSQL does for a bad startup parameter: the login fails with the server's reason.
                self.fatal_fields(dict(errors[0], S="FATAL", V="FATAL"))
            else:
                self.fatal(sqlstate.INTERNAL_ERROR, "could not restore this session's settings on a server connection", errors[0].get("M"))
            return
        server.settings_synced(self.settings)
        if not self.logged_in:
            parameters = dict(server.parameters)
            if self.transaction_mode and self.decision is not None and self.decision.want == "replica":
                # A login while there is no primary (router.login_decision): the client is told
                # what a login through pgtwist reports with a primary, a read-write endpoint
                # (its writes wait for the primary), not that it reached a standby; libpq's
                # target_session_attrs=read-write would otherwise pass pgtwist over.
                if "in_hot_standby" in parameters:
                    parameters["in_hot_standby"] = "off"
            elif self.transaction_mode:
                server.pool.remember_login(self._login_key(), parameters)
            else:
                # Session pooling: this server connection is the client's for good, so the client
                # is told its process id (with a secret of ours; a CancelRequest with it reaches
                # this connection as any other does).
                pid = server.backend_key[0] if server.backend_key is not None else None
                self.process_id, self.secret_key = self.proxy.register_cancel_key(self, pid)
            self._logged_in(parameters)
        self._enter(LINKED)
        self.ready_count = 0
        self.placement.settled()
        self._start_lease()
        server.link(self, self.transport, self.relay.capture() if self.relay else SESSION_SERVER_CAPTURE)
        self.resume_reading()
        self._work_on(server)

    def _start_lease(self) -> None:
        """A link starts: its Lease, with what the work it was placed by says about it."""
        decision = self.decision
        if not self.router.clustered:
            # One node: no replica read, nothing to watch for read-your-writes (_watch_link's
            # first case, which a new Lease already is).
            self.lease = Lease()
            return
        self.lease = Lease(
            read_link=bool(
            self.transaction_mode
            and decision is not None
            and decision.want == "replica"
            and decision.classification.tx is None
            and not decision.on_primary  # (a read that fell back to the primary: writes behind it may follow it)
            and self.relay.tx_status == p.TX_IDLE
            )
        )
        self._watch_link(decision)

    def _work_on(self, server: ServerConnection) -> None:
        """Just linked to *server*: the work that waited for it goes out."""
        backlog, self.backlog = self.backlog, []
        read, self._read = self._read, None  # (taken with the backlog it belongs to, whatever path that takes)
        if backlog:
            if not (self.transaction_mode and self._plain_backlog(backlog, server, read)):
                self._client_items(backlog)
        elif self.transaction_mode:
            self._maybe_release()

    # -- the handoff while clients wait (transaction pooling) -------------------------------------

    def takes_as_is(self, server: ServerConnection) -> bool:
        """Pool.hand_over asks: can this waiting client take *server* just as the client before
        it leaves it, linked in place? Yes when logged in, in transaction pooling, and the
        session's settings are the connection's (nothing to sync: link_server's common case)."""
        return self.state is WAITING and self.logged_in and self.transaction_mode and self.settings == server.settings

    def take_over(self, server: ServerConnection) -> None:
        """The pool hands this waiting client *server* straight from the client before it, still
        linked (Pool.hand_over): what link_server and _prepared do for a logged-in client whose
        settings the connection holds, in one step, and the connection relinked in place."""
        try:
            self.placement.settled()
            self.server = server
            self._enter(LINKED)
            self.ready_count = 0
            self._start_lease()
            server.relink(self, self.transport, self.relay.capture())
            if self._paused:
                self.resume_reading()
            self._work_on(server)
        except Exception:
            self.crashed(Failure())

    def _hand_over(self, server: ServerConnection) -> None:
        """The transaction ended with nothing to read back, and clients wait for the pool: the
        connection goes to the oldest of them in place if it can take it as it is (Pool.hand_over),
        else it is unlinked and released to the pool, as _give_back does. (The session lets go
        first: the taker's take_over may already release or lose the connection.)"""
        self.lease = None
        self.server = None
        self._enter(IDLE)
        pool: Pool = server.pool
        if not pool.hand_over(server):
            server.unlink()
            pool.release(server, reusable=True, reset=False)
        if self._paused:
            self.resume_reading()
        # (No backlog to place: _maybe_release hands over only when there is none.)

    # -- losing it ----------------------------------------------------------------------------

    def server_lost(self, server, reason) -> None:
        """The node closed our server connection while this client was linked to it.

        What the node said before it hung up (its FATAL, if any) decides both what it means for
        the node's health (cluster/evidence.py: a client's protocol error or one terminated
        backend never takes a node down) and what the client hears: the node's own SQLSTATE and
        message, once. Transaction pooling keeps the session (its state lives in pgtwist) unless
        on_server_loss = "close_client"; session mode and pinned sessions cannot carry it and
        end with the node's FATAL alone.
        """
        if self.server is not server or self.state is CLOSED:
            return
        self.server = None
        lease, self.lease = self.lease, None
        lent = lease is not None and lease.lent
        relay = self.relay
        said = server.fatal
        if relay is not None:
            said = said or relay.server_fatal
            relay.server_fatal = None
        log.info(
            "client {client}: server {server} on node {node} ended: {code} {message}",
            client=self.id,
            server=server.id,
            node=server.node,
            code=said.get("C") if said else sqlstate.CONNECTION_FAILURE,
            message=said.get("M") if said else "connection lost",
        )
        self.router.server_ended(server.node, said)
        if self.transaction_mode and self.state is LINKED and not self.pinned and self.placement.keeps_session(said, lent):
            self._link_lost(server, lease, said)
            return
        if relay is not None:
            relay.forget_server()
        if not server.at_message_boundary:
            # Half a message already went out: there is no way to speak protocol to this client again.
            self._enter(CLOSED)
            self.transport.loseConnection()
        elif said is not None:
            # The node's own FATAL, alone. In session mode it went to the client as it came.
            self._close_with(said, told=relay is None)
        else:
            self.fatal(
                sqlstate.CONNECTION_FAILURE,
                f"lost the connection to node {server.node}",
                "The server connection closed unexpectedly; the session cannot continue.",
            )

    def query_timed_out(self, limit: float) -> None:
        """query_timeout: the linked node has owed this client an answer for more than *limit* seconds.

        The server connection is closed (after a CancelRequest, so that a node that can still hear
        stops the work; a hung one would never answer the cancel) and the client gets ERROR 57014
        naming query_timeout. In transaction pooling the session goes on, as after a lost node
        (25P02 until ROLLBACK when a transaction was open); in session pooling its server session
        was the client's state, so the client is closed with FATAL 57014. The node's health is not
        touched: a slow statement says nothing about the node (the probes judge it), and nothing
        is replayed: the statement may have had its effects.
        """
        server = self.server
        if server is None or self.state is not LINKED:
            return
        self._asked_at = None
        lease, self.server, self.lease = self.lease, None, None
        message = f"canceling statement due to query_timeout ({limit:g} s): node {server.node} did not answer in time"
        log.warn("client {client}: {why} (server {server})", client=self.id, why=message, server=server.id)
        self.proxy.cancel_server(server)
        server.abandon()
        if self.transaction_mode and not self.pinned:
            self.counters.error(sqlstate.QUERY_CANCELED)  # (fatal() counts its own)
            self._link_lost(server, lease, None, timed_out=message)
            return
        if self.relay is not None:
            self.relay.forget_server()
        if server.at_message_boundary:
            self.fatal(
                sqlstate.QUERY_CANCELED,
                message,
                "The server connection was closed, and this session's state on the node with it.",
            )
        else:
            self._enter(CLOSED)
            self.transport.loseConnection()

    def _close_with(self, said: dict, told: bool) -> None:
        """Close the client with the node's FATAL *said*; *told*: the client has it already."""
        if not told:
            self.fatal_fields(dict(said, S="FATAL", V="FATAL"))
            return
        log.info("client {client} closed: {code} {message}", client=self.id, code=said.get("C"), message=said.get("M"))
        self.counters.error(said.get("C"))
        self._enter(CLOSED)
        self._cancel_idle_tx_timer()
        self.transport.loseConnection()

    def _link_lost(self, server, lease, said: dict | None, timed_out: str | None = None) -> None:
        """Transaction pooling: the server connection died under this client's work (the node
        went away, or it ended this one connection: pg_terminate_backend(), a timeout), or did
        not answer within query_timeout (*timed_out* says so). The session survives it; *said*
        is the node's FATAL, if it sent one."""
        relay = self.relay
        # The client's requests still owed a ReadyForQuery (not the proxy's own injected ones).
        # (A batch held back to be retried is the client's too.)
        owed = sum(1 for e in relay.queue if e.kind == SYNC and (not e.swallow or e.retry is not None)) + relay.held_requests()
        if relay.held_ready is not None:
            # Its statement ran, but the proxy's batch after it (restoring startup settings) did
            # not: report it failed, as its effects on the client's settings are not kept either.
            owed += 1
        replay = self.placement.replayable(server, lease, said, timed_out)
        relay.forget_server()
        if replay:
            # An autocommit read that got no byte back yet: run it again elsewhere, transparently.
            self.backlog = lease.sent + self.backlog
            if self.backlog:
                self.placement.place()
            else:
                self._enter(IDLE)
                self.resume_reading()
            return
        if not server.at_message_boundary:
            # Half a message already went out: there is no way to speak protocol to this client again.
            self._enter(CLOSED)
            self.transport.loseConnection()
            return
        # (Or a transaction-control statement placed this work and the node answered nothing of
        # it yet: a BEGIN on its way. Once anything came back, the decision may be an earlier
        # transaction's, ended since on the connection the client kept.)
        in_transaction = relay.tx_status != p.TX_IDLE or (
            self.decision is not None and bool(self.decision.classification.tx) and not server.replied
        )
        self._refused = None  # (a 55006 held for its ReadyForQuery: that will not come now)
        status = p.TX_FAILED if in_transaction else p.TX_IDLE
        self.orphaned = bool(in_transaction)
        relay.tx_status = self.tx_status = status  # (what the client is told now, SHOW CLIENTS and client_idle_timeout too)
        if timed_out is not None:
            error = m.error_response(
                "ERROR",
                sqlstate.QUERY_CANCELED,
                timed_out,
                "Its server connection was closed; the statement may or may not have taken effect, and nothing was retried."
                + (" The transaction is aborted: ROLLBACK to continue." if in_transaction else ""),
            )
        else:
            error = m.error_response_from_fields(self.placement.lost_fields(server, said, bool(in_transaction)))
        out = (error + m.ready_for_query(status)) * owed
        if self.scanner.last_type in _UNSYNCED:
            # The client is in the middle of a batch whose Sync has not come (a driver that
            # prepares with Parse, Describe, Flush waits for an answer before it sends one): as
            # PostgreSQL does after an error, the error goes out now and the rest of the batch,
            # up to its Sync, is skipped; that Sync gets its ReadyForQuery alone.
            out += error
            if in_transaction:
                self._orphan_told = True
            else:
                relay.skipping = True
        elif in_transaction and not owed:
            # Idle in its transaction: the client hears about it from its next statement.
            self._orphan_error = error
        if out:
            self.transport.write(out)
        if not self.backlog:
            self._answered_here()
        self._enter(IDLE)
        self.resume_reading()
        if self.backlog and not self.orphaned:
            self.placement.place()  # a write held back behind the lost read still wants the primary

    def _statement_texts(self, items: list):
        return standin.statement_texts(items, self.relay.statements)

    def _answer_locally(self, items: list, fields: dict) -> None:
        """Answer client messages no server will see, as PostgreSQL answers a failed statement."""
        reply, terminated = standin.failed_work(items, fields, p.TX_FAILED if self.orphaned else p.TX_IDLE)
        self.transport.write(reply)
        if not self.backlog:
            self._answered_here()
        if terminated:
            self._terminate()

    def _answer_orphaned(self, items: list) -> None:
        """After its node died mid-transaction, the client's statements fail until it ends the transaction."""
        out = []
        # An extended batch whose Sync has not come yet waits in the backlog for the rest.
        batch: list = self.backlog
        self.backlog = []
        for i, item in enumerate(items):
            if not self.orphaned:
                # ROLLBACK ended it: what the client sent behind it runs on a server as usual.
                self.backlog = items[i:]
                break
            if type(item) is not tuple:
                continue
            msg_type = item[0]
            if msg_type == _TERMINATE:
                self.transport.write(b"".join(out))
                self._terminate()
                return
            if msg_type == p.QUERY or msg_type == p.SYNC:
                batch.append(item)
                out.append(self._orphaned_reply(batch))
                batch = []
            elif msg_type == p.FLUSH:
                # A driver that prepares with Parse, Describe, Flush (asyncpg) waits for an answer
                # before its Sync: as PostgreSQL does, the error goes out now and the rest of the
                # batch, up to its Sync (answered with ReadyForQuery alone), is skipped.
                batch.append(item)
                if not self._orphan_told and not standin.ends_dead_transaction(
                    classify(sql) for sql in self._statement_texts(batch)
                ):
                    error, self._orphan_error = self._orphan_error, None
                    out.append(standin.aborted_error(error))
                    self._orphan_told = True
            else:
                batch.append(item)
        else:
            self.backlog = batch
        self.transport.write(b"".join(out))
        if not self.backlog:
            self._answered_here()
        if self.backlog and not self.orphaned:
            self.placement.place()

    def _orphaned_reply(self, items: list) -> bytes:
        if self._orphan_told:
            self._orphan_told = False  # (its error went out at a Flush; the batch was skipped since)
            return m.ready_for_query(p.TX_FAILED)
        if standin.ends_dead_transaction(classify(sql) for sql in self._statement_texts(items)):
            self.orphaned = False
            self._orphan_error = None
            self.relay.tx_status = self.tx_status = p.TX_IDLE
            # It rolled back with its node: its DDL must not be taken for committed at the end of
            # the client's next transaction.
            self._transaction_ended(committed=False)
            return standin.rolled_back(items)
        error, self._orphan_error = self._orphan_error, None
        return standin.still_aborted(error)

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
        if (self._refused is not None or _has_refusal(items)) and self._on_refusal(server, items):
            return
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
                    if got == p.TX_IDLE and self._tx_end:
                        self._answering()  # (each idle one: the last in this read may be a BEGIN's)
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
                elif msg_type == p.COPY_IN_RESPONSE:
                    if self._copy_syncs is None:  # (else a later COPY of the same Query: nothing more is ignored)
                        self._copy_syncs = self._syncs_ignored_by_copy(ready)
                else:
                    self._parameter_status(server, body)
            if ready and self._copy_syncs is not None:
                ready, self._copy_syncs = ready + self._copy_syncs, None
            self.ready_count += ready
        write_now(self.transport, b"".join(out))
        if status is not None:
            self._ready(server, status)

    def _syncs_ignored_by_copy(self, ready: int) -> int:
        """Session pooling: the node starts reading COPY FROM STDIN data (CopyInResponse), with
        *ready* ReadyForQuery of this read counted already. How many of the client's Syncs still
        unanswered will never be answered: PostgreSQL ignores a Sync while it reads COPY data,
        and libpq (PQexecParams, PQexecPrepared) and tokio-postgres send one behind the COPY's
        Execute, then another after CopyDone. They count as answered once the ReadyForQuery
        ending the COPY comes (until then the node is mid-COPY: a client leaving then gets its
        connection cancelled and closed); else the session would owe a ReadyForQuery for ever,
        and a client leaving would have a sound connection closed rather than reused, a drain
        wait for it.

        Session pooling does not look at each message the client sends (only counts Query, Sync
        and FunctionCall), so which request started the COPY is told by the last message: a
        Sync, when the client sent Execute and Sync and waits for CopyInResponse (libpq,
        tokio-postgres), or sent those and then its data, CopyDone and Sync: one Sync ignored,
        the one behind the Execute (the first unanswered: earlier requests were answered in
        order before this). Anything else (the Query itself, or its data already behind it, as
        pgx sends CopyFrom; an Execute and Flush) means no Sync is ignored."""
        if self.scanner.last_type == p.SYNC and self.scanner.watched - self.ready_count - ready > 0:
            return 1
        return 0

    def _on_refusal(self, server, items: list) -> bool:
        """PostgreSQL answered 55006 (or a refusal of that kind is held back): when it refused the
        client's one DROP DATABASE-like statement (session/dropdb.py), pgtwist's connections to
        that database on that node which nobody uses go. A lone simple Query refused with nothing
        else said (its ReadyForQuery in this read or the next) is then sent once more, the client
        none the wiser (nothing of it ran: PostgreSQL runs it only outside a transaction block);
        any other refusal goes to the client as it came, and its next attempt finds the database
        free. True when this read was taken for that."""
        refused, self._refused = self._refused, None
        if refused is not None:
            held_on, body, query, names = refused
            if held_on is not server:
                return False  # (that connection was lost, and the client heard so: nothing of it is owed)
            # (Nothing from the client since: its own next answers would otherwise come first.)
            if len(items) == 1 and items[0] == (_Z, b"I") and self._last_read is None and self._one_request_owed():
                self._send_again_freed(server, query, names)
                return True
            self.proxy.free_databases(names, self.id, server.node)
            items.insert(0, (p.ERROR_RESPONSE, body))  # (the refusal goes out first, as it came)
            return False
        last, self._last_read = self._last_read, None  # (once: refused again, the client hears it)
        query, names = dropdb.refused_statement(last)
        if not names or not self._one_request_owed():
            return False  # (other requests unanswered: the refusal may answer one of them, and answers would cross)
        index = next(i for i, item in enumerate(items) if type(item) is tuple and item[0] == p.ERROR_RESPONSE and dropdb.IN_USE in item[1])
        body = items[index][1]
        if m.decode_fields(body).get("C") != sqlstate.OBJECT_IN_USE:
            return False
        if query is not None and index == 0 and (len(items) == 1 or items[1:] == [(_Z, b"I")]):
            if len(items) == 1:
                self._refused = (server, body, query, names)  # (its ReadyForQuery decides)
            else:
                self._send_again_freed(server, query, names)
            return True
        self.proxy.free_databases(names, self.id, server.node)
        return False

    def _one_request_owed(self) -> bool:
        """Only the client's last request is unanswered, and nothing of an unfinished batch went
        before it (so a refusal is its answer)."""
        if not self.transaction_mode:
            scanner = self.scanner
            return scanner.watched - self.ready_count == 1 and not scanner.unsynced
        relay = self.relay
        queue = relay.queue
        return (
            not relay.swallowing
            and not relay.unsynced
            and not self.backlog
            and self.lease is not None
            and not self.lease.holding
            and bool(queue)
            and queue[-1].kind is SYNC
            and sum(1 for e in queue if e.kind is SYNC) == 1
        )

    def _send_again_freed(self, server, query: bytes, names: tuple[str, ...]) -> None:
        self.proxy.free_databases(names, self.id, server.node)
        write_now(server.transport, query)

    def _send_again(self, relay) -> None:
        items, relay.again = relay.again, None
        relay.replaying = True  # (once: if it fails again, the client hears why)
        try:
            self._client_items(items)
        finally:
            relay.replaying = False

    def reply_done(self, server: ServerConnection, status: int, data: bytes) -> None:
        """The linked server's read *data* ends with a ReadyForQuery (transaction *status*) and
        holds nothing else to look at: it goes out as it came, uncopied."""
        if self._refused is not None or (self.transaction_mode and self.relay.swallowing):
            # That ReadyForQuery may be the proxy's own, or end a refusal held back (_on_refusal).
            head = data[:-6]
            self._server_messages(server, ([head] if head else []) + [(_Z, data[-1:])])
            return
        if self.transaction_mode:
            relay = self.relay
            after: list = []
            relay.ready(status, after)
            server.scanner.capture = relay.capture()
            if self._tx_end and status == p.TX_IDLE:
                self._answering()
            write_now(self.transport, data + b"".join(after) if after else data)
        else:
            self.ready_count += 1
            if self._copy_syncs is not None:  # (the ReadyForQuery ending a COPY FROM STDIN)
                self.ready_count += self._copy_syncs
                self._copy_syncs = None
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
            server.setting_reported(key, value)
            if key == "search_path" and self.relay is not None:
                self.relay.scope = value

    def _ready(self, server: ServerConnection, status: int) -> None:
        self.tx_status = status
        server.tx_status = status
        ended = None
        if self._tx_end and status == p.TX_IDLE and (self.relay is None or self.relay.idle):
            # (Pipelined work behind it: its transaction ends with the last answer owed, not the
            # first ReadyForQuery, which may be an earlier statement's, before the DDL commits.)
            ended = self.lease
            self._transaction_ended()
        decision = self.decision
        started, self._asked_at = self._asked_at, None
        if started is not None:
            self.last_request = started  # (the janitor tells a busy client from an idle one: Proxy.expire_idle_clients)
        self.counters.ready(
            self.id,
            server.node,
            decision.want if decision is not None else "primary",
            status,
            None if started is None else self.proxy.clock.seconds() - started,
            self.database.name,
        )
        if status != p.TX_IDLE and self.config.idle_transaction_timeout:
            self._arm_idle_tx_timer()
        if self.transaction_mode:
            self._maybe_release()
        if ended is not None and ended.told is not None:
            # Its DDL's wait was told (_answering) and nothing claimed it: the connection stays
            # (the session was pinned since): probes of the primary bound the reads instead.
            token, ended.ddl = ended.told, False
            self.router.ddl_by_probe(token)
        if self.proxy.draining:
            drain.settle(self)  # shutting down: a client between transactions leaves now

    def _arm_idle_tx_timer(self) -> None:
        # Several ReadyForQuery may come before the client speaks again: keep only the last timer.
        self._cancel_idle_tx_timer()
        self._idle_tx_timer = self.proxy.clock.callLater(self.config.idle_transaction_timeout, self._idle_tx_timed_out)

    def _answered_here(self) -> None:
        """pgtwist answered the client's pending requests itself and owes nothing more: what _ready
        does for a node's answer. No request is pending any more (client_idle_timeout applies
        again; the next request's query_timeout and latency run from that request), and inside a
        transaction (an orphaned one too) the idle-in-transaction timer runs again."""
        started, self._asked_at = self._asked_at, None
        if started is not None:
            self.last_request = started
        status = self.relay.tx_status if self.relay is not None else self.tx_status
        if status != p.TX_IDLE and self.config.idle_transaction_timeout:
            self._arm_idle_tx_timer()

    def _answering(self) -> None:
        """The answer that ends a transaction is about to go to the client (ReadyForQuery, idle).
        Under workers = N, when that transaction sent DDL, the other workers hold their replica
        reads from now: told later (at the read-back), they could hear of it after the DDL's
        client had its answer and the application's next connection, on another worker, had read
        from a replica; told when the DDL was sent, they would send every read to the primary for
        as long as it ran (a migration, CREATE INDEX CONCURRENTLY). The wait's token is the
        lease's until its read-back settles it (DatabaseRouter.ddl_sent)."""
        if not self._tx_end & _SHARED_DDL:
            return
        worker = self.proxy.worker
        if worker is None:
            return
        # Their schema clocks too (the second time: _note_effects), before the client can act.
        worker.schema_changed(self.database.name)
        lease = self.lease
        if lease is not None and lease.ddl is True and lease.wrote and self.router.elsewhere is not None:
            lease.ddl = self.router.ddl_sent(self, lease) or True  # (not for DDL refused on a replica)

    def _transaction_ended(self, committed: bool = True) -> None:
        """What the open transaction left to do at its end; *committed* False: it rolled back
        without a node's word (an orphaned transaction's ROLLBACK), and its DDL is undone."""
        done, self._tx_end = self._tx_end, 0
        if committed and done & _DDL_SENT:
            self.temporaries = self.temporaries.ended()  # (ON COMMIT DROP)
            if done & _SHARED_DDL:
                self.relay.schema.ddl()  # (committed now: see _note_effects)
                self.router.schema_changed()  # (function volatility: the monitor reads pg_proc again)
            if self.pinned:
                lease = self.lease
                told = lease.told
                lease.ddl = False  # (a pinned session's lease lasts: its next DDL is told anew)
                if done & _SHARED_DDL or told is not None:
                    # No read-back on a pinned connection (_maybe_release): two probes of the
                    # primary instead. Not for DDL on its temporary relations alone (an ORM's
                    # temporary table per request would probe the primary each time).
                    self.router.ddl_by_probe(told)
        if done & _LOCAL_PATH and not ("search_path" in self.dirty or self.dirty_all):
            self.relay.scope = self.settings.get("search_path", "")

    def _maybe_release(self) -> None:
        """Transaction pooling: give the server connection back once the client is between transactions."""
        if self.state is not LINKED or self.pinned:
            return
        scanner = self.scanner
        # (What the client sent after a held-back write is not on the server: only the relay counts then.)
        lease = self.lease
        client_done = lease.holding or (scanner.at_boundary and scanner.last_type not in _UNSYNCED)
        if not (self.relay.idle and self.relay.tx_status == p.TX_IDLE and client_done):
            return
        server = self.server
        if not (self.dirty or self.dirty_all or self.router.clustered):
            self._pass_on(server, lease, True)  # (one node, settings as they were: nothing to read back)
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
        track_lsn = lease.used and (
            lease.wrote or (self.min_lsn == POSITION_UNKNOWN and self.decision is not None and self.decision.on_primary)
        )
        ddl = None
        told = lease.told
        if track_lsn:
            batches.append([_WRITE_LSN_SQL])
            if lease.ddl:
                # Until its position is read back, no client reads from a replica (DatabaseRouter.ddl_reading_back).
                ddl = self.router.ddl_reading_back(token=told)
        elif told is not None:
            self.router.ddl_untold(told)  # (nothing written there, a read-only link: no position to tell)
        lease.ddl = False
        if batches:
            self._enter(PREPARING)
            server.unlink()
            d = server.run_for_client(batches).addCallbacks(
                lambda _: self._read_back(server, names, track_lsn, ddl), lambda _: self._read_back_failed(server, track_lsn)
            )
            if ddl is not None:
                d.addBoth(_settled, ddl)  # (whatever went wrong on the way: the wait ends)
            d.addErrback(self.crashed)
            return
        # (In a cluster the next transaction is placed anew first, and stays on a kept connection
        # only if it belongs on this node: _placed_on. A routing hook may answer later: no lending.)
        self._pass_on(server, lease, not self.router.clustered or self.router.hook is None)

    def _pass_on(self, server: ServerConnection, lease: Lease, may_lend: bool) -> None:
        """Between transactions, nothing to read back: where the connection goes now.

        Lent, not returned, while nobody else wants it (*may_lend*): it stays linked, and the pool
        takes it back the moment someone does (reclaim), so the client's next transaction starts
        with no acquire, link or settings sync at all. With clients waiting, the oldest takes it,
        in place if it can (_hand_over; in a cluster too: the taker was placed on this node).
        Otherwise it goes back to its pool, and any work the client sent meanwhile is placed."""
        if not self.backlog:
            pool: Pool = server.pool
            if may_lend and self._lendable(server):
                lease.lent = True
                pool.lend(server, self)
                return
            if pool.waiters:
                self._hand_over(server)
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
        lease = self.lease
        lease.async_commit = False
        if decision is None or not decision.on_primary or not self.config.read_your_writes or not self.router.clustered:
            lease.wrote = False
            lease.watch = 0
        elif known and decision.classification.read_only:
            lease.wrote = False
            lease.watch = _WATCH_ALL | _WATCH_FIRST
        else:
            lease.wrote = True
            lease.watch = 0

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
            self.lease.wrote = True
            watch = 0
        self.lease.watch = watch
        return watch

    def _lendable(self, server: ServerConnection) -> bool:
        """May *server* stay with this client between its transactions? Not while others wait for
        the pool, it is paused or pgtwist drains, nor when it is to be closed at release (tainted:
        RECONNECT, an unsure session state)."""
        pool: Pool = server.pool
        return not pool.waiters and not pool.paused and not self.proxy.draining and not server.tainted

    def reclaim(self, server) -> None:
        """The pool needs the connection this client holds between transactions: give it back now."""
        if self.state is LINKED and self.server is server and self.lease.lent:
            self._give_back(server)

    def _read_back_failed(self, server, track_lsn: bool = False) -> None:
        """The server connection ended while the proxy read back what the client's transaction left.
        (A DDL's wait ends with no position: _settled, chained after this.)"""
        self.server = None
        if track_lsn:
            self.min_lsn = POSITION_UNKNOWN  # (its write committed; where it ends is not known)
        said = server.fatal
        self.router.server_ended(server.node, said, "connection lost after a transaction")
        if said is not None and said.get("C") == sqlstate.PROTOCOL_VIOLATION and self.state is not CLOSED:
            # What the client sent last made the node hang up: the client goes with the node's words.
            self.fatal_fields(dict(said, S="FATAL", V="FATAL"))
            return
        if self.state is not CLOSED:
            self._enter(IDLE)
            self.resume_reading()
            if self.backlog:
                self.placement.place()

    def _read_back(self, server, names: list[str], track_lsn: bool, ddl=None) -> None:
        rows = server.internal_rows
        if names:
            if rows and len(rows[0]) == len(names):
                for name, value in zip(names, rows[0]):
                    if value is None:
                        self.settings.pop(name, None)
                    else:
                        self.settings[name] = value.decode("utf-8", "replace")
                server.settings_synced(self.settings)
                self.relay.scope = self.settings.get("search_path", "")
            else:
                server.taint("the settings read back did not come")
        if track_lsn:
            position = POSITION_UNKNOWN
            if rows and len(rows[-1]) == 3 and None not in rows[-1]:
                insert, flush, synchronous_commit = (v.decode("ascii", "replace") for v in rows[-1])
                if self.lease.async_commit:
                    synchronous_commit = "off"  # (the session's value is back; the commit had its own)
                try:
                    position = write_lsn(parse_lsn(insert), parse_lsn(flush), synchronous_commit)
                except ValueError:
                    pass
            if ddl is not None:
                ddl(None if position == POSITION_UNKNOWN else position)  # (every session's replica reads wait for it)
            # A position read on the primary covers every earlier write of this client there,
            # one whose position was never read back included.
            self.min_lsn = position if self.min_lsn == POSITION_UNKNOWN else max(self.min_lsn, position)
        if self.state is CLOSED:
            self.server = self.lease = None
            server.pool.release(server, reusable=True, reset=False)
            return
        self._give_back(server, linked=False)

    def _give_back(self, server, linked: bool = True) -> None:
        self.lease = None
        if linked:
            server.unlink()
        self.server = None
        self._enter(IDLE)
        server.pool.release(server, reusable=True, reset=False)
        self.resume_reading()
        if self.backlog:  # the client moved on while its settings were read back
            self.placement.place()

    def _owes_nothing(self) -> bool:
        """The linked server owes this client no answer and is not mid-conversation with it."""
        scanner = self.scanner
        if self.relay is not None:
            in_flight = not self.relay.idle
        else:
            in_flight = scanner.watched != self.ready_count or self._copy_syncs is not None
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
            return bool(self.pinned or self.lease.lent) and self.relay.idle and self.relay.tx_status == p.TX_IDLE
        return self.tx_status == p.TX_IDLE and self._owes_nothing()

    def _release_server(self, why: str) -> None:
        """The client is gone (or failed, *why*): return its server connection, or close it if the node is still busy for it."""
        server, self.server = self.server, None
        self.lease = None
        if server is None:
            return
        reusable = self._owes_nothing()
        if server.linked:
            server.unlink()
        if not reusable:
            # The node is still working for a client who left: stop that work, then drop the connection.
            log.info(
                "client {client} left ({why}) while server {server} still owed it an answer: cancelled, connection closed",
                client=self.id,
                server=server.id,
                why=why,
            )
            self.proxy.cancel_server(server)
        elif self.pinned and self.transaction_mode and not analysis.session_effects(server.pool.settings.reset_query).discard_all:
            # What pinned it (SET ROLE, a temporary table, LISTEN, a session lock, a cursor WITH
            # HOLD) is still on the connection, and server_reset_query does not undo it all: often
            # empty for transaction pooling (PgBouncer uses none there), or RESET ALL or DEALLOCATE
            # ALL, which leave the role and the tables. The next client of the pool would run as
            # that role, with those tables: it is closed instead. (DISCARD ALL undoes it all.)
            server.taint(f"pinned ({self.pinned}) and server_reset_query does not DISCARD ALL")
        server.pool.release(server, reusable=reusable, reset=not self.transaction_mode or bool(self.pinned))

    # -- timers -------------------------------------------------------------------------------

    def _cancel_idle_tx_timer(self) -> None:
        timer, self._idle_tx_timer = self._idle_tx_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def idle_at_rest(self) -> bool:
        """Between requests and outside any transaction, logged in (client_idle_timeout may apply)."""
        return (self.state is IDLE or self.state is LINKED) and self._asked_at is None and self.tx_status == p.TX_IDLE

    def idle_timed_out(self, limit: float) -> None:
        """client_idle_timeout: closed with PgBouncer's words and PostgreSQL's SQLSTATE for an idle session."""
        self.fatal(
            sqlstate.IDLE_SESSION_TIMEOUT,
            "client_idle_timeout",
            f"The client sent nothing for {limit:g} s between transactions (pgtwist's client_idle_timeout).",
        )

    def _idle_tx_timed_out(self) -> None:
        self._idle_tx_timer = None
        if (self.state is LINKED and self.tx_status != p.TX_IDLE) or (self.orphaned and self.state is IDLE):
            # (An orphaned transaction is idle in a failed transaction, as PostgreSQL would call it.)
            self.fatal(sqlstate.IDLE_IN_TRANSACTION_SESSION_TIMEOUT, "terminating connection due to idle-in-transaction timeout")

    # -- ending --------------------------------------------------------------------------

    def crashed(self, failure) -> None:
        """A bug of ours in a callback: log it, tell the client plainly, keep serving everyone else."""
        log.failure("client {client}: internal error", failure, client=self.id)
        if self.state is not CLOSED:
            self.fatal(sqlstate.INTERNAL_ERROR, "internal error in pgtwist; the proxy log has the details")

    def _refuse(self, e: Exception) -> None:
        """The client's bytes or its login failed (WireError, LoginError), or our code did: what the client is told.

        Call it from the except block, so that a bug's traceback reaches the log."""
        if isinstance(e, WireError) and e.silent:
            self._close_silently(e.message)
        elif isinstance(e, (WireError, LoginError)):
            self.fatal(e.sqlstate, e.message, e.detail)
        else:
            log.failure("client {client}: internal error", client=self.id)
            self.fatal(sqlstate.INTERNAL_ERROR, "internal error in pgtwist; the proxy log has the details")

    def _close_silently(self, why: str) -> None:
        """Bytes that are not the protocol (a first packet of impossible length): as PostgreSQL,
        log it and close without a word, for the sender would not read one."""
        log.info("client {client} closed without a reply: {why}", client=self.id, why=why)
        self._enter(CLOSED)
        self._stop_login_timeout()
        self.transport.loseConnection()

    def fatal(self, code: str, message: str, detail: str | None = None) -> None:
        self.fatal_fields(m.error_fields("FATAL", code, message, detail))

    def fatal_fields(self, fields: dict[str, str]) -> None:
        if self.state is CLOSED and self.transport.disconnecting:
            return
        log.info(
            "client {client} closed: {code} {message}", client=self.id, code=fields.get("C"), message=fields.get("M")
        )
        self.counters.error(fields.get("C"))
        if self.server is not None and self.state is LINKED:
            self._release_server(fields.get("C") or "fatal")
        # (While PREPARING, _prepared() returns the server once its internal query ends.)
        self._enter(CLOSED)
        self._cancel_idle_tx_timer()
        self.transport.write(m.error_response_from_fields(fields))
        self.transport.loseConnection()


def _settled(result, ddl):
    """End of a DDL's read-back, however it went: the wait it held every replica read in ends
    (a no-op once _read_back has ended it with the position it read)."""
    ddl(None)
    return result
