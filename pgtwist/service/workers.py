"""workers = N: the supervisor (the twistd process); a worker's identity, cancel keys, cancel relay and its link to the others (what they ask of each other: peers).

With workers = 1 (the default) none of this runs: PgBalanceService serves in the twistd process.
With N > 1 the twistd process becomes a Supervisor. It creates the listening sockets and hands
one to each of N child processes (`twistd -n pgbalance --worker I/N:FD:DIR`), each a whole
PgBalanceService with its own pools that adopts its socket (reactor.adoptStreamPort). The sockets
form one SO_REUSEPORT group, so the kernel spreads new connections evenly over the workers. One
socket shared by all (what the supervisor falls back to where SO_REUSEPORT is missing) is not
even: every worker's epoll is woken for each connection and the same one wins the accept while
it is idle, so one worker served 20 of 20 clients in a test here. The supervisor keeps its own copy
of each socket, so a worker that is restarted finds its queue still there; while one is dead and
others live, its socket is closed, and the kernel sends its share of new clients to the others.

A client's CancelRequest can land on any worker. The top bits of every secret key a worker hands
out (BackendKeyData) carry the worker's number, so the worker that accepts the request knows the
owner and forwards the 16 bytes to it over the owner's unix socket in DIR (mode 0700), where the
owner handles it as its own. Only log2(N) bits of the 32 are spent on it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from urllib.parse import quote

from twisted.application import internet, service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from pgtwist.service.sighandlers import SignalHandlers, hold_sighup
from pgtwist.transport.accept import adopt_tcp, set_nodelay
from pgtwist.service import notices, peers, sdnotify
from pgtwist.wire import protocol as p

log = Logger()

# -- cancel keys ------------------------------------------------------------------------------------


def key_bits(count: int) -> int:
    """Bits of a secret key that name the worker: 0 for one worker, 1 for two, 2 for three or four..."""
    return (count - 1).bit_length()


def tag_secret(secret: bytes, index: int, count: int) -> bytes:
    """*secret* with its top key_bits(count) bits replaced by *index* (the rest stay random)."""
    bits = key_bits(count)
    if not bits:
        return secret
    value = int.from_bytes(secret[:4], "big")
    value = (value & ((1 << (32 - bits)) - 1)) | (index << (32 - bits))
    return value.to_bytes(4, "big") + secret[4:]


def worker_of(secret: bytes, count: int) -> int | None:
    """Which worker issued *secret* (None: no worker did, so nobody will match it)."""
    bits = key_bits(count)
    if not bits:
        return 0
    if len(secret) < 4:
        return None
    index = int.from_bytes(secret[:4], "big") >> (32 - bits)
    return index if index < count else None


# -- a worker's side ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Who a worker is: its number of *count*, the inherited listening socket, the supervisor's run
    directory, and whether it is a restart (of one that died: it takes on the console's state from
    *peers*, the workers that were up and serving when it was started)."""

    index: int
    count: int
    listen_fd: int
    rundir: str
    restarted: bool = False
    peers: tuple[int, ...] = ()

    def to_arg(self) -> str:
        restart = "r" + ",".join(map(str, self.peers)) if self.restarted else ""
        return f"{self.index}/{self.count}{restart}:{self.listen_fd}:{self.rundir}"

    @classmethod
    def parse(cls, text: str) -> "WorkerSpec":
        try:
            numbers, fd, rundir = text.split(":", 2)
            numbers, restart, serving = numbers.partition("r")
            index, count = (int(x) for x in numbers.split("/"))
            spec = cls(index, count, int(fd), rundir, bool(restart), tuple(int(x) for x in serving.split(",") if x))
        except ValueError:
            raise ValueError(f"--worker wants I/N[r[P,...]]:FD:DIR, not {text!r}") from None
        if not 0 <= spec.index < spec.count:
            raise ValueError(f"--worker: no worker {spec.index} of {spec.count}")
        return spec

    def cancel_socket(self, index: int) -> str:
        return os.path.join(self.rundir, f"cancel-{index}.sock")

    def notice_socket(self, index: int) -> str:
        return os.path.join(self.rundir, f"notice-{index}.sock")

    def http_socket(self, index: int) -> str:
        return os.path.join(self.rundir, f"http-{index}.sock")

    @property
    def notify_socket(self) -> str:
        """The supervisor's stand-in for $NOTIFY_SOCKET: the workers' sd_notify messages come here."""
        return os.path.join(self.rundir, "notify.sock")

    def tag(self, secret: bytes) -> bytes:
        return tag_secret(secret, self.index, self.count)

    def manhole_listen(self, address):
        """Worker I's manhole listens on the configured port + I (each worker is a process of its own)."""
        from pgtwist.config import Address

        return Address(address.host, address.port + self.index) if address.port else address


class WorkerLink:
    """What a worker's Proxy uses: tags the keys it hands out, forwards cancels that are another worker's."""

    def __init__(self, spec: WorkerSpec, reactor):
        self.spec = spec
        self.reactor = reactor
        self.forwarded = 0  # CancelRequests sent on to their owner (SHOW/metrics material, and tests)
        self.notices = notices.Sender(spec, reactor)

    def tag(self, secret: bytes) -> bytes:
        return self.spec.tag(secret)

    def every_worker(self, what: str, own_rows: list[dict]) -> defer.Deferred:
        """SHOW *what* over every worker, asked of all at once: fires with (rows with a worker key,
        numbers of the workers that did not answer in peers.SHOW_TIMEOUT)."""
        others = self.others()
        asked = [peers.show_rows(self.reactor, self.spec.http_socket(index), what) for index in others]

        def gathered(answers):
            rows = [dict(r, worker=self.spec.index) for r in own_rows]
            missing = []
            for index, (ok, theirs) in zip(others, answers):
                if ok:
                    rows += [dict(r, worker=index) for r in theirs]
                else:
                    missing.append(index)
            rows.sort(key=lambda r: r["worker"])  # (stable: each worker's own order within)
            return rows, missing

        return defer.DeferredList(asked, consumeErrors=True).addCallback(gathered)

    def everywhere(self, action: str, *parts: str) -> defer.Deferred:
        """A console command (*action*: PauseResource's with a database, or "set" with a key and
        a value) done here: the other workers do it too, asked all at once; fires with those that
        did not answer (or refused)."""
        target = "/" + "/".join([action, *(quote(part, safe="") for part in parts)])
        return self._post(target, self.others())

    def _post(self, target: str, others: list[int], timeout: float | None = peers.SHOW_TIMEOUT) -> defer.Deferred:
        """POST *target* to each of *others* at once: fires with those that did not answer 200."""
        asked = [peers.ask(self.reactor, self.spec.http_socket(index), "POST", target, timeout) for index in others]

        def gathered(answers):
            return [index for index, (ok, answer) in zip(others, answers) if not ok or answer[0] != 200]

        return defer.DeferredList(asked, consumeErrors=True).addCallback(gathered)

    def paused_everywhere(self, database: str, others: list[int]) -> defer.Deferred:
        """PAUSE (told already) is complete on each of *others* (peers.PausedResource): fires, with
        those that hung up first, once each has no server connection of *database* left."""
        return self._post("/paused/" + quote(database, safe=""), others, timeout=None)

    def others(self) -> list[int]:
        """The other workers' numbers."""
        return [index for index in range(self.spec.count) if index != self.spec.index]

    def console_state(self, wait: float | None = None, ask=None, now=time.monotonic) -> tuple[int, dict] | None:
        """(the worker that answered, its actions.console_state), asked of the others in turn for up
        to *wait* s in all; None when none answered (each alone, or each starting too).

        Blocking, as peers.request() is, and called before the reactor runs (PgBalanceService.startService):
        this worker's own sockets are bound by then but not served, so a console command another
        worker sends meanwhile (RESUME) waits in its queue and is done after the state is taken, not
        undone by it. A worker that is busy (in a long stretch of work, or starting) is asked
        again until *wait* is over; one that refuses (dead, or with its socket not bound yet) is not.
        """
        ask = ask or peers.request
        deadline = now() + (STATE_WAIT if wait is None else wait)
        # Only the workers that were serving when this one was started (WorkerSpec.peers): those
        # restarted with it are not, and would each be waited for.
        others = [i for i in self.spec.peers if i != self.spec.index]
        unsure = None
        while others:
            for index in list(others):
                left = deadline - now()
                if left <= 0:
                    return unsure
                try:
                    status, body = ask(self.spec.http_socket(index), "GET", "/state", min(left, STATE_TRY))
                except TimeoutError:
                    continue
                except OSError:
                    others.remove(index)
                    continue
                try:
                    state = json.loads(body) if status == 200 else None
                except ValueError:
                    state = None
                others.remove(index)  # (no /state there, a worker of an older pgtwist, say: not asked again)
                if isinstance(state, dict):
                    if state.get("sure", True):
                        return index, state
                    # (Restarted itself with nobody to ask, it knows only the file: another may know more.)
                    unsure = unsure or (index, state)
        return unsure

    def free(self, names, node: str) -> None:
        """A client's DROP DATABASE (or kin) of *names* was refused on *node* for sessions in them:
        the other workers let their idle connections there go too (Proxy.free_databases). The
        statement is sent again at once: PostgreSQL waits up to 5 s for sessions to leave."""
        self.notices.tell(notices.FREE, 0, 0, "\x00".join((node, *names)))

    def kill_elsewhere(self, client_id: str) -> defer.Deferred:
        """KILL of a client another worker serves (its id says which: "w1.c3"); fires with whether
        it was there, or None when that worker did not answer."""
        head, dot, _ = client_id.partition(".")
        if not dot or not head.startswith("w") or not head[1:].isdigit():
            return defer.succeed(False)
        index = int(head[1:])
        if index == self.spec.index or index >= self.spec.count:
            return defer.succeed(False)
        asked = peers.ask(self.reactor, self.spec.http_socket(index), "POST", f"/kill/{client_id}")
        # (200: killed; 404: no such client there; anything else, or no answer: it did not say)
        return asked.addCallbacks(lambda answer: {200: True, 404: False}.get(answer[0]), lambda _: None)

    def ddl_hold(self, database: str) -> int:
        """A client sent DDL in *database*: the other workers hold their replica reads until
        ddl_settle (notices.Receiver.hold). Returns the wait's token."""
        token = self.notices.token()
        self.notices.tell(notices.HOLD, token, 0, database)
        return token

    def ddl_hold_again(self, database: str, token: int) -> None:
        """The wait *token* goes on (a hold not renewed ends by itself there)."""
        self.notices.tell(notices.HOLD, token, 0, database)

    def ddl_settle(self, database: str, token: int, position: int | None) -> None:
        """The wait *token* is over: the DDL's WAL position (None: not known) bounds their reads."""
        self.notices.tell(notices.SETTLE, token, position or 0, database)

    def schema_changed(self, database: str) -> None:
        """DDL committed here in *database*: the other workers prepare their shared statements of
        it again too (a copy prepared before answers 0A000 "cached plan must not change result
        type" to a statement whose result it changed)."""
        self.notices.tell(notices.COMMITTED, 0, 0, database)

    def forward_cancel(self, process_id: int, secret_key: bytes, done=None, timeout: float = 5.0) -> bool:
        """True when the key is another worker's (sent there, or unknown to all); False: ours to handle.

        *done* is called once the owner has dealt with it: the owner hangs up on the forwarded
        request only after the node hung up on its own (CancelRelay), so the client's cancel
        connection closes when the cancel has landed, as it does for a key of this worker's.
        """
        owner = worker_of(secret_key, self.spec.count)
        if owner == self.spec.index:
            return False
        if owner is None:
            if done is not None:
                done()
            return True
        from pgtwist.backend.protocol import CancelFactory

        self.forwarded += 1
        # (a log line per forwarded cancel: rare, and what an operator chasing a cancel needs)
        log.info("CancelRequest for worker {owner}'s key: forwarded there", owner=owner)
        # (the owner's own wait for its node is bounded by the same timeout: give it that, twice)
        factory = CancelFactory(process_id, secret_key, clock=self.reactor, timeout=2 * timeout if timeout else 10.0, done=done)
        self.reactor.connectUNIX(self.spec.cancel_socket(owner), factory, timeout=5)
        return True


class CancelRelay(protocol.Protocol):
    """A CancelRequest another worker forwarded (length, code, pid, key), handled as if a client sent it here."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.buffer = b""

    def dataReceived(self, data):
        if self.buffer is None:
            return  # (handled: one request per connection, as a node takes it)
        self.buffer += data
        if len(self.buffer) < 4:
            return
        length = struct.unpack("!I", self.buffer[:4])[0]
        if not 16 <= length <= 264:
            self.transport.loseConnection()
            return
        if len(self.buffer) < length:
            return
        code, pid = struct.unpack("!II", self.buffer[4:12])
        key, self.buffer = self.buffer[12:length], None
        if code == p.CANCEL_REQUEST_CODE:
            # Hung up on once the node hung up on ours: the forwarding worker then closes the client's.
            self.proxy.cancel(pid, key, self.transport.loseConnection)
        else:
            self.transport.loseConnection()


class CancelRelayFactory(protocol.Factory):
    noisy = False

    def __init__(self, proxy):
        self.proxy = proxy

    def buildProtocol(self, addr):
        return CancelRelay(self.proxy)


def worker_services(svc, spec: WorkerSpec, reactor) -> list:
    """The worker's unix listeners (cancel relay; metrics for the supervisor), as child services of *svc*.

    They stop after the drain (MultiService stops children then), so a cancel still reaches a
    query that the drain waits for.
    """
    for index_path in (spec.cancel_socket(spec.index), spec.http_socket(spec.index), spec.notice_socket(spec.index)):
        # A worker that was killed left its sockets behind; the supervisor runs one worker per number.
        try:
            os.unlink(index_path)
        except FileNotFoundError:
            pass
    relay = internet.UNIXServer(spec.cancel_socket(spec.index), CancelRelayFactory(svc.proxy), mode=0o600, reactor=reactor)
    relay.setName("cancel-relay")

    from pgtwist.admin import metrics

    root = metrics.make_root(svc, reactor)
    root.putChild(b"show", peers.ShowResource(svc.proxy))
    root.putChild(b"kill", peers.KillResource(svc.proxy))
    from pgtwist.admin import actions

    # The console's commands that act on the whole pgtwist, asked on another worker's console.
    for name, action in (
        ("pause", actions.pause), ("resume", actions.resume), ("reconnect", actions.reconnect),
        ("disable", actions.disable), ("enable", actions.enable), ("kill_database", actions.kill_database),
    ):
        root.putChild(name.encode(), peers.PauseResource(svc.proxy, action))
    root.putChild(b"paused", peers.PausedResource(svc.proxy))
    root.putChild(b"set", peers.SetResource(svc.proxy))
    root.putChild(b"state", peers.StateResource(svc.proxy))
    site = peers.QuietSite(root)
    svc.proxy.notices = notices.Receiver(svc.proxy)
    told = internet.UNIXDatagramServer(spec.notice_socket(spec.index), svc.proxy.notices, mode=0o600, reactor=reactor)
    told.setName("notices")
    return [relay, internet.UNIXServer(spec.http_socket(spec.index), site, mode=0o600, reactor=reactor), told]


# A restarted worker asks the others for the console's state for up to STATE_WAIT s in all, each
# for up to STATE_TRY s at a time (a worker answers in a millisecond or two; one that does not in
# STATE_TRY is busy with something long, and is asked again while the others are asked too).
STATE_WAIT = 1.5
STATE_TRY = 0.5


def take_console_state(svc) -> None:
    """A restarted worker (*svc*, before it serves) does what the console did on the live workers:
    PAUSE, DISABLE and SET as they have them (actions.take_state). With no worker answering it
    starts from the file, as a first start does, and says so."""
    spec = svc.worker
    found = svc.proxy.worker.console_state()
    if found is None:
        svc.proxy.console_sure = False  # (asked in turn, it tells so: WorkerLink.console_state)
        log.warn(
            "worker {index} restarted: no other worker answered within {wait:g} s; it starts from {source} "
            "(not paused, disabled or SET as the console may have left the others)",
            index=spec.index, wait=STATE_WAIT, source=svc.config.source,
        )
        return
    index, state = found
    svc.proxy.console_sure = bool(state.get("sure", True))
    from pgtwist.admin import actions

    try:
        taken, skipped = actions.take_state(svc.proxy, state, svc)
    except Exception:
        # (Whatever another worker answered, a worker that cannot take it must still start.)
        svc.proxy.console_sure = False
        log.failure(
            "worker {index} restarted: could not take all of worker {other}'s console state; what it took stays, the rest is the file's",
            index=spec.index, other=index,
        )
        return
    log.info(
        "worker {index} restarted: took the console's state from worker {other}: {taken}",
        index=spec.index, other=index, taken="; ".join(taken) or "nothing paused, disabled or SET",
    )
    for line in skipped:
        log.warn("worker {index} restarted: not taken from worker {other}: {line}", index=spec.index, other=index, line=line)


def adopt_listener(spec: WorkerSpec, factory, reactor, family: int, defer_accept: bool = False):
    """Serve clients from the supervisor's listening socket (adoptStreamPort dups it; ours is closed)."""
    port = adopt_tcp(reactor, spec.listen_fd, family, factory, defer_accept)
    os.close(spec.listen_fd)
    return port


def die_with_parent() -> None:
    """A worker whose supervisor was SIGKILLed gets SIGTERM (Linux) instead of serving on unsupervised.

    It also leaves the terminal's process group: Ctrl-C reaches the supervisor alone, which passes
    it on once (a second SIGINT would make twistd stop a stopped reactor and log a traceback).
    """
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# -- the supervisor ---------------------------------------------------------------------------------

BACKOFF_FIRST = 0.5  # seconds before the first restart of a worker that died
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # a worker that ran this long has its back-off start over


def restart_delay(failures: int) -> float:
    """Back-off before restarting a worker that died *failures* times in a row (each within STABLE_AFTER)."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** max(0, failures - 1)))


class _Worker:
    """One child: its process, when it started, how often in a row it died young, a pending restart."""

    def __init__(self, index: int):
        self.index = index
        self.process = None
        self.pid: int | None = None
        self.started_at = 0.0
        self.failures = 0
        self.restart = None  # IDelayedCall
        self.exited: defer.Deferred | None = None
        self.ready = False  # it said READY=1 (sd_notify) since it last started


class _WorkerProcess(protocol.ProcessProtocol):
    """Turns a worker's output into the supervisor's log lines and its exit into worker_exited()."""

    def __init__(self, supervisor, worker: _Worker):
        self.supervisor = supervisor
        self.worker = worker
        self.pending = {1: b"", 2: b""}  # (per descriptor: stdout and stderr lines must not mix)

    def childDataReceived(self, fd, data):
        pending = self.pending.get(fd, b"") + data
        *lines, self.pending[fd] = pending.split(b"\n")
        for line in lines:
            self.supervisor.worker_output(self.worker, line)

    def processEnded(self, reason):
        for fd, rest in self.pending.items():
            if rest:
                self.supervisor.worker_output(self.worker, rest)
        self.pending = {}
        self.supervisor.worker_exited(self.worker, reason.value)


# The directory that holds the supervisor's pgtwist package: its workers import that one (worker_environ).
_PGTWIST_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spawn_twistd(reactor, proto, spec: WorkerSpec, config_path: str, extra_fds: dict):
    """Start `twistd -n pgbalance --config PATH --worker SPEC` with the listening socket as fd spec.listen_fd."""
    # (pgtwist.tools.cli.twistd: the plugin is found from an editable install too.) -P: `python -c`
    # would put the working directory first on the import path, and a pgtwist tree there (another
    # checkout, a copy) would serve as the workers' code; they take the supervisor's (worker_environ).
    argv = [sys.executable, "-P", "-c", "from pgtwist.tools.cli import twistd; twistd()", "-n", "--pidfile=", "--logfile=-"]
    argv += ["pgbalance", "--config", config_path, "--worker", spec.to_arg()]
    fds = {0: "w", 1: "r", 2: "r", **extra_fds}
    # SIGHUP's default action ends a process, and a worker's handler is in only once its reactor
    # runs (a second or so of Python start-up): a reload in that window (the supervisor passing on
    # an operator's SIGHUP, or a worker's RELOAD, just after a start or a restart) killed the
    # workers being started. They start with SIGHUP blocked (the mask survives fork and exec); one
    # sent meanwhile waits, and is taken once the worker's handler is in (lifecycle unblocks it).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        return reactor.spawnProcess(proto, sys.executable, argv, env=worker_environ(os.environ, spec), path=os.getcwd(), childFDs=fds)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _site_directories() -> set[str]:
    return {os.path.abspath(d) for d in [*site.getsitepackages(), site.getusersitepackages()]}


def worker_environ(environ, spec: WorkerSpec) -> dict:
    """A worker's environment: the supervisor's, but for $NOTIFY_SOCKET, which is the supervisor's
    own socket (spec.notify_socket), whether a service manager gave it one or not. systemd takes READY=1
    only from the process it started (NotifyAccess=main): a worker's was ignored, and the unit
    never became ready; with NotifyAccess=all, a worker's MAINPID= made itself the unit's main
    process, so `systemctl reload` signalled that one worker alone. The supervisor says READY=1
    itself once every worker has (Supervisor.worker_ready)."""
    env = dict(environ)
    # The supervisor's pgtwist, the same code (compiled core included) in every process: from a
    # tree (./dev, PYTHONPATH), that tree first. Installed, the interpreter finds it where the
    # supervisor did (spawn_twistd's -P leaves only the working directory out): a site directory
    # put first on PYTHONPATH would come before the standard library and the other site directories.
    path = environ.get("PYTHONPATH", "")
    if _PGTWIST_ROOT not in _site_directories() and path.split(os.pathsep)[0] != _PGTWIST_ROOT:
        env["PYTHONPATH"] = _PGTWIST_ROOT + (os.pathsep + path if path else "")
    # (Always: a worker's READY=1 is also how the supervisor knows it serves, WorkerSpec.peers.)
    env["NOTIFY_SOCKET"] = spec.notify_socket
    return env


class _WorkerNotify(protocol.DatagramProtocol):
    """The workers' sd_notify messages (worker_environ): READY=1 with the sender's MAINPID."""

    noisy = False

    def __init__(self, supervisor):
        self.supervisor = supervisor

    def datagramReceived(self, data, addr):
        fields = dict(line.partition("=")[::2] for line in data.decode("utf-8", "replace").splitlines())
        pid = fields.get("MAINPID", "")
        if fields.get("READY") == "1" and pid.isdigit():
            self.supervisor.worker_ready(int(pid))


class Supervisor(service.MultiService):
    """The twistd process under workers = N: one listening socket, N workers kept running, signals passed on.

    *spawn(reactor, protocol, spec, config_path, fds)* starts a worker (spawn_twistd; tests inject
    their own) and *reactor* gives time, so the restart policy is tested with a Clock.
    """

    name = "pgbalance-supervisor"

    def __init__(self, config, reactor=None, signals: bool = False, spawn=spawn_twistd, listen_socket=None, environ=None, notify=None):
        super().__init__()
        # A service manager's $NOTIFY_SOCKET (worker_environ), and how to tell it (sdnotify.notify).
        self.environ = os.environ if environ is None else environ
        self.notify = sdnotify.notify if notify is None else notify
        self._ready_told = False
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.count = config.workers
        self.spawn = spawn
        self.signals = signals
        self.socket = listen_socket  # the first worker's, made in startService unless given (tests)
        # Each worker's socket (None: closed while that worker is dead). A given socket (tests) or
        # a kernel without SO_REUSEPORT: one socket, shared.
        self.sockets: list = []
        self.port: int | None = None
        self.rundir: str | None = None
        self.workers = [_Worker(i) for i in range(self.count)]
        self.restarts = 0
        self._stopping = False
        self._graceful = False
        self._signal_handlers = SignalHandlers()
        if config.manhole is not None:
            # Checked (ManholeError) and the host key made here, once: not by N workers racing
            # to create one file, nor by workers that fail at start and are restarted forever.
            from pgtwist.admin import ManholeError, manhole

            if not os.path.isfile(config.manhole.authorized_keys or ""):
                raise ManholeError(f"manhole.authorized_keys: {config.manhole.authorized_keys or '(not set)'} does not exist; the manhole needs one")
            manhole.load_or_create_host_key(config.manhole.host_key)
        if config.metrics is not None:
            from pgtwist.service import workermetrics

            workermetrics.make_service(self, config.metrics, reactor).setServiceParent(self)

    # -- lifecycle ----------------------------------------------------------------------------------

    def startService(self):
        if self.signals:
            hold_sighup()  # (taken once the handler is in: _install_signal_handlers)
        if self.socket is None:
            self.socket = listening_socket(self.config.listen, reuseport=REUSEPORT)
            if REUSEPORT:
                port = self.socket.getsockname()[1]
                self.sockets = [self.socket] + [
                    listening_socket(self.config.listen, reuseport=True, port=port) for _ in range(self.count - 1)
                ]
        if not self.sockets:
            self.sockets = [self.socket] * self.count
        self.port = self.socket.getsockname()[1]  # (the group's: a restarted worker's new socket joins it)
        if self.rundir is None:
            self.rundir = make_rundir(self.count)
        host, port = self.socket.getsockname()[:2]
        log.info(
            "pgtwist supervisor (pid {pid}) listening on {host}:{port}: {n} workers, each with its own pools "
            "(pool_size and max_client_conn are per worker)",
            pid=os.getpid(), host=host, port=port, n=self.count,
        )
        if self.config.manhole is not None:
            listen = self.config.manhole.listen
            log.info(
                "manhole: worker I listens on {host}:{first}+I (ports {first}-{last})",
                host=listen.host, first=listen.port, last=listen.port + self.count - 1,
            )
        if self.signals:
            self.reactor.callWhenRunning(self._install_signal_handlers)
        self.reactor.listenUNIXDatagram(WorkerSpec(0, self.count, 3, self.rundir).notify_socket, _WorkerNotify(self))
        super().startService()
        # (after the reactor starts: its child-process reaping is set up by then)
        self.reactor.callWhenRunning(self._start_all)

    def _start_all(self):
        for worker in self.workers:
            if worker.process is None and not self._stopping:
                self._start(worker)

    def spec_for(self, worker: _Worker) -> WorkerSpec:
        return WorkerSpec(worker.index, self.count, 3, self.rundir)

    def _start(self, worker: _Worker) -> None:
        worker.restart = None
        worker.ready = False
        # (a restart takes on what the console did to the workers serving now: take_console_state)
        peers = tuple(w.index for w in self.workers if w is not worker and w.process is not None and w.ready)
        spec = replace(self.spec_for(worker), restarted=worker.pid is not None, peers=peers)
        worker.exited = defer.Deferred()
        worker.started_at = self.reactor.seconds()
        worker.process = self.spawn(
            self.reactor, _WorkerProcess(self, worker), spec, os.path.abspath(self.config.source), {3: self._socket_for(worker).fileno()}
        )
        worker.pid = getattr(worker.process, "pid", None)
        log.info("worker {index} started (pid {pid})", index=worker.index, pid=worker.pid)

    def worker_ready(self, pid: int) -> None:
        """A worker said READY=1 (its listener is open, its signal handlers in). Once every worker
        has, the first time, the supervisor tells the service manager it is ready, as itself."""
        worker = next((w for w in self.workers if w.pid == pid and w.process is not None), None)
        if worker is None:
            return
        worker.ready = True
        if self._ready_told or self._stopping or not all(w.ready for w in self.workers) or not self.environ.get("NOTIFY_SOCKET"):
            return
        self._ready_told = True
        # (From the config and the port kept at start: worker 0's socket, self.socket, is closed
        # while worker 0 is dead, and it may have died before every worker was ready.)
        host = self.config.listen.host
        self._tell(f"READY=1\nSTATUS=accepting clients on {host}:{self.port} ({self.count} workers)\nMAINPID={os.getpid()}")

    def _tell(self, state: str) -> None:
        self.notify(state, self.environ)

    def worker_output(self, worker: _Worker, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text:
            # (the worker's own timestamp goes: ours says when, the tag says who)
            head, sep, rest = text.partition(" [")
            if sep and head[:2].isdigit():
                text = "[" + rest
            log.info("worker {index}: {line}", index=worker.index, line=text)

    def worker_exited(self, worker: _Worker, status) -> None:
        how = describe_exit(status)
        worker.process = None
        exited, worker.exited = worker.exited, None
        if self._stopping:
            log.info("worker {index} (pid {pid}) {how}", index=worker.index, pid=worker.pid, how=how)
        else:
            lived = self.reactor.seconds() - worker.started_at
            worker.failures = 1 if lived >= STABLE_AFTER else worker.failures + 1
            delay = restart_delay(worker.failures)
            log.warn(
                "worker {index} (pid {pid}) {how} after {lived:.1f} s; restarting it in {delay:g} s",
                index=worker.index, pid=worker.pid, how=how, lived=lived, delay=delay,
            )
            self.restarts += 1
            self._close_socket_of(worker)
            worker.restart = self.reactor.callLater(delay, self._start, worker)
        if exited is not None:
            exited.callback(None)

    def stopService(self):
        """Every worker gets SIGTERM (graceful: it drains) or SIGINT; SIGKILL if it outstays shutdown_timeout + 10 s."""
        self._stopping = True
        for sock in {id(x): x for x in [self.socket, *self.sockets] if x is not None}.values():
            sock.close()  # (the workers hold their own copies: what they accepted is theirs)
        waits = []
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            worker.restart = None
            if worker.process is not None:
                waits.append(worker.exited)
                self._signal(worker, signal.SIGTERM if self._graceful else signal.SIGINT)
        limit = (self.config.shutdown_timeout if self._graceful else 0.0) + 10.0
        killer = self.reactor.callLater(limit, self._kill_all) if waits else None
        d = defer.gatherResults(waits)

        def done(result):
            if killer is not None and killer.active():
                killer.cancel()
            if self.rundir is not None:
                shutil.rmtree(self.rundir, ignore_errors=True)
            return super(Supervisor, self).stopService()

        d.addBoth(done)
        d.addBoth(self._signal_handlers.restore)
        return d

    def _own_socket(self, worker: _Worker) -> bool:
        """Whether the worker's socket is its alone (not the fallback shared by all, nor borrowed)."""
        mine = self.sockets[worker.index]
        return sum(x is mine for x in self.sockets) == 1

    def _close_socket_of(self, worker: _Worker) -> None:
        """A dead worker's share of new clients goes to the living until it is back.

        Its socket's queue could only wait for the restart (seconds, up to BACKOFF_MAX in a crash
        loop): closed, it leaves the SO_REUSEPORT group (what was queued on it that instant is
        reset). Kept when no other worker lives, so that clients queue for the restart.
        """
        if not self._own_socket(worker) or not any(w.process is not None for w in self.workers):
            return
        self.sockets[worker.index].close()
        self.sockets[worker.index] = None

    def _socket_for(self, worker: _Worker):
        sock = self.sockets[worker.index]
        if sock is not None:
            return sock
        try:
            sock = listening_socket(self.config.listen, reuseport=True, port=self.port)
        except OSError as e:
            # (e.g. a port below 1024 after twistd dropped privileges: share a living worker's queue)
            sock = next((x for x in self.sockets if x is not None), None)
            if sock is None:
                raise
            log.warn("worker {index}: cannot listen on a socket of its own again ({why}); it shares another worker's", index=worker.index, why=e)
        self.sockets[worker.index] = sock
        return sock

    def _kill_all(self):
        for worker in self.workers:
            if worker.process is not None:
                log.warn("worker {index} (pid {pid}) did not stop in time; killing it", index=worker.index, pid=worker.pid)
                self._signal(worker, signal.SIGKILL)

    def _signal(self, worker: _Worker, signum: int) -> None:
        try:
            worker.process.signalProcess(signum)
        except (error.ProcessExitedAlready, OSError):
            pass

    # -- operations -----------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: every worker re-reads the file itself (each logs its outcome; listen and workers need a restart)."""
        for worker in self.workers:
            if worker.process is not None:
                self._signal(worker, signal.SIGHUP)

    def shutdown(self, graceful: bool = True) -> None:
        if self._stopping:
            log.info("shutdown already under way")
            return
        self._graceful = graceful
        if self.environ.get("NOTIFY_SOCKET"):
            self._tell("STOPPING=1\nSTATUS=draining" if graceful else "STOPPING=1")
        log.info("shutting down {n} workers: {how}", n=self.count, how="each drains" if graceful else "fast")
        self.reactor.stop()

    def alive(self) -> list[int]:
        """Indexes of the workers running now."""
        return [w.index for w in self.workers if w.process is not None]

    def _install_signal_handlers(self) -> None:
        def on_hup(signum, frame):
            self.reactor.callFromThread(self._signalled_reload)

        def on_term(signum, frame):
            self.reactor.callFromThread(self.shutdown, True)

        self._signal_handlers.install({signal.SIGHUP: on_hup, signal.SIGTERM: on_term})  # (and takes a held SIGHUP)

    def _signalled_reload(self) -> None:
        log.info("SIGHUP: every worker reloads {source}", source=self.config.source)
        self.reload()


# A unix socket's path fits in sun_path: 108 bytes on Linux, with its terminating NUL.
SUN_PATH_MAX = 107


def make_rundir(count: int, parent: str | None = None) -> str:
    """The workers' run directory (mode 0700) for their unix sockets: under $TMPDIR, or under /tmp
    when $TMPDIR is too deep for a socket's path there (a container's or a CI runner's, say)."""
    rundir = tempfile.mkdtemp(prefix="pgtwist-workers-", dir=parent)
    longest = WorkerSpec(count - 1, count, 3, rundir).notice_socket(count - 1)
    if len(os.fsencode(longest)) > SUN_PATH_MAX and parent is None:
        os.rmdir(rundir)
        rundir = tempfile.mkdtemp(prefix="pgtwist-w-", dir="/tmp")
        log.info("workers' sockets are in {rundir}: $TMPDIR is too deep for a unix socket's path", rundir=rundir)
    return rundir


def describe_exit(status) -> str:
    """'exited with status 1', 'was killed by signal 9 (SIGKILL)', 'exited' from a ProcessDone/ProcessTerminated."""
    sig = getattr(status, "signal", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        return f"was killed by signal {sig} ({name})"
    code = getattr(status, "exitCode", None)
    return f"exited with status {code}" if code else "exited"


REUSEPORT = hasattr(socket, "SO_REUSEPORT")


def listening_socket(address, reuseport: bool = False, port: int | None = None) -> socket.socket:
    """A listening socket a worker adopts (backlog 4096, as PgBalanceService's own listener).

    With *reuseport* it joins the SO_REUSEPORT group of the others bound to the same address (the
    kernel lets only sockets of the same user join); *port* replaces the address's (its port 0
    means "any": the first socket picks it, the rest follow).
    """
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as Twisted's listenTCP does)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address.host, address.port if port is None else port))
    set_nodelay(sock)  # (before listen(): every connection it queues inherits it)
    sock.listen(4096)
    sock.setblocking(False)
    sock.set_inheritable(False)  # (handed to each worker as fd 3 by spawnProcess, to nothing else)
    return sock
