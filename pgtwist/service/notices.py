"""What one worker tells the others at once under workers = N: DDL's hold on replica reads and its WAL position, a schema change, databases a DROP DATABASE needs free.

One unix datagram each, on every worker's own socket in the supervisor's 0700 run directory:
kind, token, WAL position, then text (a database's name; for FREE the node and the names,
NUL-separated). A datagram goes out in the sender's reactor turn, with no connection to set up,
so it is queued at the others before the client whose statement caused it can act on its answer.

The kernel queues only a few datagrams per socket (net.unix.max_dgram_qlen, 10 here): one the
receiver cannot take yet (it is busy) waits in the sender's queue for that worker and goes, in
order, a moment later; one for a worker not listening (being restarted) is dropped, as a new
worker holds nothing. A hold that is not renewed (Receiver.HOLD_FOR) ends on its own, so a
sender that died leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import deque

from twisted.internet import protocol
from twisted.logger import Logger

log = Logger()

HOLD, SETTLE, COMMITTED, FREE = 1, 2, 3, 4
_HEAD = struct.Struct("!BQQ")  # kind, token, WAL position (0: not known)
RETRY = 0.005  # seconds before a queued datagram is offered again (doubling, up to RETRY_MAX, while none goes)
RETRY_MAX = 1.0
MAX_QUEUED = 10_000  # per receiving worker; beyond it the oldest is dropped (and counted)


class Sender:
    """This worker's side: datagrams to every other worker, in order, never blocking the reactor."""

    def __init__(self, spec, reactor):
        self.spec = spec
        self.reactor = reactor
        self.dropped = 0  # datagrams let go: MAX_QUEUED reached (a receiver stalled that long)
        self._socket: socket.socket | None = None
        self._queued: dict[int, deque] = {}
        self._retry = None
        self._delay = RETRY
        # Tokens unique across processes: a restarted worker must not reuse one another worker
        # still holds for its predecessor.
        self._token = int.from_bytes(os.urandom(8), "big") >> 1

    def token(self) -> int:
        self._token = (self._token + 1) % (1 << 64) or 1
        return self._token

    def tell(self, kind: int, token: int, position: int, text: str) -> None:
        message = _HEAD.pack(kind, token, position) + text.encode("utf-8")
        for index in range(self.spec.count):
            if index == self.spec.index:
                continue
            queue = self._queued.get(index)
            if queue:
                queue.append(message)
                if len(queue) > MAX_QUEUED:
                    queue.popleft()
                    self.dropped += 1
                    if self.dropped % 1000 == 1:
                        log.warn("worker {index} has taken no notice for a while: {n} dropped so far", index=index, n=self.dropped)
            elif not self._send(index, message):
                self._queued[index] = deque((message,))
                if len(self._queued) == 1:
                    self._delay = RETRY  # (a fresh wait: not the back-off of an earlier stall)
                self._later()

    def _send(self, index: int, message: bytes) -> bool:
        """Sent, or dropped for good (False: the receiver's queue is full; try again later)."""
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        try:
            self._socket.sendto(message, self.spec.notice_socket(index))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.ENOBUFS):
                return False  # (its queue is full, or the kernel's buffers: later)
            # (nobody listening there: a worker being restarted)
        return True

    def _later(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self.reactor.callLater(self._delay, self._flush)

    def _flush(self) -> None:
        went = False
        for index, queue in list(self._queued.items()):
            while queue and self._send(index, queue[0]):
                queue.popleft()
                went = True
            if not queue:
                del self._queued[index]
        # (A receiver that takes nothing for a while is asked less and less often.)
        self._delay = RETRY if went else min(RETRY_MAX, self._delay * 2)
        if self._queued:
            self._later()


class Receiver(protocol.DatagramProtocol):
    """The other workers' datagrams, decoded and handed on: DDL waits to DdlWaits, the rest to the Proxy."""

    noisy = False

    def __init__(self, proxy):
        self.proxy = proxy
        self.waits = DdlWaits(proxy)

    def datagramReceived(self, data, addr):
        if len(data) < _HEAD.size:
            return
        kind, token, position = _HEAD.unpack_from(data)
        text = data[_HEAD.size :].decode("utf-8", "replace")
        if kind == HOLD:
            self.waits.hold(token, text)
        elif kind == SETTLE:
            self.waits.settle(token, position or None, text)
        elif kind == COMMITTED:
            self.proxy.schema_changed_elsewhere(text)
        elif kind == FREE:
            node, *names = text.split("\x00")
            if node and names:
                self.proxy.free_databases(tuple(names), "of another worker", node, tell_others=False)


class DdlWaits:
    """Other workers' DDL as this worker's routers see it: a hold on replica reads per token,
    renewed by its sender, ended by the DDL's WAL position or when it is not renewed."""

    # A hold not renewed for this long ends (its sender renews it every janitor tick, a second,
    # until its read-back settles it: DatabaseRouter.renew_told).
    HOLD_FOR = 5.0

    def __init__(self, proxy):
        self.proxy = proxy
        self.held: dict[int, tuple] = {}  # token -> (settle, timer, the router held)
        self.early: dict[int, None] = {}  # tokens whose SETTLE came before their HOLD

    def _router(self, name: str):
        database = self.proxy.config.databases.get(name)
        return None if database is None else self.proxy.router_for(database)

    def hold(self, token: int, name: str) -> None:
        """Another worker's DDL in database *name*: no replica reads here until its position comes
        (or the hold is not renewed). A hold already in place is renewed."""
        if self.early.pop(token, False) is None:
            return  # (its position came first)
        held = self.held.get(token)
        if held is not None:
            held[1].reset(self.HOLD_FOR)
            return
        router = self._router(name)
        if router is None:
            return
        settle = router.ddl_reading_back(shared=False)
        self.held[token] = (settle, self.proxy.clock.callLater(self.HOLD_FOR, self._expired, token, settle), router)

    def settle(self, token: int, position: int | None, name: str) -> None:
        """The DDL's WAL position (None: not known): this worker's replica reads are bounded by it."""
        held = self.held.pop(token, None)
        router = self._router(name)
        if held is not None:
            settle, timer, held_by = held
            if timer.active():
                timer.cancel()
            settle(position)
            if router is not None and router is not held_by:
                router.ddl_committed(position)  # (a reload rebuilt the router meanwhile)
            return
        if router is not None:
            router.ddl_committed(position)
        self.early[token] = None
        while len(self.early) > 64:
            del self.early[next(iter(self.early))]

    def _expired(self, token: int, settle) -> None:
        held = self.held.get(token)
        if held is not None and held[0] is settle:
            del self.held[token]
        settle(None)
