"""What a worker asks of the others (pgtwist.service.peers): asked all at once, answered later, never blocking."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web import server

from pgtwist.admin import actions
from pgtwist.service import peers, workers

from tests.harness.admin_support import TestProxy, client, make_config


def serve(proxy, path: str):
    """A worker's unix socket as worker_services makes it: the views and console commands."""
    from twisted.web import resource

    root = resource.Resource()
    root.putChild(b"show", peers.ShowResource(proxy))
    root.putChild(b"kill", peers.KillResource(proxy))
    root.putChild(b"pause", peers.PauseResource(proxy, actions.pause))
    root.putChild(b"paused", peers.PausedResource(proxy))
    root.putChild(b"set", peers.SetResource(proxy))
    site = server.Site(root)
    site.noisy = False
    return reactor.listenUNIX(path, site)


@pytest_twisted.inlineCallbacks
def test_the_other_workers_are_asked_at_once_and_a_gone_one_is_named(tmp_path):
    # Worker 0 of 3 asks: worker 1 serves, worker 2 is gone (no socket).
    theirs = TestProxy(make_config())
    theirs.pool_for(theirs.config.databases["appdb"], "app")
    spec = workers.WorkerSpec(0, 3, 3, str(tmp_path))
    port = serve(theirs, spec.http_socket(1))
    try:
        link = workers.WorkerLink(spec, reactor)
        rows, missing = yield link.every_worker("bouncer.pools", [{"database": "mine"}]).addTimeout(10, reactor)
        assert [(r["worker"], r["database"]) for r in rows][:2] == [(0, "mine"), (1, "appdb")] and missing == [2]
        missing = yield link.everywhere("pause", "appdb").addTimeout(10, reactor)
        assert missing == [2] and actions.is_paused(theirs, "appdb")
        missing = yield link.everywhere("set", "query_wait_timeout", "7").addTimeout(10, reactor)
        assert missing == [2] and theirs.config.query_wait_timeout == 7
        missing = yield link.everywhere("set", "listen", "0.0.0.0:1").addTimeout(10, reactor)
        assert missing == [1, 2]  # (refused there: a setting a reload cannot change)
        assert (yield link.kill_elsewhere("w1.c99")) is False  # (no such client there)
        assert (yield link.kill_elsewhere("w2.c1")) is None  # (worker 2 is gone: no answer)
        assert (yield peers.show_rows(reactor, spec.http_socket(1), "bouncer.pools"))[0]["database"] == "appdb"
        with pytest.raises(ValueError):
            yield peers.show_rows(reactor, spec.http_socket(1), "bouncer.nosuchview")
    finally:
        yield port.stopListening()


def test_a_worker_that_takes_the_request_and_never_answers_costs_show_timeout_and_is_named():
    # (A frozen worker: its socket's queue takes the connection, nobody reads it.) Nothing blocks:
    # every_worker returns at once, and the answer comes when the clock says so.
    clock = MemoryReactorClock()
    link = workers.WorkerLink(workers.WorkerSpec(1, 3, 3, "/run/pgtwist-x"), clock)
    answered = []
    link.every_worker("bouncer.clients", [{"id": "w1.c1"}]).addCallback(answered.append)
    assert [c[0] for c in clock.unixClients] == ["/run/pgtwist-x/http-0.sock", "/run/pgtwist-x/http-2.sock"]
    frozen = clock.unixClients[0][1].buildProtocol(None)
    frozen.makeConnection(StringTransport())
    assert frozen.transport.value().startswith(b"GET /show/bouncer.clients HTTP/1.0\r\n")
    clock.advance(peers.SHOW_TIMEOUT - 0.01)
    assert answered == []
    clock.advance(0.01)
    assert answered == [([{"id": "w1.c1", "worker": 1}], [0, 2])]
    assert frozen.transport.disconnecting  # (its connection is not kept)


def test_an_answer_is_the_whole_reply_however_it_arrives():
    clock = MemoryReactorClock()
    asked = []
    peers.ask(clock, "/run/pgtwist-x/http-1.sock", "POST", "/resume/").addCallback(asked.append)
    proto = clock.unixClients[0][1].buildProtocol(None)
    proto.makeConnection(StringTransport())
    reply = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\ndone\n"
    for byte in range(len(reply)):
        proto.dataReceived(reply[byte : byte + 1])
    assert asked == []
    proto.connectionLost(None)
    assert asked == [(200, b"done\n")]
    assert peers.parse(b"garbage") == (0, b"")


@pytest_twisted.inlineCallbacks
def test_a_pause_is_complete_on_another_worker_once_its_server_connections_are_gone(tmp_path):
    # PgBouncer's PAUSE answers once no server connection is left: the console of the worker it
    # was given on waits for the others' too (PausedResource), not only until they were told.
    theirs = TestProxy(make_config())
    app, _ = client(theirs)  # (a client in a transaction: its server connection in use)
    spec = workers.WorkerSpec(0, 2, 3, str(tmp_path))
    port = serve(theirs, spec.http_socket(1))
    try:
        link = workers.WorkerLink(spec, reactor)
        assert (yield link.everywhere("pause", "appdb").addTimeout(10, reactor)) == []
        complete = link.paused_everywhere("appdb", [1])
        for _ in range(500):  # (until the request is in and waits: its look is on their clock)
            if theirs.reactor.getDelayedCalls():
                break
            yield task.deferLater(reactor, 0.01)
        theirs.reactor.advance(actions.POLL * 3)
        assert not complete.called
        theirs.servers[0].connection_lost(Failure(ConnectionDone()))
        theirs.reactor.advance(actions.POLL)
        assert (yield complete.addTimeout(10, reactor)) == []
        (pool,) = theirs.pools.values()
        assert pool.paused and not pool.busy and not pool.idle
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_the_wait_for_a_pause_pauses_nothing_and_ends_when_the_asker_hangs_up(tmp_path):
    # (Review.) A RESUME that came in before the wait is asked for is not undone by it; and an
    # admin who leaves ends the other workers' waits (the asking side hangs up).
    theirs = TestProxy(make_config())
    app, _ = client(theirs)
    spec = workers.WorkerSpec(0, 2, 3, str(tmp_path))
    port = serve(theirs, spec.http_socket(1))
    try:
        link = workers.WorkerLink(spec, reactor)
        assert (yield link.paused_everywhere("appdb", [1]).addTimeout(10, reactor)) == []
        assert not actions.is_paused(theirs, "appdb")  # (not paused: answered at once, nothing paused)
        actions.pause(theirs, "appdb")
        waiting = link.paused_everywhere("appdb", [1])
        for _ in range(500):
            if theirs.reactor.getDelayedCalls():
                break
            yield task.deferLater(reactor, 0.01)
        waiting.cancel()
        for _ in range(500):  # (until worker 1 has seen the hang-up: its next look stops)
            theirs.reactor.advance(actions.POLL)
            if not theirs.reactor.getDelayedCalls():
                break
            yield task.deferLater(reactor, 0.01)
        assert not theirs.reactor.getDelayedCalls() and actions.is_paused(theirs, "appdb")
    finally:
        yield port.stopListening()


def test_a_scrape_of_a_worker_that_never_answers_ends_after_fetch_timeout():
    # The supervisor's /metrics and /readyz ask every worker: one frozen (its socket takes the
    # connection, nobody reads it) held the scrape for ever; it now counts as not answering.
    from pgtwist.service import workermetrics

    clock = MemoryReactorClock()
    fetched = []
    workermetrics.fetch(clock, "/run/pgtwist-x/http-1.sock", "/metrics").addCallback(fetched.append)
    frozen = clock.unixClients[0][1].buildProtocol(None)
    frozen.makeConnection(StringTransport())
    clock.advance(workermetrics.FETCH_TIMEOUT - 0.01)
    assert fetched == []
    clock.advance(0.01)
    assert fetched == [(0, b"")] and frozen.transport.disconnecting
