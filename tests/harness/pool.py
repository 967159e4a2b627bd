"""An in-memory Pool harness: fake server connections and a pool over them on a task.Clock."""

from twisted.internet import defer, task

from pgtwist.backend.connection import IDLE
from pgtwist.pooling.pool import Pool, PoolSettings
from pgtwist.wire import protocol as p


class FakeConn:
    """Just what Pool touches on a ServerConnection."""

    def __init__(self, n):
        self.id = f"s{n}"
        self.state = IDLE
        self.tx_status = p.TX_IDLE
        self.closed = False
        self.tainted = False
        self.canceling = 0
        self.created = 0.0
        self.settings: dict = {}
        self.parameters: dict = {}  # what its login reported
        self.statements: set = set()
        self.internal: list[tuple[list[str], defer.Deferred]] = []
        self.last_used = None

    def run_internal(self, queries):
        d = defer.Deferred()
        self.internal.append((list(queries), d))
        return d

    def was_reset(self, statements_dropped):
        self.settings = {}
        if statements_dropped:
            self.statements.clear()

    def close(self):
        self.closed = True

    def __repr__(self):
        return f"<FakeConn {self.id}>"


class Harness:
    def __init__(self, size=2, wait_timeout=10.0, reset_query="DISCARD ALL", **extra):
        self.clock = task.Clock()
        self.attempts: list[defer.Deferred] = []
        self.made = 0
        self.pool = Pool(
            ("db", "app", "node1:5432"),
            "node1:5432",
            "db",
            "app",
            PoolSettings(size, reset_query=reset_query, wait_timeout=wait_timeout, **extra),
            connect=self.connect,
            clock=self.clock,
        )

    def connect(self, pool):
        assert pool is self.pool
        d = defer.Deferred()
        self.attempts.append(d)
        return d

    def open_next(self, index=None):
        """Let connection attempt *index* (default: the oldest pending) succeed."""
        pending = [d for d in self.attempts if not d.called]
        d = pending[0] if index is None else self.attempts[index]
        self.made += 1
        conn = FakeConn(self.made)
        conn.created = conn.last_used = self.clock.seconds()
        d.callback(conn)
        return conn

    def acquire(self):
        results = []
        d = self.pool.acquire()
        d.addBoth(results.append)
        return d, results


def got(results):
    assert len(results) == 1, results
    return results[0]
