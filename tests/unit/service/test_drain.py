"""Graceful shutdown: clients at rest get FATAL 57P01 at once, busy ones when they come to rest or at the timeout."""

import pytest

from pgtwist.service import drain
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.admin_support import TestProxy, client, make_config, messages


@pytest.fixture
def proxy():
    return TestProxy(make_config())


def errors_of(data: bytes) -> list[str]:
    return [m.decode_fields(b)["C"] for t, b in messages(data) if t == p.ERROR_RESPONSE]


def test_at_rest(proxy):
    app, _ = client(proxy)
    assert app.at_rest()  # linked, idle, nothing owed
    app.got_data(m.query("BEGIN"))
    assert not app.at_rest()  # a query in flight
    app.server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    assert not app.at_rest()  # in a transaction
    app.got_data(m.query("COMMIT"))
    app.server.got_data(m.command_complete("COMMIT") + m.ready_for_query(p.TX_IDLE))
    assert app.at_rest()
    app.got_data(m.parse("", "SELECT 1"))
    assert not app.at_rest()  # extended protocol batch without its Sync yet


def finish(session):
    """What the reactor does after loseConnection: connectionLost."""
    session.connection_lost(None)


def test_drain_closes_idle_clients_and_waits_for_transactions(proxy):
    clock = proxy.clock
    idle, idle_t = client(proxy)
    busy, busy_t = client(proxy)
    busy.got_data(m.query("INSERT"))
    busy.server.got_data(m.command_complete("INSERT 0 1") + m.ready_for_query(p.TX_IN_TRANSACTION))
    done = []
    drain.drain(proxy, clock, 10).addCallback(done.append)
    assert errors_of(idle_t.value()) == ["57P01"] and idle_t.disconnecting
    assert not busy_t.disconnecting
    finish(idle)
    clock.advance(1)
    assert not done
    busy.got_data(m.query("COMMIT"))
    busy.server.got_data(m.command_complete("COMMIT") + m.ready_for_query(p.TX_IDLE))
    out = busy_t.value()
    assert out.index(b"COMMIT") < out.index(b"57P01")  # the commit's answer first, then goodbye
    assert busy_t.disconnecting
    finish(busy)
    clock.advance(drain.TICK)
    assert done == [None] and proxy.draining


def test_drain_timeout_closes_the_rest(proxy):
    clock = proxy.clock
    busy, busy_t = client(proxy)
    busy.got_data(m.query("BEGIN"))
    busy.server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    done = []
    drain.drain(proxy, clock, 3).addCallback(done.append)
    clock.advance(2.9)
    assert not busy_t.disconnecting
    clock.advance(0.2)
    assert errors_of(busy_t.value()) == ["57P01"] and busy_t.disconnecting
    assert not done
    clock.pump([drain.TICK] * int(drain.GRACE / drain.TICK + 2))  # the connection never reports closed
    assert done == [None]


def test_drain_with_nobody_is_immediate(proxy):
    done = []
    drain.drain(proxy, proxy.clock, 30).addCallback(done.append)
    assert done == [None] and proxy.clock.getDelayedCalls() == []
