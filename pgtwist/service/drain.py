"""Graceful shutdown: stop taking work, let open transactions finish (bounded), then FATAL 57P01 the rest."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger

from pgtwist.wire import sqlstate

log = Logger()

SHUTDOWN_MESSAGE = "terminating connection due to administrator command"
TICK = 0.05  # how often the drain looks at the clients still there
GRACE = 2.0  # after the last FATAL, how long closing connections get to flush it
def settle(session) -> None:
    """While draining: close *session* with 57P01 if it is at rest (called at each ReadyForQuery too)."""
    if session.state != "closed" and session.at_rest():
        session.fatal(sqlstate.ADMIN_SHUTDOWN, SHUTDOWN_MESSAGE)


def drain(proxy, clock, timeout: float) -> defer.Deferred:
    """Close clients as they come to rest; after *timeout* s close the rest. Fires when all are gone
    (or GRACE s after the last FATAL, whichever first). The listener must already be closed."""
    proxy.draining = True
    for session in list(proxy.clients.values()):
        settle(session)
    busy = [s for s in proxy.clients.values() if s.state != "closed"]
    if busy:
        log.info("draining: {n} client(s) in a transaction or mid-query; waiting up to {timeout:g} s", n=len(busy), timeout=timeout)
    if not proxy.clients:
        return defer.succeed(None)
    done = defer.Deferred()
    deadline = clock.seconds() + timeout
    state = {"forced_at": None}

    def tick():
        now = clock.seconds()
        for session in list(proxy.clients.values()):
            settle(session)
        if state["forced_at"] is None and now >= deadline:
            left = [s for s in proxy.clients.values() if s.state != "closed"]
            if left:
                log.warn("drain: shutdown_timeout reached; closing {n} busy client(s)", n=len(left))
            for session in left:
                session.fatal(sqlstate.ADMIN_SHUTDOWN, SHUTDOWN_MESSAGE)
            state["forced_at"] = now
        if not proxy.clients or (state["forced_at"] is not None and now - state["forced_at"] >= GRACE):
            loop.stop()

    loop = task.LoopingCall(tick)
    loop.clock = clock
    loop.start(TICK, now=False).addCallback(lambda _: done.callback(None))
    return done
