"""What the workers ask of each other over their unix sockets (HTTP): SHOW rows and console commands.

Under workers = N an admin's console lands on one worker, and the operator asked the whole
pgtwist: SHOW lists (or adds up) every worker's rows, PAUSE/RESUME/SET/KILL... are done on every
worker. The worker the admin is connected to asks the others here, without blocking its reactor:
its own clients go on being served while it waits, and a worker that is frozen or gone costs the
admin's answer at most SHOW_TIMEOUT (with a notice naming it), nobody else anything. (PAUSE's
second round, PausedResource, waits as long as the pause takes, as PgBouncer's PAUSE does; an
admin who leaves meanwhile ends it, here and there.)
"""

from __future__ import annotations

import json
import socket
import time

from twisted.internet import defer, protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.web import resource, server

log = Logger()

# SHOW views other workers are asked for, by the console of the worker an admin is connected to.
# (admin.console.PER_WORKER's views, and admin.totals.MERGED's.)
SHOWN = (
    "bouncer.clients",
    "bouncer.servers",
    "bouncer.pools",
    "bouncer.stats",
    "bouncer.stats_totals",
    "bouncer.stats_averages",
    "bouncer.lists",
    "bouncer.databases",
    "inspect.pools",
    "inspect.nodes",
    "bouncer.mem",
    "bouncer.fds",
    "inspect.prepared",
)
WORKER_COLUMN = ("worker", int)
SHOW_TIMEOUT = 1.0


class _Asked(resource.Resource):
    """What a worker's unix socket serves the others: a leaf acting on (or reading) its Proxy."""

    isLeaf = True

    def __init__(self, proxy):
        super().__init__()
        self.proxy = proxy


class ShowResource(_Asked):
    """GET /show/{module.view} (SHOWN) on a worker's unix socket: its rows of that SHOW, as JSON."""

    def render_GET(self, request):
        from pgtwist.admin import bouncer, inspect

        what = request.postpath[0].decode() if request.postpath else ""
        if what not in SHOWN:
            request.setResponseCode(404)
            return b"no such view\n"
        module, _, name = what.partition(".")
        view = getattr(bouncer if module == "bouncer" else inspect, name)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(view(self.proxy), default=str).encode()


class KillResource(_Asked):
    """POST /kill/ID on a worker's unix socket: KILL ID, asked by the console of another worker."""

    def render_POST(self, request):
        from pgtwist.admin import actions

        client_id = request.postpath[0].decode() if request.postpath else ""
        killed = actions.kill(self.proxy, client_id)
        request.setResponseCode(200 if killed else 404)
        return b"killed\n" if killed else b"no such client\n"


class PauseResource(_Asked):
    """POST /pause/[DB] (/resume, /reconnect, /disable, /enable, /kill_database) on a worker's unix
    socket: that command, asked on another worker's console."""

    def __init__(self, proxy, action):
        super().__init__(proxy)
        self.action = action

    def render_POST(self, request):
        database = request.postpath[0].decode() if request.postpath and request.postpath[0] else None
        try:
            self.action(self.proxy, database)
        except Exception as e:  # noqa: BLE001 - (ActionError: the asking worker checked the same config)
            request.setResponseCode(404)
            return f"{e}\n".encode()
        return b"done\n"


class PausedResource(_Asked):
    """POST /paused/[DB] on a worker's unix socket: answered once its PAUSE of DB is complete
    (actions.wait_paused: no server connection of DB left; at once if DB is not paused, a RESUME
    having come first), for the console of the worker where PAUSE was given, which answers the
    operator only then, as PgBouncer's PAUSE does. It pauses nothing itself (/pause did), and
    stops looking if the asking worker hangs up (its admin left: AdminConsole.connection_lost)."""

    def render_POST(self, request):
        from twisted.web.server import NOT_DONE_YET

        from pgtwist.admin import actions

        database = request.postpath[0].decode() if request.postpath and request.postpath[0] else None
        gone: list = []
        request.notifyFinish().addErrback(gone.append)
        try:
            paused = actions.wait_paused(self.proxy, database, watcher=lambda: not gone)
        except actions.ActionError as e:
            request.setResponseCode(404)
            return f"{e}\n".encode()

        def complete(_):
            if not gone:
                request.write(b"paused\n")
                request.finish()

        paused.addCallback(complete)
        return NOT_DONE_YET


class SetResource(_Asked):
    """POST /set/KEY/VALUE (VALUE URL-quoted) on a worker's unix socket: SET asked on another worker's console."""

    def render_POST(self, request):
        from pgtwist.admin import actions

        if len(request.postpath) != 2:
            request.setResponseCode(404)
            return b"SET wants /set/KEY/VALUE\n"
        # (twisted.web has unquoted each segment already)
        key, value = request.postpath[0].decode(), request.postpath[1].decode()
        try:
            actions.set_setting(self.proxy, key, value, getattr(self.proxy, "service", None))
        except (KeyError, actions.ActionError) as e:  # (the asking worker checked the same config)
            request.setResponseCode(404)
            return f"{e}\n".encode()
        return b"done\n"


class StateResource(_Asked):
    """GET /state on a worker's unix socket: actions.console_state, as JSON, asked by a restarted worker."""

    def render_GET(self, request):
        from pgtwist.admin import actions

        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(dict(actions.console_state(self.proxy), sure=self.proxy.console_sure)).encode()


class _Answer(protocol.Protocol):
    """One HTTP/1.0 request on its own connection; *answered* fires with the whole reply once the
    worker hangs up (HTTP/1.0: the end of the body is the end of the connection)."""

    def __init__(self, line: bytes):
        self.line = line
        self.chunks: list[bytes] = []
        self.answered = defer.Deferred(lambda _: self.transport.abortConnection())

    def connectionMade(self):
        self.transport.write(self.line)

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        if not self.answered.called:
            self.answered.callback(parse(b"".join(self.chunks)))


class _Once(protocol.Factory):
    """Builds the one protocol of one request, quietly (connectProtocol's factory logs its start
    and stop: two lines per request, per worker, per SHOW)."""

    noisy = False

    def __init__(self, answer: _Answer):
        self.answer = answer

    def buildProtocol(self, addr):
        return self.answer


class QuietSite(server.Site):
    """A worker's unix-socket site: no access line per request (an exporter's SHOW every few
    seconds would write one per worker each time)."""

    noisy = False

    def log(self, request):
        pass


def ask(reactor, path: str, method: str, target: str, timeout: float | None = SHOW_TIMEOUT) -> defer.Deferred:
    """(status, body) of one HTTP/1.0 request to a worker's unix socket, later; fails (OSError,
    TimeoutError after *timeout*) when the worker does not answer. The reactor runs meanwhile.
    With *timeout* None the answer is waited for as long as it takes (PAUSE's, PausedResource)."""
    answer = _Answer(_line(method, target))
    asked = UNIXClientEndpoint(reactor, path, timeout=timeout or SHOW_TIMEOUT).connect(_Once(answer))
    asked.addCallback(lambda _: answer.answered)
    return asked if timeout is None else asked.addTimeout(timeout, reactor)


def show_rows(reactor, path: str, what: str, timeout: float = SHOW_TIMEOUT) -> defer.Deferred:
    """Another worker's rows of SHOW *what*, later; fails if it does not answer."""

    def rows(answer):
        status, body = answer
        if status != 200:
            raise ValueError(f"worker answered {status}")
        return json.loads(body)

    return ask(reactor, path, "GET", f"/show/{what}", timeout).addCallback(rows)


def request(path: str, method: str, target: str, timeout: float = SHOW_TIMEOUT) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.0 request to a worker's unix socket, blocking; OSError if it
    does not answer in *timeout*.

    Only for a restarted worker taking the console's state before its reactor runs
    (workers.WorkerLink.console_state); everything a running worker asks goes through ask().
    """
    deadline = time.monotonic() + timeout
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(_line(method, target))
        while True:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return parse(b"".join(chunks))


def _line(method: str, target: str) -> bytes:
    return f"{method} {target} HTTP/1.0\r\nHost: worker\r\nContent-Length: 0\r\n\r\n".encode()


def parse(reply: bytes) -> tuple[int, bytes]:
    """(status, body) of an HTTP/1.0 reply; status 0 if it is not one."""
    head, _, body = reply.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ")
    return (int(status[1]) if len(status) > 1 and status[1].isdigit() else 0), body
