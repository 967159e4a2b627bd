"""workers = N without processes: the cancel-key encoding, cancel forwarding and relay, the supervisor on a Clock."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sysconfig
from pathlib import Path

import pytest
from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from pgtwist import config as configmod
from pgtwist.service import peers, workers
from pgtwist.service.proxy import Proxy
from pgtwist.wire import messages as m

from tests.harness.admin_support import BASE


def make_config(**overrides) -> configmod.Config:
    return configmod.from_dict({**BASE, **overrides})


# -- the key ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8, 9, 64, 256])
def test_a_tagged_secret_names_its_worker_and_keeps_the_rest_random(count):
    for index in range(count):
        for _ in range(20):
            raw = secrets.token_bytes(4)
            tagged = workers.tag_secret(raw, index, count)
            assert len(tagged) == 4
            assert workers.worker_of(tagged, count) == index
            bits = workers.key_bits(count)
            low = (1 << (32 - bits)) - 1
            assert int.from_bytes(tagged, "big") & low == int.from_bytes(raw, "big") & low


def test_one_worker_leaves_secrets_alone():
    raw = secrets.token_bytes(4)
    assert workers.tag_secret(raw, 0, 1) == raw
    assert workers.worker_of(raw, 1) == 0


def test_a_key_naming_no_worker_is_nobodys():
    # 3 workers use 2 bits: 0b11 names no worker; a short key names none either.
    assert workers.worker_of(b"\xff\x00\x00\x00", 3) is None
    assert workers.worker_of(b"\x00\x01", 2) is None


def test_worker_spec_round_trips_and_refuses_nonsense():
    spec = workers.WorkerSpec(1, 4, 3, "/tmp/x:y")
    assert workers.WorkerSpec.parse(spec.to_arg()) == spec
    restart = workers.WorkerSpec(1, 4, 3, "/tmp/x:y", restarted=True)
    assert restart.to_arg() == "1/4r:3:/tmp/x:y" and workers.WorkerSpec.parse(restart.to_arg()) == restart
    for bad in ("", "1:3:/tmp", "4/4:3:/tmp", "a/b:3:/tmp", "1r/4:3:/tmp", "1/4rr:3:/tmp"):
        with pytest.raises(ValueError):
            workers.WorkerSpec.parse(bad)
    from pgtwist.config import Address

    assert spec.manhole_listen(Address("127.0.0.1", 6022)) == Address("127.0.0.1", 6023)


# -- the proxy's side --------------------------------------------------------------------------------


def worker_proxy(index: int, count: int = 2):
    reactor = MemoryReactorClock()
    proxy = Proxy(make_config(), reactor)
    proxy.worker = workers.WorkerLink(workers.WorkerSpec(index, count, 3, "/run/pgtwist"), reactor)
    return proxy, reactor


class FakeSession:
    server = None
    secret_key = b""
    process_id = 0

    def cancel_waiting(self):
        return False  # (its work is on its server: the cancel goes there)


def test_keys_a_worker_hands_out_name_it():
    proxy, _ = worker_proxy(1, 3)
    for _ in range(50):
        session = FakeSession()
        session.process_id, session.secret_key = proxy.register_cancel_key(session)
        assert workers.worker_of(session.secret_key, 3) == 1


def test_a_cancel_for_another_worker_is_forwarded_to_its_socket_and_done_when_the_owner_hangs_up():
    # The client's cancel connection closes once the cancel has landed (the owner hangs up only
    # after its node did): closed at once, a client's next statement could take the late cancel.
    proxy, reactor = worker_proxy(0)
    key = workers.tag_secret(b"\x12\x34\x56\x78", 1, 2)
    done = []
    proxy.cancel(4242, key, lambda: done.append(True))
    [(path, factory, timeout, _)] = reactor.unixClients
    assert path == "/run/pgtwist/cancel-1.sock"
    t = StringTransport()
    p = factory.buildProtocol(None)
    p.makeConnection(t)
    assert t.value() == m.cancel_request(4242, key)
    assert proxy.worker.forwarded == 1
    assert done == [] and not t.disconnecting
    p.connectionLost(Failure(error.ConnectionDone()))
    assert done == [True]


def test_a_forwarded_cancel_whose_owner_is_gone_is_done_at_once():
    proxy, reactor = worker_proxy(0)
    done = []
    proxy.cancel(4242, workers.tag_secret(b"\x12\x34\x56\x78", 1, 2), lambda: done.append(True))
    [(_, factory, _, _)] = reactor.unixClients
    factory.clientConnectionFailed(None, Failure(error.ConnectError()))
    assert done == [True]


def test_a_cancel_for_this_worker_is_handled_here():
    proxy, reactor = worker_proxy(1)
    cancelled = []
    session = FakeSession()
    session.server = object()
    session.process_id, session.secret_key = proxy.register_cancel_key(session)
    proxy.cancel_server = lambda server, done=None: cancelled.append(server)
    proxy.cancel(session.process_id, session.secret_key)
    assert cancelled == [session.server]
    assert reactor.unixClients == []


def test_the_relay_hands_a_forwarded_cancel_to_the_proxy_split_at_every_byte():
    packet = m.cancel_request(77, b"\xab\xcd\xef\x01")
    for cut in range(len(packet) + 1):
        calls = []

        class P:
            def cancel(self, pid, key, done):
                calls.append((pid, key))
                self.done = done

        proxy = P()
        relay = workers.CancelRelay(proxy)
        t = StringTransport()
        relay.makeConnection(t)
        relay.dataReceived(packet[:cut])
        relay.dataReceived(packet[cut:])
        assert calls == [(77, b"\xab\xcd\xef\x01")]
        assert not t.disconnecting  # (until the owner's cancel to the node is over)
        proxy.done()
        assert t.disconnecting


def test_the_relay_drops_garbage():
    relay = workers.CancelRelay(None)
    t = StringTransport()
    relay.makeConnection(t)
    relay.dataReceived(b"\x00\x00\xff\xff" + b"x" * 20)
    assert t.disconnecting


# -- the supervisor ----------------------------------------------------------------------------------


class FakeProcess:
    _pids = iter(range(1000, 100000))

    def __init__(self, proto):
        self.proto = proto
        self.pid = next(self._pids)
        self.signals: list[int] = []
        self.gone = False

    def signalProcess(self, signum):
        if self.gone:
            raise error.ProcessExitedAlready()
        self.signals.append(signum)

    def end(self, status):
        self.gone = True
        self.proto.processEnded(Failure(status))


class FakeSocket:
    def __init__(self):
        self.closed = False

    def fileno(self):
        return 99

    def getsockname(self):
        return ("127.0.0.1", 6432)

    def close(self):
        self.closed = True


def make_supervisor(count=2, signals=False, **overrides):
    reactor = MemoryReactorClock()
    reactor.hasRun = True  # (callWhenRunning runs at once)
    reactor.callFromThread = lambda f, *a, **kw: f(*a, **kw)  # (what a signal handler uses)
    reactor.listenUNIXDatagram = lambda path, proto: notified.append(proto)
    spawned: list = []
    notified: list = []  # (the workers' READY=1 come to the supervisor: make_supervisor(...)[0] .ready)

    def spawn(reactor_, proto, spec, config_path, fds):
        assert fds == {3: 99}
        process = FakeProcess(proto)
        spawned.append((spec, process))
        return process

    sup = workers.Supervisor(make_config(workers=count, **overrides), reactor, signals=signals, spawn=spawn, listen_socket=FakeSocket())
    sup.rundir = "/run/pgtwist-test"
    sup.startService()
    return sup, reactor, spawned


def killed():
    return error.ProcessTerminated(signal=signal.SIGKILL)


def test_the_supervisor_starts_every_worker_with_its_number():
    sup, _, spawned = make_supervisor(3)
    assert [spec.to_arg() for spec, _ in spawned] == [f"{i}/3:3:/run/pgtwist-test" for i in range(3)]
    assert sup.alive() == [0, 1, 2]


def test_a_dead_worker_is_restarted_with_growing_back_off_that_resets_once_it_lived():
    sup, clock, spawned = make_supervisor(2)
    delays = []
    for _ in range(4):  # dies at once, four times in a row: 0.5, 1, 2, 4 s
        spawned[-1 if len(spawned) > 2 else 0][1].end(killed())
        assert sup.alive() == [1]
        start = clock.seconds()
        while len(sup.alive()) < 2:
            clock.advance(0.25)
        delays.append(clock.seconds() - start)
    assert delays == [0.5, 1.0, 2.0, 4.0]
    clock.advance(workers.STABLE_AFTER)  # it lived: the next death starts the back-off over
    spawned[-1][1].end(error.ProcessTerminated(exitCode=1))
    clock.advance(0.5)
    assert sup.alive() == [0, 1]
    assert sup.restarts == 5
    assert workers.restart_delay(50) == workers.BACKOFF_MAX


def test_only_a_restart_is_told_it_is_one_and_which_workers_serve():
    # (a restart takes on the console's state from a worker serving now; at the first start none
    # has any, and one that was not ready yet, or is being restarted too, would only be waited for)
    sup, clock, spawned = make_supervisor(3)
    sup.worker_ready(spawned[0][1].pid)
    spawned[2][1].end(killed())
    clock.advance(workers.BACKOFF_FIRST)
    args = [spec.to_arg() for spec, _ in spawned]
    assert args == ["0/3:3:/run/pgtwist-test", "1/3:3:/run/pgtwist-test", "2/3:3:/run/pgtwist-test", "2/3r0:3:/run/pgtwist-test"]
    assert workers.WorkerSpec.parse(args[-1]).peers == (0,)
    sup.worker_ready(spawned[1][1].pid)
    spawned[3][1].end(killed())
    clock.advance(60)
    assert spawned[-1][0].to_arg() == "2/3r0,1:3:/run/pgtwist-test"
    assert workers.WorkerSpec.parse("2/3r:3:/d") == workers.WorkerSpec(2, 3, 3, "/d", True, ())


def test_sighup_reaches_every_worker():
    sup, _, spawned = make_supervisor(2)
    sup.reload()
    assert [p.signals for _, p in spawned] == [[signal.SIGHUP], [signal.SIGHUP]]


def test_the_supervisors_signal_handlers_pass_sighup_on_drain_on_sigterm_and_are_restored_at_stop():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}
    sup, reactor, spawned = make_supervisor(2, signals=True)
    try:
        assert signal.SIGHUP not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # (held only until now)
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
        assert [p.signals for _, p in spawned] == [[signal.SIGHUP], [signal.SIGHUP]]
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert sup._graceful and reactor.hasStopped
    finally:
        d = sup.stopService()
        for _, process in spawned:
            process.end(error.ProcessDone(0))
    assert d.called
    assert [p.signals for _, p in spawned] == [[signal.SIGHUP, signal.SIGTERM]] * 2
    assert {sig: signal.getsignal(sig) for sig in previous} == previous


def test_the_supervisor_holds_sighup_from_listening_until_its_handler_is_in():
    # Its socket accepts from startService, its handlers go in once the reactor runs: a SIGHUP
    # in between found the default action, which ends the process (seen in CI: exit -1).
    reactor = MemoryReactorClock()
    reactor.listenUNIXDatagram = lambda path, proto: None
    sup = workers.Supervisor(make_config(workers=2), reactor, signals=True, spawn=lambda *a: None, listen_socket=FakeSocket())
    sup.rundir = "/run/pgtwist-test"
    previous = signal.getsignal(signal.SIGHUP)
    try:
        sup.startService()
        assert signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        sup._install_signal_handlers()
        assert signal.SIGHUP not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        sup._signal_handlers.restore()
    assert signal.getsignal(signal.SIGHUP) == previous


def test_a_graceful_stop_drains_every_worker_and_restarts_none():
    sup, clock, spawned = make_supervisor(2)
    spawned[0][1].end(killed())  # a restart is pending when the stop comes
    sup._graceful = True
    d = sup.stopService()
    assert sup.socket.closed
    assert spawned[1][1].signals == [signal.SIGTERM]
    assert not d.called
    spawned[1][1].end(error.ProcessDone(0))
    assert d.called
    clock.advance(60)
    assert len(spawned) == 2  # the pending restart was cancelled


def real_supervisor(count):
    """A supervisor that makes its own sockets (on a free loopback port) and records each worker's fd."""
    reactor = MemoryReactorClock()
    reactor.hasRun = True
    reactor.listenUNIXDatagram = lambda path, proto: None
    spawned = []

    def spawn(reactor_, proto, spec, config_path, fds):
        process = FakeProcess(proto)
        spawned.append((fds[3], process))
        return process

    with socket.socket() as probe:  # (a free port: the config refuses port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sup = workers.Supervisor(make_config(workers=count, listen=f"127.0.0.1:{port}"), reactor, spawn=spawn)
    sup.rundir = "/run/pgtwist-test"
    sup.startService()
    return sup, reactor, spawned


@pytest.mark.skipif(not workers.REUSEPORT, reason="this kernel has no SO_REUSEPORT")
def test_each_worker_listens_on_a_socket_of_its_own_in_one_reuseport_group():
    # One shared socket let the worker whose epoll was woken first take every idle-time client.
    sup, _, spawned = real_supervisor(3)
    try:
        fds = [fd for fd, _ in spawned]
        assert len(set(fds)) == 3
        ports = {s.getsockname()[1] for s in sup.sockets}
        assert len(ports) == 1
    finally:
        sup._stopping = True
        for s in sup.sockets:
            s.close()


@pytest.mark.skipif(not workers.REUSEPORT, reason="this kernel has no SO_REUSEPORT")
def test_a_dead_workers_socket_is_closed_while_others_serve_and_made_again_for_its_restart():
    sup, clock, spawned = real_supervisor(2)
    try:
        port = sup.sockets[0].getsockname()[1]
        old = sup.sockets[0]
        spawned[0][1].end(killed())
        assert sup.sockets[0] is None and old.fileno() == -1  # (its share goes to worker 1)
        clock.advance(workers.BACKOFF_FIRST)
        assert sup.alive() == [0, 1]
        assert sup.sockets[0] is not None and sup.sockets[0].getsockname()[1] == port
        assert spawned[-1][0] == sup.sockets[0].fileno()
        spawned[1][1].end(killed())
        spawned[2][1].end(killed())  # the last one alive: its socket is kept, clients queue for it
        assert sup.sockets[0] is not None
    finally:
        sup._stopping = True
        for s in sup.sockets:
            if s is not None:
                s.close()


def test_a_worker_that_outstays_the_drain_is_killed():
    sup, clock, spawned = make_supervisor(2, shutdown_timeout=5)
    sup._graceful = True
    d = sup.stopService()
    spawned[0][1].end(error.ProcessDone(0))
    clock.advance(5 + 10)
    assert spawned[1][1].signals == [signal.SIGTERM, signal.SIGKILL]
    spawned[1][1].end(killed())
    assert d.called


def test_worker_output_becomes_the_supervisors_log_lines():
    from twisted.logger import globalLogPublisher

    sup, _, spawned = make_supervisor(1 + 1)
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        proto = spawned[1][1].proto
        proto.childDataReceived(1, b"2026-12-05T06:00:00+0000 [pgtwist.x#info] hello\npart")
        proto.childDataReceived(2, b"stderr line\n")
        proto.childDataReceived(1, b"ial\n")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [e["line"] for e in seen if e.get("log_format") == "worker {index}: {line}"]
    assert lines == ["[pgtwist.x#info] hello", "stderr line", "partial"]


# -- the config --------------------------------------------------------------------------------------


def test_workers_config():
    assert make_config().workers == 1
    assert make_config(workers=4).workers == 4
    assert make_config(workers="auto").workers >= 1
    for bad in (0, -1, 257, "two", 1.5, True):
        with pytest.raises(configmod.ConfigError, match="workers"):
            make_config(workers=bad)
    assert configmod.needs_restart("workers")


# -- what the admin sees ---------------------------------------------------------------------------


def test_show_lists_every_workers_rows_with_a_worker_column():
    from pgtwist.admin import console, inspect

    from tests.harness.admin_support import TestProxy

    proxy = TestProxy(make_config())
    proxy.pool_for(proxy.config.databases["appdb"], "app")

    class Link:
        def every_worker(self, what, rows):
            assert what == "inspect.pools"
            other = dict(rows[0], node="db2:5432")
            return defer.succeed(([dict(r, worker=0) for r in rows] + [dict(other, worker=1)], [2]))

    assert console.describe("SHOW NODE_POOLS", proxy) == inspect.POOL_COLUMNS  # (one process: as ever)
    plain = console.run(proxy, "SHOW NODE_POOLS")
    assert plain.columns == inspect.POOL_COLUMNS
    proxy.worker = Link()
    result = console.run(proxy, "SHOW NODE_POOLS")
    assert result.columns == inspect.POOL_COLUMNS + (peers.WORKER_COLUMN,)
    assert console.describe("SHOW NODE_POOLS", proxy) == result.columns
    assert [row[-1] for row in result.rows] == [0, 1]
    assert result.notices == ["worker 2 did not answer: its rows are missing"]


def test_one_metrics_text_for_every_worker():
    from pgtwist.service import workermetrics

    text = (
        "# HELP pgbalance_clients_accepted_total Client connections accepted since start.\n"
        "# TYPE pgbalance_clients_accepted_total counter\n"
        "pgbalance_clients_accepted_total {n}\n"
        "# HELP pgbalance_pool_size Server connections a pool may open.\n"
        "# TYPE pgbalance_pool_size gauge\n"
        'pgbalance_pool_size{{database="appdb",user="app",node="db1:5432"}} 20.0\n'
    )

    class Sup:
        count = 2
        restarts = 1

        def alive(self):
            return [0, 1]

    out = workermetrics.exposition(Sup(), {0: text.format(n=3), 1: text.format(n=4)}).decode()
    assert out.count("# TYPE pgbalance_clients_accepted_total counter") == 1
    assert 'pgbalance_clients_accepted_total{worker="0"} 3.0' in out
    assert 'pgbalance_clients_accepted_total{worker="1"} 4.0' in out
    assert 'pgbalance_pool_size{database="appdb",node="db1:5432",user="app",worker="1"} 20.0' in out
    assert "pgbalance_workers_up 2.0" in out
    assert "pgbalance_worker_restarts_total 1.0" in out


def test_the_supervisor_checks_the_manhole_once_before_any_worker_starts(tmp_path):
    from pgtwist.admin import ManholeError

    manhole = {"listen": "127.0.0.1:6022", "authorized_keys": str(tmp_path / "missing"), "host_key": str(tmp_path / "hk")}
    with pytest.raises(ManholeError, match="authorized_keys"):
        workers.Supervisor(make_config(workers=2, manhole=manhole), MemoryReactorClock(), spawn=None, listen_socket=FakeSocket())
    (tmp_path / "missing").write_text("")
    workers.Supervisor(make_config(workers=2, manhole=manhole), MemoryReactorClock(), spawn=None, listen_socket=FakeSocket())
    assert (tmp_path / "hk").exists()  # made here, not by two workers at once


def test_kill_goes_to_the_worker_an_id_names_and_nowhere_else():
    clock = MemoryReactorClock()
    link = workers.WorkerLink(workers.WorkerSpec(0, 2, 3, "/nonexistent-pgtwist-rundir"), clock)
    # Ids of this worker or of no worker: not killed elsewhere, and nobody is asked.
    for client_id in ("c3", "w0.c3", "w2.c1", "wx.c1"):
        assert link.kill_elsewhere(client_id).result is False
    assert clock.unixClients == []
    # One of a worker that does not answer: asked, and not killed once the wait is over.
    asked = link.kill_elsewhere("w1.c3")
    assert [c[0] for c in clock.unixClients] == ["/nonexistent-pgtwist-rundir/http-1.sock"] and not asked.called
    clock.advance(peers.SHOW_TIMEOUT)
    assert asked.result is None  # (not an answer: the console says so, not "no such client")


def test_a_limit_below_the_number_of_workers_is_warned_of():
    # Each worker keeps at least one connection: the whole pgtwist then has one per worker.
    config = make_config(workers=4, max_db_connections=2, users={"app": {"password": "pw", "max_user_connections": 8}, "admin": {"password": "adminpw"}})
    assert config.warnings == ("max_db_connections: below workers (4) for appdb: each worker keeps one connection, 4 in all",)
    assert make_config(workers=2, max_db_connections=2).warnings == ()


# -- a restarted worker takes on the console's state ---------------------------------------------------


class Asked:
    """request() for console_state: each worker's answers in turn (an exception is raised), and a
    clock that each answer moves on by what it took."""

    def __init__(self, answers: dict[int, list], took: float = 0.0):
        self.answers = answers
        self.took = took
        self.now = 100.0
        self.asked: list[tuple[int, float]] = []

    def __call__(self, path, method, target, timeout):
        assert (method, target) == ("GET", "/state")
        index = int(path.rsplit("-", 1)[1].split(".")[0])
        self.asked.append((index, timeout))
        answer = self.answers[index].pop(0)
        if isinstance(answer, Exception):
            self.now += timeout if isinstance(answer, TimeoutError) else 0.0
            raise answer
        self.now += self.took
        return answer

    def clock(self):
        return self.now


STATE = {"paused": ["appdb"], "disabled": [], "set": {"query_wait_timeout": "7"}}


def test_a_restart_asks_the_others_in_turn_and_takes_the_first_answer():
    import json

    link = workers.WorkerLink(workers.WorkerSpec(1, 4, 3, "/run/pgtwist", restarted=True, peers=(0, 2, 3)), MemoryReactorClock())
    # Worker 0 is dead (its socket refuses), 2 is starting too (an old pgtwist's 404, say), 3 answers.
    ask = Asked({0: [ConnectionRefusedError()], 2: [(404, b"no such resource")], 3: [(200, json.dumps(STATE).encode())]})
    assert link.console_state(ask=ask, now=ask.clock) == (3, STATE)
    assert [i for i, _ in ask.asked] == [0, 2, 3]


def test_a_busy_worker_is_asked_again_until_the_wait_is_over():
    # Worker 0 is blocked on this one (its console asking it, which does not answer until it
    # runs): free once its own request() times out, it answers the second time.
    import json

    link = workers.WorkerLink(workers.WorkerSpec(1, 2, 3, "/run/pgtwist", restarted=True, peers=(0,)), MemoryReactorClock())
    ask = Asked({0: [TimeoutError(), TimeoutError(), (200, json.dumps(STATE).encode())]})
    assert link.console_state(ask=ask, now=ask.clock) == (0, STATE)
    assert ask.asked == [(0, workers.STATE_TRY)] * 3
    assert 2 * workers.STATE_TRY < workers.STATE_WAIT and workers.STATE_WAIT > peers.SHOW_TIMEOUT


def test_with_no_worker_answering_a_restart_waits_no_more_than_state_wait():
    link = workers.WorkerLink(workers.WorkerSpec(0, 3, 3, "/run/pgtwist", restarted=True, peers=(1, 2)), MemoryReactorClock())
    ask = Asked({1: [TimeoutError()] * 10, 2: [TimeoutError()] * 10})
    assert link.console_state(ask=ask, now=ask.clock) is None
    assert ask.now - 100.0 == pytest.approx(workers.STATE_WAIT)
    ask = Asked({1: [FileNotFoundError()], 2: [ConnectionRefusedError()]})  # (every other one dead: at once)
    assert link.console_state(ask=ask, now=ask.clock) is None and ask.now == 100.0


def test_a_worker_serves_its_console_state():
    import json

    from twisted.web.test.requesthelper import DummyRequest

    from tests.harness.admin_support import TestProxy

    proxy = TestProxy(make_config())
    proxy.paused.add("*")
    proxy.overrides["pool_size"] = "3"
    request = DummyRequest([])
    body = peers.StateResource(proxy).render_GET(request)
    assert json.loads(body) == {"paused": ["*"], "disabled": [], "set": {"pool_size": "3"}, "sure": True}
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]


def test_a_restarted_worker_takes_the_state_and_says_so_or_says_it_starts_from_the_file(monkeypatch):
    from twisted.logger import Logger, formatEvent

    from tests.harness.admin_support import TestProxy

    class Svc:
        def __init__(self, found):
            self.worker = workers.WorkerSpec(1, 2, 3, "/run/pgtwist", restarted=True)
            self.proxy = TestProxy(make_config())
            self.proxy.worker = workers.WorkerLink(self.worker, self.proxy.reactor)
            self.proxy.worker.console_state = lambda: found
            self.config = self.proxy.config

    events: list[dict] = []
    monkeypatch.setattr(workers, "log", Logger(namespace="test", observer=events.append))
    svc = Svc((0, dict(STATE, disabled=["gone"])))
    workers.take_console_state(svc)
    assert svc.proxy.paused == {"appdb"} and svc.config.query_wait_timeout == 7  # (the service's config too)
    svc = Svc(None)
    workers.take_console_state(svc)
    assert svc.proxy.paused == set() and svc.proxy.overrides == {}
    assert [formatEvent(e) for e in events] == [
        "worker 1 restarted: took the console's state from worker 0: PAUSE appdb; SET query_wait_timeout = 7",
        'worker 1 restarted: not taken from worker 0: DISABLE gone: no database "gone"',
        "worker 1 restarted: no other worker answered within 1.5 s; it starts from <memory> "
        "(not paused, disabled or SET as the console may have left the others)",
    ]


# -- systemd (Type=notify) under workers = N ---------------------------------------------------


def test_a_workers_notify_socket_is_the_supervisors():
    spec = workers.WorkerSpec(1, 2, 3, "/run/pgtwist-test")
    env = workers.worker_environ({"NOTIFY_SOCKET": "/run/systemd/notify", "HOME": "/h"}, spec)
    assert env == {"NOTIFY_SOCKET": "/run/pgtwist-test/notify.sock", "HOME": "/h", "PYTHONPATH": ROOT}
    # (without a service manager too: a worker's READY=1 tells the supervisor it serves)
    assert workers.worker_environ({"HOME": "/h"}, spec) == env


ROOT = str(Path(workers.__file__).resolve().parents[2])  # the directory that holds this pgtwist


def test_workers_import_the_supervisors_pgtwist_not_their_working_directorys(monkeypatch):
    spec = workers.WorkerSpec(1, 2, 3, "/run/pgtwist-test")
    # Its location goes first on their import path, before what the supervisor was given, once.
    assert workers.worker_environ({"PYTHONPATH": "/opt/x"}, spec)["PYTHONPATH"] == ROOT + os.pathsep + "/opt/x"
    assert workers.worker_environ({"PYTHONPATH": ROOT}, spec)["PYTHONPATH"] == ROOT
    # Installed (in a site directory), it is found there as the supervisor found it: a site
    # directory first on PYTHONPATH would come before the standard library.
    site_packages = sysconfig.get_paths()["purelib"]
    monkeypatch.setattr(workers, "_PGTWIST_ROOT", site_packages)
    assert "PYTHONPATH" not in workers.worker_environ({}, spec)
    assert workers.worker_environ({"PYTHONPATH": "/opt/x"}, spec)["PYTHONPATH"] == "/opt/x"
    # and `python -c` leaves the working directory off it (-P): a pgtwist tree there is not theirs.
    spawned = []

    class Reactor:
        def spawnProcess(self, proto, executable, argv, env, path, childFDs):
            spawned.append(argv)

    workers.spawn_twistd(Reactor(), None, spec, "/etc/pgtwist.toml", {})
    (argv,) = spawned
    assert argv[1:3] == ["-P", "-c"]


def notifying_supervisor(count=2, environ=None, listen=None):
    """A supervisor told of its workers' READY=1 (ready()), telling a fake service manager (told);
    *listen*: a real address, whose sockets it makes itself (else one fake socket)."""
    reactor = MemoryReactorClock()
    reactor.hasRun = True
    reactor.callFromThread = lambda f, *a, **kw: f(*a, **kw)
    listened, told, spawned = [], [], []
    reactor.listenUNIXDatagram = lambda path, proto: listened.append((path, proto))

    def spawn(reactor_, proto, spec, config_path, fds):
        process = FakeProcess(proto)
        spawned.append((spec, process))
        return process

    sup = workers.Supervisor(
        make_config(workers=count, **({"listen": listen} if listen else {})), reactor, spawn=spawn,
        listen_socket=None if listen else FakeSocket(),
        environ={"NOTIFY_SOCKET": "/run/systemd/notify"} if environ is None else environ,
        notify=lambda state, env: told.append(state),
    )
    sup.rundir = "/run/pgtwist-test"
    sup.startService()
    return sup, reactor, spawned, listened, told


def ready(listened, process):
    listened[0][1].datagramReceived(f"READY=1\nSTATUS=accepting clients\nMAINPID={process.pid}".encode(), None)


def test_the_supervisor_is_ready_for_systemd_once_every_worker_is_and_says_so_as_itself():
    # With NotifyAccess=main systemd heeds the process it started alone: the workers' READY=1
    # was ignored and the unit's start timed out.
    sup, clock, spawned, listened, told = notifying_supervisor(2)
    assert [path for path, _ in listened] == ["/run/pgtwist-test/notify.sock"]
    ready(listened, spawned[0][1])
    assert told == []
    ready(listened, spawned[0][1])
    assert told == []  # (the same worker twice is not both)
    ready(listened, spawned[1][1])
    assert len(told) == 1 and told[0].startswith("READY=1\n") and f"MAINPID={os.getpid()}" in told[0]
    # A worker restarted later is ready again on its own: the unit was ready long since.
    spawned[0][1].proto.processEnded(Failure(killed()))
    clock.advance(60)
    ready(listened, spawned[-1][1])
    assert len(told) == 1
    sup.shutdown(graceful=True)
    assert told[-1].startswith("STOPPING=1")


def test_a_ready_from_a_process_that_is_no_worker_now_counts_for_nothing():
    sup, clock, spawned, listened, told = notifying_supervisor(2)
    ready(listened, spawned[0][1])
    spawned[1][1].proto.processEnded(Failure(killed()))  # (died before its READY=1 came)
    ready(listened, spawned[1][1])
    assert told == []
    clock.advance(60)
    ready(listened, spawned[-1][1])
    assert len(told) == 1


def test_without_a_service_manager_the_supervisor_tells_none():
    sup, _, spawned, listened, told = notifying_supervisor(2, environ={})
    for _, process in spawned:
        ready(listened, process)
    assert all(w.ready for w in sup.workers)
    sup.shutdown(graceful=True)
    assert told == []


def test_a_restart_prefers_a_worker_that_knows_the_consoles_state_to_one_that_started_from_the_file():
    # Worker 2, restarted while the others were busy, started from the file: it says so, and a
    # later restart takes worker 3's state instead (review: the first answer won, even that one's).
    import json

    link = workers.WorkerLink(workers.WorkerSpec(1, 4, 3, "/run/pgtwist", restarted=True, peers=(2, 3)), MemoryReactorClock())
    from_file = {"paused": [], "disabled": [], "set": {}, "sure": False}
    ask = Asked({2: [(200, json.dumps(from_file).encode())], 3: [(200, json.dumps(dict(STATE, sure=True)).encode())]})
    assert link.console_state(ask=ask, now=ask.clock) == (3, dict(STATE, sure=True))
    ask = Asked({2: [(200, json.dumps(from_file).encode())], 3: [ConnectionRefusedError()]})
    assert link.console_state(ask=ask, now=ask.clock) == (2, from_file)  # (none better: the file's)


def test_a_console_state_that_is_not_one_is_skipped_not_a_crash_at_start():
    from pgtwist.admin import actions

    from tests.harness.admin_support import TestProxy

    proxy = TestProxy(make_config())
    for state in ({"paused": "appdb"}, {"set": ["x"]}, {"disabled": [1]}, {"set": {"pool_size": 3}}):
        taken, skipped = actions.take_state(proxy, state)
        assert taken == [] and len(skipped) == 1 and skipped[0].startswith("not a console state")
    assert proxy.paused == set() and proxy.disabled == set()


@pytest.mark.skipif(not workers.REUSEPORT, reason="one shared socket without SO_REUSEPORT")
def test_ready_comes_even_when_worker_0_died_before_every_worker_was_ready():
    # (Review.) Worker 0's socket is the supervisor's self.socket, closed while worker 0 is dead
    # (_close_socket_of): READY=1's status line read its address there and raised, after
    # marking itself told, so systemd never heard it and stopped the unit.
    with socket.socket() as probe:  # (a free port: the config refuses port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sup, reactor, spawned, listened, told = notifying_supervisor(2, listen=f"127.0.0.1:{port}")
    try:
        ready(listened, spawned[1][1])
        spawned[0][1].proto.processEnded(Failure(killed()))  # worker 0 dies before its READY=1
        reactor.advance(60)
        ready(listened, spawned[-1][1])  # its restart is ready: every worker is
        assert len(told) == 1 and told[0].startswith("READY=1") and f":{port} (2 workers)" in told[0]
    finally:
        for sock in {id(x): x for x in [sup.socket, *sup.sockets] if x is not None}.values():
            sock.close()


def test_the_workers_sockets_go_under_tmp_when_tmpdir_is_too_deep_for_a_socket_path(tmp_path):
    shallow = workers.make_rundir(4, parent=str(tmp_path))
    assert os.path.dirname(shallow) == str(tmp_path) and os.stat(shallow).st_mode & 0o777 == 0o700
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    import tempfile
    from unittest import mock

    with mock.patch.object(tempfile, "tempdir", str(deep)):
        rundir = workers.make_rundir(4)
    try:
        assert os.path.dirname(rundir) == "/tmp" and os.stat(rundir).st_mode & 0o777 == 0o700
        assert len(workers.WorkerSpec(3, 4, 3, rundir).notice_socket(3)) <= workers.SUN_PATH_MAX
        assert list(deep.iterdir()) == []  # (the first one, too deep, is gone)
    finally:
        os.rmdir(rundir)
