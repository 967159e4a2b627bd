"""Server connections for one (database, user, node): idle and busy sets, FIFO waiters, reset on return."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred  # (compiled: a global read, not a module's attribute, per handoff)
from twisted.logger import Logger
from twisted.python.failure import Failure

from pgtwist.backend.connection import IDLE
from pgtwist.backend.login import ServerLoginError
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.pooling.errors import PoolError

log = Logger(namespace=__name__)  # (named: compiled, the module has no frame Logger could read it from)

LOGIN_CACHE_LIMIT = 1000  # startup-settings combinations remembered per pool
WARM_BACKOFF_MAX = 60.0  # seconds between attempts at a warm connection that keeps failing


@dataclass(frozen=True)
class PoolSettings:
    """The limits a pool runs with; made from the config by one function, at start-up and on reload alike."""

    size: int
    reset_query: str = ""
    wait_timeout: float = 0.0  # query_wait_timeout (0: wait for ever)
    max_prepared_statements: int = 100
    min_size: int = 0
    idle_timeout: float = 0.0
    lifetime: float = 0.0
    check_query: str = ""  # server_check_query ("": never), run on a connection idle check_delay s before reuse
    check_delay: float = 30.0
    # The proxy's own statements on a connection (reset, check, settings sync, auth_query) must be
    # answered within this, or the connection is given up (0: wait for ever).
    internal_timeout: float = 0.0
    # reserve_pool_size: connections beyond size, for clients that waited reserve_pool_timeout
    # (pooling/limits.py). auth_query's own pools have none: the reserve is for clients.
    reserve: int = 0

    @classmethod
    def from_config(cls, config, database) -> "PoolSettings":
        return cls(
            size=database.pool_size,
            reset_query=config.server_reset_query,
            wait_timeout=config.query_wait_timeout,
            max_prepared_statements=config.max_prepared_statements,
            min_size=config.min_pool_size,
            idle_timeout=config.server_idle_timeout,
            lifetime=config.server_lifetime,
            check_query=config.server_check_query,
            check_delay=config.server_check_delay,
            internal_timeout=internal_timeout(config),
            reserve=getattr(database, "reserve_pool_size", 0) or 0,
        )


def internal_timeout(config) -> float:
    """How long the proxy's own statements may go unanswered: query_timeout, the bound a client's
    statement has, when set; else server_connect_timeout, as those statements are part of getting
    a server connection ready for use, and as small as a login's round trips."""
    return config.query_timeout or config.server_connect_timeout


class Pool:
    """At most ``size`` connections to one node for one (database, user).

    A connection is in exactly one place: ``idle`` (ready to hand out), ``busy`` (a client or
    a reset has it) or ``connecting`` (login under way). Waiters are served first come, first served.

    A waiter is either a Deferred (``acquire()``) or, on the per-transaction path, an object with
    ``server_ready(conn)`` and ``server_unavailable(failure)`` (``wait_for()``): handing a
    connection to it is one method call, with no Deferred. Every waiter of a pool waits at most
    the same ``wait_timeout``, so the oldest always expires first: one timer per pool, re-armed
    only when it fires, bounds them all (never one reactor call per waiter).
    """

    def __init__(
        self,
        key,
        node,
        database,
        user: str,
        settings: PoolSettings,
        *,
        connect,
        clock,
    ):
        self.key = key
        self.node = node
        self.database = database
        self.user = user
        self.settings = settings  # replaced whole by reconfigure(), never edited
        self.connect = connect  # (pool) -> Deferred[ServerConnection], fires after login
        self.clock = clock
        self.idle: deque = deque()
        self.busy: set = set()
        self.connecting = 0
        self.waiters: deque = deque()  # Deferreds and waiter objects, oldest first
        self._waits: dict = {}  # waiter -> since when it waits
        self._timer: Any = None  # the one query_wait_timeout timer, due when the oldest waiter is
        self.paused = False
        self.retired = False  # removed by a reload: connections close when their clients are done
        self.waits = 0  # acquisitions that had to wait, and for how long in total (for metrics)
        self.wait_seconds = 0.0
        self.yielded = 0  # connections closed to make room for another pool's clients under a shared limit
        self.shrinking = False  # pool_size lowered by a reload: connections over it close as they come back
        # min_pool_size's warm connections: failed attempts in a row, and no new one before then.
        self._warm_failures = 0
        self._warm_after = 0.0
        # ParameterStatus sets seen by clients logging in with given startup settings, so that
        # a transaction-mode login needs no server connection once the pool has seen its like.
        # Per pool, so per (database, user, node): session_authorization and is_superuser are
        # the user's, server_version and in_hot_standby the node's. Forgotten whenever the node
        # may have changed (node_changed) or a new connection's login says something else.
        self.login_parameters: dict[tuple, dict[str, str]] = {}
        self._login_seen: dict[str, str] | None = None  # what the last new connection's login reported
        self.lent: dict = {}  # busy connection -> the ClientSession keeping it between transactions
        # ConnectionLimits shared with other pools (max_db_connections ...); None: pool_size only.
        # (Any: what limits.py returns is its own business, not checked again by the compiled pool.)
        self.limits: Any = None
        # server_check_query / server_check_delay: idle connections the janitor found idle that long
        # (``stale``) run the query before they are handed out; ``testing`` ones run it now (busy).
        self.stale: set = set()
        self.testing: set = set()
        self.resetting: set = set()  # busy running ROLLBACK / server_reset_query after their client left
        # Given back while a CancelRequest for its last client is on its way to the node: held (busy)
        # until the node has it, with release()'s arguments, so that the cancel cannot land on the
        # next client's statement (PgBouncer's sv_being_canceled). conn -> (reusable, reset).
        self.being_canceled: dict = {}

    def __repr__(self):
        return f"<Pool {self.key} idle={len(self.idle)} busy={len(self.busy)} connecting={self.connecting} waiting={len(self.waiters)}>"

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.busy) + self.connecting

    # -- handing out ------------------------------------------------------------------------

    def take_idle(self):
        """An idle connection right now (now busy), or None; never jumps the queue of waiters.

        With none idle, one lent to a client between its transactions is taken back for it.
        Last in, first out (as PgBouncer's default): a client coming back at once gets the
        connection it just gave back, where its unnamed statement still is (transaction
        pooling), and surplus connections stay idle long enough for server_idle_timeout.
        """
        if self.waiters or self.paused:
            return None
        if not self.idle and self.lent:
            self._reclaim_one()
        conn = self._pop_checked_idle() if self.idle else None
        if conn is not None:
            self.busy.add(conn)
        return conn

    # -- lending (transaction pooling): busy, but reclaimable at once --------------------------

    def lend(self, conn, session) -> None:
        """*conn* stays with *session* between its transactions until somebody else needs it."""
        self.lent[conn] = session

    def unlend(self, conn) -> None:
        self.lent.pop(conn, None)

    def _reclaim_one(self) -> None:
        self._reclaim(next(iter(self.lent)))

    def _reclaim(self, conn) -> None:
        """Take *conn* back from the client keeping it between transactions."""
        session = self.lent.pop(conn)
        session.reclaim(conn)  # -> release() -> idle, and _serve() for any waiter

    def reclaim_all(self) -> None:
        while self.lent:
            self._reclaim_one()

    def let_go(self) -> int:
        """Close every connection not in use now (idle, or lent to a client between its
        transactions; those in use are left alone); returns how many. For a database about to
        be dropped, renamed or copied, which PostgreSQL refuses while another session is in it."""
        self.reclaim_all()
        # (A login remembered here would let the next client in without a node to ask: after a
        # DROP it must hear PostgreSQL's 3D000, as a direct login would.)
        self.login_parameters.clear()
        closed = 0
        while self.idle:
            conn = self.idle.pop()  # (out of the list at once: closing completes a turn later)
            self.stale.discard(conn)
            conn.close()
            closed += 1
        return closed

    def acquire(self) -> defer.Deferred:
        """A Deferred firing with a logged-in, idle ServerConnection (now busy), or failing with PoolError."""
        d = defer.Deferred(self.cancel_wait)
        self.wait_for(d)
        return d

    def wait_for(self, waiter) -> None:
        """Queue *waiter* (a Deferred, or an object with server_ready / server_unavailable)."""
        self._waits[waiter] = self.clock.seconds()
        self.waiters.append(waiter)
        # (With none idle or lent, and the pool full without a reserve, _serve has nothing to give
        # or open, whatever the shared limits say (_room): the commonest case once clients
        # outnumber connections, once per transaction. Any other case is _serve's to decide, since
        # asking the shared limits may close another pool's idle connection.)
        if self.idle or self.lent or self.settings.reserve or len(self.busy) + self.connecting < self.settings.size:
            self._serve()
        if waiter in self._waits:
            self.waits += 1
            if self._timer is None and self.settings.wait_timeout:
                self._arm_timer()

    def cancel_wait(self, waiter) -> None:
        """*waiter* gives up (its client left): out of the queue, no answer."""
        if self._waits.pop(waiter, None) is not None:
            try:
                self.waiters.remove(waiter)
            except ValueError:
                pass

    def _take_waiter(self):
        """The oldest waiter, out of the queue, and when it began waiting."""
        waiter = self.waiters.popleft()
        return waiter, self._waits.pop(waiter)

    def waiting_since(self) -> list[float]:
        """When each client in the queue started waiting, oldest first."""
        return [self._waits[w] for w in self.waiters if w in self._waits]

    def _arm_timer(self) -> None:
        due = self._waits[self.waiters[0]] + self.settings.wait_timeout
        self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._wait_timer_fired)

    def _wait_timer_fired(self) -> None:
        self._timer = None
        if not self.settings.wait_timeout:
            return
        deadline = self.clock.seconds() - self.settings.wait_timeout
        while self.waiters and self._waits[self.waiters[0]] <= deadline:
            waiter, _ = self._take_waiter()
            self._fail(waiter, Failure(self._wait_error()))
        if self.waiters:
            self._arm_timer()

    @property
    def size(self) -> int:
        return self.settings.size

    @property
    def max_prepared_statements(self) -> int:
        return self.settings.max_prepared_statements

    @property
    def internal_timeout(self) -> float:
        return self.settings.internal_timeout

    def reconfigure(self, database, settings: PoolSettings) -> None:
        """Reload: run with *settings* from now on; waiting clients get new capacity at once."""
        before, self.settings = self.settings, settings
        self.database = database
        if settings.wait_timeout != before.wait_timeout:
            self._wait_timeout_changed()
        if self.total > settings.size + settings.reserve:
            self.shrinking = True
            self.trim()
        self._serve()

    def trim(self) -> None:
        """pool_size (or reserve_pool_size) was lowered: close the connections over it that nobody
        uses now, idle ones and those lent between transactions; those in use close when their
        client is done with them (release, hand_over). PgBouncer's janitor does the same ("too
        many servers in the pool"). Called by reconfigure and by the janitor (maintain)."""
        cap = self.settings.size + self.settings.reserve
        while self.total > cap and self.idle:
            self.idle.popleft().close()
        while self.total > cap and self.lent:
            self._reclaim_one()  # (its release() closes it)
        if self.total <= cap:
            self.shrinking = False

    def _wait_timeout_changed(self) -> None:
        """Judge the waiters by the new ``wait_timeout`` from now on."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.waiters and self.settings.wait_timeout:
            self._arm_timer()

    def _wait_error(self) -> PoolError:
        return PoolError(
            sqlstate.TOO_MANY_CONNECTIONS,
            f'no server connection for database "{getattr(self.database, "name", self.database)}" became free within {self.settings.wait_timeout:g} s',
            self.limits.describe(self) if self.limits is not None else
            f"all {self.settings.size} connections to node {self.node} for user \"{self.user}\" are in use (pool_size)",
        )

    @staticmethod
    def _fail(waiter, failure: Failure) -> None:
        if type(waiter) is Deferred:
            waiter.errback(failure)
        else:
            waiter.server_unavailable(failure)

    def _give(self, conn) -> None:
        """Hand *conn* to the oldest waiter."""
        waiter, started = self._take_waiter()
        self.wait_seconds += self.clock.seconds() - started
        self.busy.add(conn)
        if type(waiter) is Deferred:
            waiter.callback(conn)
        else:
            waiter.server_ready(conn)

    def hand_over(self, conn) -> bool:
        """Transaction pooling, clients waiting: *conn*, whose client's transaction just ended
        with nothing to roll back, reset or read back, goes straight to the oldest waiter, linked
        in place (ServerConnection.relink), when the pool may hand it out as it is and that
        waiter can take it as it is (the same settings: nothing to sync). One clock reading, and
        the connection never leaves ``busy``: no trip through release(), the idle list, link().
        False: it can't; the caller releases *conn* as usual (release() decides all else).

        (Not due for server_check_query: it was in use until now, so idle for no time at all,
        unless server_check_delay is 0, "before every reuse". Nor past server_lifetime.)"""
        waiter = self.waiters[0]
        settings = self.settings
        if (
            self.paused
            or self.retired
            or conn.tainted
            or (settings.check_query and not settings.check_delay)
            or type(waiter) is Deferred
            or not waiter.takes_as_is(conn)
            or (self.limits is not None and self.limits.blocked and self.limits.yield_to(self) is not None)
            or self.shrinking
            or conn.canceling
        ):
            return False  # (the caller releases it: release() decides)
        now = self.clock.seconds()
        if settings.lifetime and now - conn.created >= settings.lifetime:
            return False
        self.waiters.popleft()
        self.wait_seconds += now - self._waits.pop(waiter)
        conn.last_used = now
        waiter.take_over(conn)
        # As _back_to_idle after _give: a reserve connection may be due now (a waiter past
        # reserve_pool_timeout), or room under the shared limits.
        if len(self.waiters) > self.connecting + len(self.testing) and self._room():
            self._serve()
        return True

    def _serve(self) -> None:
        while self.waiters and not self.paused and (self.idle or self.lent):
            if not self.idle:
                self._reclaim_one()  # (its release() serves the waiter itself)
                continue
            conn = self._pop_checked_idle()  # (last in, first out: see take_idle)
            if conn is not None:
                self._give(conn)
        # (A connection under server_check_query will serve a waiter too, unless it fails.)
        while not self.paused and len(self.waiters) > self.connecting + len(self.testing) and self._room():
            self._open()
        if self.limits is not None and len(self.waiters) > self.connecting + len(self.testing) and self.total < self.settings.size and not self.paused:
            # Held by max_db_connections or max_user_connections, not by pool_size: the pools
            # under that limit let go of a connection for its clients (ConnectionLimits.yield_to).
            self.limits.blocked.add(self)

    def _open(self) -> None:
        self.connecting += 1
        d = self.connect(self)
        d.addCallbacks(self._opened, self._open_failed)

    def _opened(self, conn) -> None:
        self.connecting -= 1
        self._warm_failures = 0  # (the node answers again: min_pool_size's attempts start over)
        self._warm_after = 0.0
        self._note_login(conn.parameters)
        self.idle.append(conn)
        self._serve()

    def _open_failed(self, failure) -> None:
        self.connecting -= 1
        # The oldest waiter hears why; the others keep their place and get a fresh attempt.
        if self.waiters:
            waiter, _ = self._take_waiter()
            self._fail(waiter, failure)
        elif failure.check(ServerLoginError):
            # The node is away or refused (its client gave up or went elsewhere): an outage, not a bug.
            log.warn("server connection to {node} failed with nobody waiting: {why}", node=self.node, why=failure.getErrorMessage())
        else:
            log.failure("server connection to {node} failed with nobody waiting", failure, node=self.node)
        self._serve()

    # -- what logins report ---------------------------------------------------------------------

    def remember_login(self, key: tuple, parameters: dict[str, str]) -> None:
        """A client logging in with startup settings *key* was told *parameters* (kept for its likes)."""
        if len(self.login_parameters) < LOGIN_CACHE_LIMIT:
            self.login_parameters[key] = parameters

    def node_changed(self) -> None:
        """The node's role, health or fencing changed: what its logins reported may have too
        (in_hot_standby after a promotion, server_version after a restart on a new release)."""
        self.login_parameters.clear()
        self._login_seen = None
        self._warm_failures = 0  # (back, or another node now: warm connections are tried at once)
        self._warm_after = 0.0
        for conn in list(self.idle) + list(self.busy):
            conn.parameters_stale = True  # (the next login on it asks the node again: _got_server)

    def _note_login(self, parameters: dict[str, str]) -> None:
        # A login reporting something new (the node restarted as another release, ALTER ROLE
        # ... SET changed a reported default) makes every remembered login stale.
        if parameters != self._login_seen:
            if self._login_seen is not None:
                self.login_parameters.clear()
            self._login_seen = dict(parameters)

    # -- taking back --------------------------------------------------------------------------

    def release(self, conn, reusable: bool, reset: bool = True) -> None:
        """A client is done with *conn*: (reset it and) make it idle again, or close it if unusable.

        Session pooling resets with ``reset_query``; transaction pooling keeps the session as
        is (the next client's settings are synced on link) and only rolls back a transaction
        left open.
        """
        self.lent.pop(conn, None)
        if conn not in self.busy:
            return
        # (IDLE: logged in, nothing owed, no client; asked by name, at the cost of one identity test.)
        if not reusable or conn.state is not IDLE or conn.tainted or self.retired or self._expired(conn) or (self.shrinking and self._over_size()):
            self.busy.discard(conn)
            conn.close()
            self._serve()
            return
        if conn.canceling:
            self.being_canceled[conn] = (reusable, reset)  # (cancel_delivered releases it)
            return
        held = self.limits.yield_to(self) if self.limits is not None and self.limits.blocked else None
        if held is not None:
            # Another pool's clients wait on a limit this pool's connections fill: this one
            # closes, and that pool opens one in its place, before this pool's waiters may.
            self.busy.discard(conn)
            conn.close()
            self.yielded += 1
            held.refresh()
            self._serve()
            return
        queries = []
        if conn.tx_status != p.TX_IDLE:
            queries.append("ROLLBACK")
        if reset and self.settings.reset_query:
            queries.append(self.settings.reset_query)
        if not queries:
            self._back_to_idle(conn)
            return
        self.resetting.add(conn)
        conn.run_internal(queries).addCallbacks(
            lambda errors: self._reset_done(conn, reset and bool(self.settings.reset_query), errors),
            lambda failure: self._reset_failed(conn, failure),
        )

    def _reset_done(self, conn, reset: bool, errors) -> None:
        self.resetting.discard(conn)
        if errors or conn.tx_status != p.TX_IDLE:
            log.warn("reset of server {server} failed, closing it: {why}", server=conn.id, why=errors[0].get("M") if errors else "still in a transaction")
            self.busy.discard(conn)
            conn.close()
            self._serve()
            return
        if reset:
            # DISCARD ALL / DEALLOCATE ALL drop prepared statements
            conn.was_reset(statements_dropped="all" in self.settings.reset_query.lower())
        self._back_to_idle(conn)

    def _reset_failed(self, conn, failure) -> None:
        self.resetting.discard(conn)
        self.busy.discard(conn)
        self._serve()

    def _back_to_idle(self, conn) -> None:
        now = conn.last_used = self.clock.seconds()
        if self.waiters and not self.paused and not self.due_for_check(conn, now):
            # Clients outnumber connections: straight to the oldest waiter, as _serve would have
            # done (last in, first out: this one), without a trip through the idle list.
            self._give(conn)
            if len(self.waiters) > self.connecting + len(self.testing) and self._room():
                self._serve()
            return
        self.busy.discard(conn)
        self.idle.append(conn)
        self._serve()

    def cancel_delivered(self, conn) -> None:
        """A CancelRequest for *conn* reached the node (or could not): given back meanwhile, it is released now."""
        held = self.being_canceled.pop(conn, None) if not conn.canceling else None
        if held is not None:
            self.release(conn, *held)

    def _over_size(self) -> bool:
        """Shrinking after a reload, and still over pool_size + reserve_pool_size (the connection
        coming back included): it closes. Not over any more: shrinking is done."""
        if self.total > self.settings.size + self.settings.reserve:
            return True
        self.shrinking = False
        return False

    def _expired(self, conn) -> bool:
        return bool(self.settings.lifetime) and self.clock.seconds() - conn.created >= self.settings.lifetime

    def maintain(self) -> None:
        """Periodic care: close connections idle too long or past their lifetime, keep min_size warm."""
        now = self.clock.seconds()
        if self.shrinking:
            self.trim()
        for conn in list(self.idle):
            idle_too_long = self.settings.idle_timeout and now - conn.last_used >= self.settings.idle_timeout and self.total > self.settings.min_size
            if idle_too_long or self._expired(conn):
                self.idle.remove(conn)
                conn.close()
        if self.lent:
            self._maintain_lent(now)
        # Counted up front: a connect() that fails at once must not make this loop forever.
        warm = 0 if self.paused or now < self._warm_after else min(self.settings.min_size, self.settings.size) - self.total
        for _ in range(warm):
            if self.limits is not None and not self.limits.may_open(self, evict=False):
                break  # (warm connections stay within max_db/user_connections, and take no one's place)
            self.connecting += 1
            self.connect(self).addCallbacks(self._opened, self._warm_failed)

    def _maintain_lent(self, now: float) -> None:
        """Connections lent to clients between their transactions are idle on the node too: one
        past server_lifetime, or whose client has asked nothing for server_idle_timeout, is
        taken back and closed, as an idle one would be. Else a client that keeps its connection
        busy kept one backend for ever (server_lifetime never came), and clients sitting idle
        after a burst kept the pool at its peak until they left (PgBouncer, which lends nothing,
        closes those after server_idle_timeout)."""
        idle_timeout = self.settings.idle_timeout
        for conn, holder in list(self.lent.items()):
            asked = getattr(holder, "last_request", None)
            quiet = bool(idle_timeout) and asked is not None and now - asked >= idle_timeout and self.total > self.settings.min_size
            if not (quiet or self._expired(conn)) or self.lent.get(conn) is not holder:
                continue
            self._reclaim(conn)  # -> release(): past its lifetime it closes there
            if conn in self.idle:
                self.idle.remove(conn)
                conn.close()

    def _warm_failed(self, failure) -> None:
        self.connecting -= 1
        # Tried again after 1, 2, 4 ... 60 s, not every janitor tick: a database dropped, a node
        # away or a login refused would have meant an attempt and a log line a second.
        now = self.clock.seconds()
        if now >= self._warm_after:  # (once per round: min_pool_size = 4 makes four attempts at once)
            self._warm_failures += 1
            delay = min(WARM_BACKOFF_MAX, 2.0 ** (self._warm_failures - 1))
            self._warm_after = now + delay
            log.warn("could not open a warm server connection to {node}: {why}; trying again in {delay:g} s",
                     node=self.node, why=failure.getErrorMessage(), delay=delay)
        self._serve()  # a client may have arrived counting on this connection: give it a fresh attempt

    def server_closed(self, conn) -> None:
        """The connection is gone (node closed it, or we did); free its slot."""
        self.lent.pop(conn, None)
        self.busy.discard(conn)
        self.being_canceled.pop(conn, None)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        self._serve()
        self.stale.discard(conn)
        self.testing.discard(conn)
        self.resetting.discard(conn)
        if self.limits is not None:
            self.limits.freed(self)

    # -- limits across pools (pooling/limits.py) ----------------------------------------------

    def _room(self) -> bool:
        """May one more connection be opened now? pool_size alone, or the shared limits."""
        # (total and size, spelt out: asked at every handoff while clients wait.)
        total = len(self.idle) + len(self.busy) + self.connecting
        if self.limits is None:
            return total < self.settings.size
        if total >= self.settings.size and not self.settings.reserve:
            return False  # (what may_open would say, asked on every handoff while clients wait)
        return self.limits.may_open(self)

    def oldest_wait(self, now: float) -> float | None:
        """How long the oldest waiting client has waited (None: nobody waits)."""
        return now - self._waits[self.waiters[0]] if self.waiters else None

    def close_one_idle(self) -> bool:
        """Close the least recently used idle connection (to make room in another pool); False if none.

        With none idle, one lent to a client between its transactions is taken back first: it is
        idle on the node, and a client of another pool under the same max_db_connections or
        max_user_connections (or an auth_query lookup) would otherwise wait until that client's
        next transaction, however long it sits idle.
        """
        if not self.idle and self.lent:
            self._reclaim_one()
        if not self.idle:
            return False
        self.idle.popleft().close()
        return True

    # -- server_check_query on reuse --------------------------------------------------------

    def flag_for_check(self, now: float) -> None:
        """Janitor: idle connections unused for server_check_delay get checked before their next use
        (flagged here, so that handing one out never reads the clock)."""
        if not self.settings.check_query:
            return
        for conn in self.idle:
            if conn.last_used is not None and now - conn.last_used >= self.settings.check_delay:
                self.stale.add(conn)

    def due_for_check(self, conn, now: float) -> bool:
        """Whether idle *conn* runs server_check_query before its next use (as _pop_checked_idle
        decides, but reading *now* rather than waiting for the janitor's flag)."""
        settings = self.settings
        if not settings.check_query:
            return False
        if conn in self.stale:
            return True
        if not settings.check_delay:
            return conn.last_used != conn.created
        return conn.last_used is not None and now - conn.last_used >= settings.check_delay

    def server_counts(self, now: float) -> dict[str, int]:
        """SHOW POOLS' server columns, disjoint as PgBouncer's lists are: ``used`` idle connections
        that will be checked before their next use, ``tested`` busy ones running server_check_query
        or the reset, ``active`` the other busy ones, ``idle`` the other idle ones. Counted when asked
        (one pass over the idle list), so that handing out and taking back cost nothing more.

        A connection lent to a client between its transactions (transaction pooling) counts as
        idle: it serves the next client who needs it at once, and is what PgBouncer would show
        as sv_idle there. Counted active, an idle application would look like a full pool
        (sv_idle 0) to a dashboard while clients are served without waiting."""
        used = sum(1 for conn in self.idle if self.due_for_check(conn, now))
        tested = len(self.testing) + len(self.resetting)
        lent = len(self.lent)
        canceled = len(self.being_canceled)
        return {
            "active": max(0, len(self.busy) - tested - lent - canceled),
            "idle": len(self.idle) - used + lent,
            "used": used,
            "tested": tested,
            "being_canceled": canceled,
        }

    def _pop_checked_idle(self):
        """The most recently used idle connection that needs no check; those that do start theirs."""
        while self.idle:
            conn = self.idle.pop()
            # (server_check_delay = 0: before every reuse; a connection just logged in is not reused.)
            if self.settings.check_query and (conn in self.stale or (not self.settings.check_delay and conn.last_used != conn.created)):
                self.stale.discard(conn)
                self._check(conn)
                continue
            return conn
        return None

    def _check(self, conn) -> None:
        self.busy.add(conn)
        self.testing.add(conn)
        conn.run_internal([self.settings.check_query]).addCallbacks(
            lambda errors: self._checked(conn, errors), lambda failure: self._check_failed(conn, failure)
        )

    def _checked(self, conn, errors) -> None:
        self.testing.discard(conn)
        if errors or conn.state != "idle" or conn.tx_status != p.TX_IDLE:
            log.warn("server {server} failed server_check_query, closing it: {why}", server=conn.id, why=errors[0].get("M") if errors else conn.state)
            self.busy.discard(conn)
            conn.close()
            self._serve()
            return
        if self.waiters and not self.paused:
            # Fresh now: to the oldest waiter at once. Through the idle list, server_check_delay = 0
            # would have it checked again, and again, while the waiter waited.
            self.busy.add(conn)
            conn.last_used = self.clock.seconds()
            self._give(conn)
            return
        self._back_to_idle(conn)

    def _check_failed(self, conn, failure) -> None:
        # Gone while checked: no client saw it; the waiters get another connection.
        log.info("server {server} was lost while checked with server_check_query: {why}", server=conn.id, why=failure.getErrorMessage())
        self.testing.discard(conn)
        self.busy.discard(conn)
        self._serve()

    # -- operations (admin actions, reload) ------------------------------------------------------

    def set_paused(self, paused: bool) -> None:
        """PAUSE/RESUME: while paused, nothing is handed out or opened; waiters keep their place."""
        self.paused = paused
        if paused:
            self.reclaim_all()  # a client between transactions must not hold PAUSE up
        self._serve()

    def refresh(self) -> None:
        """Limits changed (reload, room freed under a shared limit): hand out or open what they allow now."""
        self._serve()

    def retire(self) -> None:
        """Its database, node or user left the config: close idle connections, the busy ones when released."""
        self.retired = True
        self.settings = replace(self.settings, min_size=0)
        self.reclaim_all()
        while self.idle:
            self.idle.popleft().close()

    def close_all(self) -> None:
        for conn in list(self.idle) + list(self.busy):
            conn.close()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        while self.waiters:
            waiter, _ = self._take_waiter()
            self._fail(waiter, Failure(PoolError(sqlstate.ADMIN_SHUTDOWN, "terminating connection due to administrator command")))
