"""ClusterMonitor: each node's role, WAL position, lag and health, probed over one kept connection per node."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pgtwist.backend.login import ServerLogin, ServerLoginError
from pgtwist.cluster import catalog
from pgtwist.routing.policy import PRIMARY, REPLICA, NodeState, format_lsn, parse_lsn, resolve_primary
from pgtwist.transport.connect import NodeDialer, is_unix_host
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import WireError
from pgtwist.wire.framing import pop_messages

log = Logger()

# One round trip tells role, position, timeline and replay delay. pg_is_in_recovery() is read
# once so a promotion mid-query cannot mix a replica's answers with a primary's.
# - timeline: a primary's is the first 8 hex digits of its current WAL file name; a replica's is
#   what its WAL receiver streams (NULL without one, hence 0 = unknown; needs pg_read_all_stats).
# - delay: now() - last replayed commit grows forever on an idle primary although the replica is
#   caught up, so a replica that has replayed all it received reports 0.
# - upstream: whether a WAL receiver is streaming to the replica. Its row is there for anyone
#   while it runs; its status only for pg_read_all_stats (NULL otherwise: taken as streaming).
#   No row: its upstream is gone (the old primary died) and it follows nothing.
PROBE_SQL = (
    "SELECT s.r,"
    " (CASE WHEN s.r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,"
    " CASE WHEN s.r THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver), 0)"
    " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,"
    " CASE WHEN s.r THEN CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0"
    " ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END END,"
    " (CASE WHEN s.r THEN pg_last_wal_receive_lsn() END)::text,"
    " CASE WHEN s.r THEN coalesce((SELECT coalesce(status, 'streaming') = 'streaming' FROM pg_stat_wal_receiver), false) END"
    " FROM (SELECT pg_is_in_recovery() AS r) AS s"
)

# How often the primary's pg_proc is read again (function volatility, for routing), and how
# soon after a failed read. DDL seen through pgtwist asks for it at the next probe.
FUNCTIONS_REFRESH = 30.0
_FUNCTIONS_RETRY = 1.0

# Probe answers are a few dozen bytes; a node sending more is broken, not worth buffering.
_MAX_MESSAGE = 1 << 20


class ProbeError(Exception):
    """A probe or promotion query failed: refused, answered nonsense, or the connection went away."""


class _ConnectionGone(ProbeError):
    """The connection closed under a query (a kept one may have died of old age, not of the node)."""


class PromoteError(Exception):
    """pg_promote() did not promote the node."""


@implementer(IHandshakeListener)  # so the TLS layer tells us when the node is verified
class _NodeConnection(Protocol):
    """One monitoring connection: logs in with a ServerLogin, then runs simple queries, answered in order
    (a catalog read may be under way when a probe is due: the probe queues behind it)."""

    def __init__(self, login: ServerLogin, name: str, node_tls=None, host: str = ""):
        self.login = login
        self.name = name
        self.node_tls = node_tls  # tls.NodeTls when [server_tls] is on: probes are verified like traffic
        self.host = host
        self.tls_pending = node_tls is not None
        self.buf = bytearray()
        self.ready: defer.Deferred = defer.Deferred()  # fires (None) once logged in
        self.lost: defer.Deferred = defer.Deferred()  # fires (None) once the connection is gone, however
        self.connector = None
        self.connected = False
        self.closed = False
        self._waiting: deque[defer.Deferred] = deque()  # one per Query sent, oldest first
        self._rows: list[list[bytes | None]] = []
        self._error: str | None = None

    # -- Twisted callbacks ---------------------------------------------------------------------

    def connectionMade(self):
        self.connected = True
        if self.closed:  # closed while connecting: the real reactor may still complete it
            self.transport.abortConnection()
            return
        if self.node_tls is not None:
            self.transport.write(m.ssl_request())  # the login waits for a verified handshake
            return
        self.transport.write(self.login.start())

    def handshakeCompleted(self):
        if self.tls_pending:
            self.tls_pending = False
            self.transport.write(self.login.start())

    def dataReceived(self, data):
        if self.tls_pending:
            if self.node_tls is None:
                return  # (nothing arrives in the clear once the handshake has begun)
            try:
                start = self.node_tls.answer(data, self.name)
            except ServerLoginError as e:
                self._fail(e)
                return
            if start:
                handshake = self.node_tls.handshake(self.host)
                self.node_tls = None  # the TLS layer takes it from here; handshakeCompleted follows
                self.transport.startTLS(handshake)
            else:
                self.tls_pending = False
                self.transport.write(self.login.start())
            return
        self.buf += data
        try:
            messages = pop_messages(self.buf, _MAX_MESSAGE)
        except WireError as e:
            self._fail(ProbeError(f"node {self.name} broke the protocol: {e}"))
            return
        for msg_type, body in messages:
            if self.closed:
                return
            if not self.login.done:
                try:
                    reply = self.login.feed(msg_type, body)
                except ServerLoginError as e:
                    self._fail(e)
                    return
                if reply:
                    self.transport.write(reply)
                if self.login.done and not self.ready.called:
                    self.ready.callback(None)
            else:
                self._answer(msg_type, body)

    def connectionLost(self, reason=None):
        self._gone(_ConnectionGone(f"connection to node {self.name} lost"))

    def connect_failed(self, reason: Failure) -> None:
        self._gone(ProbeError(f"could not connect to node {self.name}: {reason.getErrorMessage()}"))

    # -- use -----------------------------------------------------------------------------------

    def query(self, sql: str) -> defer.Deferred:
        """Run *sql*; fires with its DataRows (lists of bytes/None), or fails with ProbeError."""
        if self.closed or self.transport is None:
            return defer.fail(ProbeError(f"connection to node {self.name} not usable"))
        d = defer.Deferred()
        self._waiting.append(d)
        self.transport.write(m.query(sql))
        return d

    def close(self) -> None:
        """Say goodbye politely (Terminate) and hang up."""
        if self.closed:
            return
        if self.connected and self.transport is not None:
            self.transport.write(m.terminate())
            self.transport.loseConnection()
            self._fail_pending(ProbeError(f"connection to node {self.name} closed"))
            self.closed = True
        else:
            self._stop_connecting()

    def abort(self) -> None:
        """Hang up now (a node that stopped answering would never read a Terminate)."""
        if self.closed:
            return
        if self.connected and self.transport is not None:
            self.transport.abortConnection()
            self._fail_pending(ProbeError(f"connection to node {self.name} aborted"))
            self.closed = True
        else:
            self._stop_connecting()

    # -- internals -----------------------------------------------------------------------------

    def _stop_connecting(self) -> None:
        if self.connector is not None:
            try:
                self.connector.stopConnecting()
            except Exception:  # already connected or failed: nothing left to stop
                pass
        self._gone(ProbeError(f"connection to node {self.name} abandoned"))

    def _answer(self, msg_type: int, body: bytes) -> None:
        if msg_type == p.DATA_ROW:
            self._rows.append(m.decode_data_row(body))
        elif msg_type == p.ERROR_RESPONSE:
            fields = m.decode_fields(body)
            self._error = fields.get("M", "error")
            if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                # The server is closing this connection (shutdown, idle timeout, terminated).
                self._fail(_ConnectionGone(f"node {self.name}: {self._error}"))
        elif msg_type == p.READY_FOR_QUERY:
            rows, error = self._rows, self._error
            self._rows, self._error = [], None
            if self._waiting:
                d = self._waiting.popleft()
                if error is not None:
                    d.errback(ProbeError(f"node {self.name}: {error}"))
                else:
                    d.callback(rows)
        elif msg_type in (p.ROW_DESCRIPTION, p.COMMAND_COMPLETE, p.NOTICE_RESPONSE, p.PARAMETER_STATUS,
                          p.NOTIFICATION_RESPONSE, p.EMPTY_QUERY_RESPONSE):
            pass
        else:
            self._fail(ProbeError(f"node {self.name} sent unexpected message {chr(msg_type)!r}"))

    def _fail(self, error: Exception) -> None:
        # The waiters hear the real reason before abort() would tell them "aborted".
        self._fail_pending(error)
        self.abort()

    def _fail_pending(self, error: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(error)
        while self._waiting:
            self._waiting.popleft().errback(error)

    def _gone(self, error: Exception) -> None:
        self.closed = True
        self._fail_pending(error)
        if not self.lost.called:
            self.lost.callback(None)


class _NodeConnectionFactory(ClientFactory):
    noisy = False

    def __init__(self, conn: _NodeConnection):
        self.conn = conn

    def buildProtocol(self, addr):
        return self.conn

    def clientConnectionFailed(self, connector, reason):
        self.conn.connect_failed(reason)


def _consume(failure: Failure) -> None:
    """End of a chain whose outcome was already acted on (a late answer to a timed-out probe)."""
    return None


class _Slot:
    """What the monitor keeps per node."""

    def __init__(self, node, state: NodeState):
        self.node = node
        self.state = state
        self.conn: _NodeConnection | None = None
        self.failures = 0  # consecutive failed probes
        self.timer = None  # the next scheduled probe
        self.deadline = None  # the running probe's timeout
        self.probing: object | None = None  # token of the running probe; late answers to others are ignored
        self.waiters: list[defer.Deferred] = []
        self.delay: float | None = None  # the replica's replay delay as probed, before the caught-up rule
        self.aside_until = 0.0  # (step_aside: no probe connection to the node before then)


# A down node is probed again after interval, 2 x interval ... at most this: a primary restarted
# (pg_ctl restart, a minor upgrade: seconds) is seen back, and takes writes, within this of its
# start; at 10 s a 5 s restart kept writes away for 7.5 s (the primary-restart drill). Probing a
# dead node this often costs it one refused connection per probe.
BACKOFF_MAX = 2.0
# ... unless the node answered and refused the probe's login (a wrong health_user password, a
# pg_hba rule, a database dropped): nothing a restart fixes soon, and each attempt is a FATAL in
# the node's log (and may count towards an account lockout): as far apart as before, 10 s.
REFUSED_BACKOFF_MAX = 10.0
# (The SQLSTATE classes of a node that is there and says no, not of one on its way up or down.)
_REFUSALS = ("28", "3D", "42")


class ClusterMonitor:
    """Probes every node of one database every *interval* seconds; keeps ``states`` current.

    A failed probe marks the node down and retries after interval * 2^(n-1) (n failures in a
    row), at most *backoff_max*. After every probe the split brain rule runs (resolve_primary)
    and lags are recomputed; *on_change(state, what)* hears "up", "down", "promoted",
    "demoted", "fenced" and "unfenced".

    The login needs no privilege for roles and positions; replica timelines need pg_monitor
    (pg_stat_wal_receiver hides received_tli otherwise), and promote() needs a superuser or
    ``GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO <user>``.

    With *functions_refresh* (seconds), it also reads pg_proc's function volatility on the
    primary's probe connection that often (and at the next probe after functions_changed()),
    into ``functions``: routing asks it whether ``SELECT f()`` may write, and never waits for it.
    """

    def __init__(
        self,
        reactor,
        nodes: list,
        login_factory: Callable[[object], ServerLogin],
        *,
        node_tls=None,
        dialer: NodeDialer | None = None,
        interval: float = 1.0,
        timeout: float = 2.0,
        backoff_max: float = BACKOFF_MAX,
        on_change: Callable[[NodeState, str], None] | None = None,
        functions_refresh: float | None = None,
    ):
        self.reactor = reactor
        self.login_factory = login_factory
        self.node_tls = node_tls
        self.dialer = dialer if dialer is not None else NodeDialer(reactor)
        self.interval = interval
        self.timeout = timeout
        self.backoff_max = max(backoff_max, interval)
        self.on_change = on_change
        self.running = False
        self.functions: catalog.FunctionVolatility = catalog.NOT_FETCHED
        self.functions_refresh = functions_refresh
        self._functions_due = 0.0
        self._functions_loading = False
        self._ddl_seen = 0  # functions_changed() calls: a read begun before the last one is stale
        self._slots: dict[str, _Slot] = {}
        self.states: dict[str, NodeState] = {}
        for node in nodes:
            name = str(node)
            state = NodeState(name=name)
            self.states[name] = state
            self._slots[name] = _Slot(node, state)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Probe every node now, then keep probing."""
        if self.running:
            return
        self.running = True
        for slot in self._slots.values():
            self._probe(slot)

    def stop(self) -> defer.Deferred:
        """Stop probing and close the connections; fires once they are closed (or after *timeout*)."""
        self.running = False
        conns = []
        for slot in self._slots.values():
            self._cancel(slot)
            slot.probing = None
            if slot.conn is not None:
                slot.conn.close()
                conns.append(slot.conn)
                slot.conn = None
            self._release_waiters(slot)
        pending = [c.lost for c in conns if not c.lost.called]
        if not pending:
            return defer.succeed(None)
        done = defer.Deferred()
        left = [len(pending)]

        def finish(_=None):
            if timer.active():
                timer.cancel()
            for c in conns:  # a node that never acknowledged the goodbye
                if not c.lost.called and c.transport is not None:
                    c.transport.abortConnection()
            if not done.called:
                done.callback(None)

        def one_lost(_):
            left[0] -= 1
            if left[0] == 0:
                finish()

        timer = self.reactor.callLater(self.timeout, finish)
        for d in pending:
            d.addBoth(one_lost)
        return done

    # -- what the proxy calls ------------------------------------------------------------------

    def mark_down(self, name: str, reason: str) -> None:
        """Live traffic to *name* failed: down now, and a probe right away decides when it is back."""
        slot = self._slots.get(name)
        if slot is None or not slot.state.up:
            return  # already down: its backoff schedule stands (many connections fail at once)
        before = self._snapshot()
        slot.state.up = False
        slot.state.last_error = reason
        log.warn("node {node} marked down by live traffic: {reason}", node=name, reason=reason)
        self._settle(before)
        if self.running and slot.probing is None:
            # The kept connection probably died with the node; a fresh connect fails fast.
            self._drop_conn(slot)
            self._probe(slot)

    def verify(self, name: str, reason: str) -> None:
        """Live traffic saw something that may be about *name* or only about one of its
        connections (57P01: a fast shutdown or a pg_terminate_backend()): probe it now, and let
        only a failed probe mark it down. Probes in flight are shared, so a flood costs one."""
        slot = self._slots.get(name)
        if slot is None or not slot.state.up or not self.running or slot.probing is not None:
            return
        log.info("node {node}: {reason}; probing it now", node=name, reason=reason)
        self._probe(slot)

    def step_aside(self, name: str, seconds: float) -> None:
        """Close the probe connection to *name* and open none for *seconds*, the node's state
        kept as last probed: a client's DROP DATABASE (or ALTER DATABASE ... RENAME) of this
        database was refused because sessions are in it, and this connection is one of them
        (session/dropdb.py). A probe under way ends first."""
        slot = self._slots.get(name)
        if slot is None or not self.running:
            return
        now = self.reactor.seconds()
        if slot.aside_until > now:
            return  # (already aside: a DROP retried in a loop must not keep the node unprobed for ever)
        slot.aside_until = now + seconds
        if slot.probing is None:
            self._step_aside_now(slot)

    def _step_aside_now(self, slot: _Slot) -> None:
        conn, slot.conn = slot.conn, None
        if conn is not None:
            conn.close()  # (a Terminate: the node's session ends at once)
            conn.ready.addErrback(_consume)
        self._schedule(slot, max(slot.aside_until - self.reactor.seconds(), 0.0))

    def probe_now(self, name: str | None = None) -> defer.Deferred:
        """Probe *name* (or every node) now; fires with its NodeState (or the whole ``states`` dict)."""
        if name is not None:
            slot = self._slots.get(name)
            if slot is None:
                return defer.fail(KeyError(name))
            return self._wait_probe(slot)
        ds = [self._wait_probe(slot) for slot in self._slots.values()]
        d = defer.gatherResults(ds)
        d.addCallback(lambda _: self.states)
        return d

    def promote(self, name: str, wait_seconds: int = 60) -> defer.Deferred:
        """Run ``SELECT pg_promote(true, wait_seconds)`` on *name*; fires with its NodeState re-probed.

        Fails with PromoteError when the node refuses (not a replica, no privilege) or the
        promotion does not finish in time.
        """
        slot = self._slots.get(name)
        if slot is None:
            return defer.fail(KeyError(name))
        try:
            conn = self._connect(slot)
        except Exception as e:
            return defer.fail(PromoteError(f"cannot promote node {name}: {e}"))
        timed_out = []

        def expire():
            timed_out.append(True)
            conn.abort()

        timer = self.reactor.callLater(wait_seconds + self.timeout, expire)
        d = conn.ready
        d.addCallback(lambda _: conn.query(f"SELECT pg_promote(true, {int(wait_seconds)})"))

        def finished(result):
            if timer.active():
                timer.cancel()
            conn.close()
            return result

        def promoted(rows):
            if not rows or not rows[0] or rows[0][0] != b"t":
                raise PromoteError(f"node {name} did not finish promoting within {wait_seconds}s")
            log.info("node {node} promoted", node=name)
            return self.probe_now(name) if self.running else slot.state

        def failed(failure):
            if failure.check(PromoteError):
                return failure
            if timed_out:
                raise PromoteError(f"promoting node {name}: no answer within {wait_seconds + self.timeout:g}s")
            why = failure.value.fields.get("M") if failure.check(ServerLoginError) else failure.getErrorMessage()
            raise PromoteError(f"promoting node {name} failed: {why}")

        d.addBoth(finished)
        d.addCallback(promoted)
        d.addErrback(failed)
        return d

    def functions_changed(self) -> None:
        """DDL went through pgtwist (a function may be new, or no longer volatile): read pg_proc at the next probe."""
        self._ddl_seen += 1
        self._functions_due = 0.0

    def most_caught_up_replica(self) -> NodeState | None:
        """The up, unfenced replica that will have the most WAL once promoted (what it received, then replayed)."""
        replicas = sorted(
            (s for s in self.states.values() if s.usable and s.role == REPLICA), key=lambda s: s.name
        )
        if not replicas:
            return None
        return max(replicas, key=lambda s: (s.timeline, max(s.receive_lsn, s.lsn), s.lsn))

    # -- probing -------------------------------------------------------------------------------

    def _wait_probe(self, slot: _Slot) -> defer.Deferred:
        if not self.running:
            return defer.succeed(slot.state)
        d = defer.Deferred()
        slot.waiters.append(d)
        if slot.probing is None:
            self._probe(slot)
        return d

    def _connect(self, slot: _Slot) -> _NodeConnection:
        node = slot.node
        node_tls = None if is_unix_host(node.host) else self.node_tls  # (PostgreSQL has no TLS on a Unix socket)
        conn = _NodeConnection(self.login_factory(node), slot.state.name, node_tls, node.host)
        conn.connector = self.dialer.connect(node.host, node.port, _NodeConnectionFactory(conn), timeout=self.timeout)
        return conn

    def _probe(self, slot: _Slot) -> None:
        if not self.running or slot.probing is not None:
            return
        wait = slot.aside_until - self.reactor.seconds()
        if wait > 0:  # (step_aside: whoever asks, the probe waits until then; its waiters with it)
            self._schedule(slot, wait)
            return
        self._cancel(slot)
        token = slot.probing = object()
        slot.deadline = self.reactor.callLater(
            self.timeout, self._probe_failed, slot, token, f"no answer within {self.timeout:g}s"
        )
        self._attempt(slot, token, fresh=False)

    def _attempt(self, slot: _Slot, token, fresh: bool) -> None:
        try:
            conn = slot.conn
            reused = conn is not None and not conn.closed and not fresh
            if not reused:
                self._drop_conn(slot)
                conn = slot.conn = self._connect(slot)
                d = conn.ready
                d.addCallback(lambda _: conn.query(PROBE_SQL))
            else:
                d = conn.query(PROBE_SQL)
        except Exception as e:  # a broken login_factory must not stop the monitor
            self._probe_failed(slot, token, f"cannot probe: {e}")
            return
        d.addCallbacks(
            self._probe_answered, self._probe_errback, callbackArgs=(slot, token), errbackArgs=(slot, token, reused)
        )
        d.addErrback(lambda f: log.failure("probe of node {node} crashed", f, node=slot.state.name))

    def _probe_errback(self, failure: Failure, slot: _Slot, token, reused: bool) -> None:
        if reused and failure.check(_ConnectionGone) and slot.probing is token and self.running:
            # The kept connection was closed under us (idle timeout, a restart between probes):
            # that says nothing about the node yet; a fresh connection, same deadline, does.
            self._attempt(slot, token, fresh=True)
            return
        missing = refused = False
        if failure.check(ServerLoginError):
            why = failure.value.fields.get("M", "login failed")
            code = failure.value.fields.get("C") or ""
            missing = code == sqlstate.INVALID_CATALOG_NAME
            refused = code[:2] in _REFUSALS
        else:
            why = failure.getErrorMessage()
        self._probe_failed(slot, token, why, missing, refused)

    def _probe_answered(self, rows, slot: _Slot, token) -> None:
        if slot.probing is not token:
            return
        try:
            recovery, lsn, timeline, delay, receive, upstream = rows[0]
            role = REPLICA if recovery == b"t" else PRIMARY
            lsn_value = parse_lsn(lsn.decode()) if lsn else 0
            timeline_value = int(timeline) if timeline else 0
            delay_value = float(Decimal(delay.decode())) if delay is not None else None
            receive_value = parse_lsn(receive.decode()) if receive else 0
            upstream_value = None if upstream is None else upstream == b"t"
        except (IndexError, ValueError, TypeError, InvalidOperation, UnicodeDecodeError):
            self._probe_failed(slot, token, "unexpected answer to the health probe")
            return
        self._end_probe(slot)
        before = self._snapshot()
        state = slot.state
        was_replica = state.role == REPLICA
        state.up = True
        state.role = role
        if role == REPLICA and timeline_value == 0 and was_replica:
            # The WAL receiver is gone (and its timeline with it); the replica has not moved to
            # another history without one, so what it last streamed is still its timeline: that
            # is what tells a replica left behind by a failover, and auto_promote's choice.
            timeline_value = state.timeline
        state.lsn = lsn_value
        state.timeline = timeline_value
        state.upstream = upstream_value
        state.receive_lsn = max(receive_value, lsn_value) if role == REPLICA else lsn_value
        state.last_error = None
        state.database_missing = False
        state.checked_at = self.reactor.seconds()
        slot.delay = delay_value
        slot.failures = 0
        self._settle(before)
        self._schedule(slot, self.interval)
        self._release_waiters(slot)
        if slot.aside_until > self.reactor.seconds():
            self._step_aside_now(slot)  # (asked while this probe ran)
            return
        self._maybe_fetch_functions(slot)

    # -- function volatility (pg_proc), for routing ----------------------------------------------

    def _maybe_fetch_functions(self, slot: _Slot) -> None:
        if self.functions_refresh is None or self._functions_loading or not self.running:
            return
        if self.reactor.seconds() < self._functions_due:
            return
        state = slot.state
        if state.role != PRIMARY or state.fenced:
            # Any node's catalog will do while there is no primary (a failover): it is the same.
            if any(s.up and s.role == PRIMARY and not s.fenced for s in self.states.values()):
                return
        conn = slot.conn
        if conn is None or conn.closed:
            return
        self._functions_loading = True
        d = conn.query(catalog.FUNCTIONS_SQL)
        d.addCallbacks(
            self._functions_fetched, self._functions_failed, callbackArgs=(self._ddl_seen,), errbackArgs=(state.name,)
        )
        d.addErrback(lambda f: log.failure("reading function volatility crashed", f))

    def _functions_fetched(self, rows, ddl_seen: int) -> None:
        self._functions_loading = False
        self.functions = catalog.function_volatility(rows)
        stale = ddl_seen != self._ddl_seen  # (DDL committed while pg_proc was being read)
        self._functions_due = 0.0 if stale else self.reactor.seconds() + self.functions_refresh

    def _functions_failed(self, failure: Failure, node: str) -> None:
        self._functions_loading = False
        self._functions_due = self.reactor.seconds() + _FUNCTIONS_RETRY
        if self.running:  # (stop() fails what is under way: nothing to say then)
            log.warn("cannot read function volatility from node {node}: {why}", node=node, why=failure.getErrorMessage())

    def _probe_failed(self, slot: _Slot, token, why: str, database_missing: bool = False, refused: bool = False) -> None:
        if slot.probing is not token:
            return
        self._end_probe(slot)
        self._drop_conn(slot)
        slot.failures += 1
        before = self._snapshot()
        state = slot.state
        if state.up or state.last_error != why:
            log.warn("node {node} is down: {reason}", node=state.name, reason=why)
        state.up = False
        state.last_error = why
        state.database_missing = database_missing
        slot.delay = None
        self._settle(before)
        self._schedule(slot, self._backoff(slot.failures, refused))
        self._release_waiters(slot)

    def _backoff(self, failures: int, refused: bool = False) -> float:
        cap = max(self.backoff_max, REFUSED_BACKOFF_MAX) if refused else self.backoff_max
        return min(self.interval * 2 ** max(failures - 1, 0), cap)

    def _end_probe(self, slot: _Slot) -> None:
        slot.probing = None
        if slot.deadline is not None and slot.deadline.active():
            slot.deadline.cancel()
        slot.deadline = None

    def _drop_conn(self, slot: _Slot) -> None:
        conn, slot.conn = slot.conn, None
        if conn is not None:
            conn.abort()
            # Its pending Deferreds may still fail after we stopped caring.
            conn.ready.addErrback(_consume)

    def _schedule(self, slot: _Slot, delay: float) -> None:
        self._cancel_timer(slot)
        if self.running:
            slot.timer = self.reactor.callLater(delay, self._probe, slot)

    def _cancel_timer(self, slot: _Slot) -> None:
        if slot.timer is not None and slot.timer.active():
            slot.timer.cancel()
        slot.timer = None

    def _cancel(self, slot: _Slot) -> None:
        self._cancel_timer(slot)
        if slot.deadline is not None and slot.deadline.active():
            slot.deadline.cancel()
        slot.deadline = None

    def _release_waiters(self, slot: _Slot) -> None:
        waiters, slot.waiters = slot.waiters, []
        for d in waiters:
            d.callback(slot.state)

    # -- after every probe ---------------------------------------------------------------------

    def _snapshot(self) -> dict[str, tuple]:
        return {name: (s.up, s.role, s.fenced) for name, s in self.states.items()}

    def _settle(self, before: dict[str, tuple]) -> None:
        """Split brain rule, lags, then tell on_change what changed."""
        states = list(self.states.values())
        primary = resolve_primary(states)
        # Without a primary, the reference is what the replicas of a timeline replayed the most
        # of: nothing new is written then, so one behind another stays behind (a frozen primary
        # streams nothing), and would serve what is older than what other clients already read
        # or were told was committed (policy.read_exclusion).
        freshest: dict[int, int] = {}
        if primary is None:
            for s in states:
                if s.up and s.role == REPLICA and not s.fenced and s.lsn:
                    freshest[s.timeline] = max(freshest.get(s.timeline, 0), s.lsn)
        for name, s in self.states.items():
            if not s.up:
                s.lag_bytes = s.lag_seconds = None
            elif s.role == PRIMARY:
                s.lag_bytes, s.lag_seconds = 0, 0.0
            else:
                reference = primary.lsn if primary is not None else freshest.get(s.timeline)
                s.lag_bytes = max(0, reference - s.lsn) if reference is not None else None
                s.lag_seconds = self._slots[name].delay
                if primary is not None and s.lag_bytes == 0:
                    s.lag_seconds = 0.0  # replayed all the primary had: any delay is an idle primary
        for name, s in self.states.items():
            was_up, was_role, was_fenced = before[name]
            events = []
            if s.up != was_up:
                events.append("up" if s.up else "down")
            if s.up and was_role != s.role and was_role != "unknown":
                events.append("promoted" if s.role == PRIMARY else "demoted")
            if s.fenced != was_fenced:
                events.append("fenced" if s.fenced else "unfenced")
            for what in events:
                self._tell(s, what)

    def _tell(self, state: NodeState, what: str) -> None:
        if what == "up":
            log.info("node {node} is up: {role} at {lsn} on timeline {tl}", node=state.name, role=state.role,
                     lsn=format_lsn(state.lsn), tl=state.timeline)
        elif what == "fenced":
            log.warn("node {node} fenced: it claims to be primary but another primary has a newer history",
                     node=state.name)
        elif what != "down":
            log.info("node {node} {what}", node=state.name, what=what)
        if self.on_change is not None:
            try:
                self.on_change(state, what)
            except Exception:
                log.failure("on_change failed for node {node} ({what})", node=state.name, what=what)
