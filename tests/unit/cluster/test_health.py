"""ClusterMonitor against scripted fake nodes: MemoryReactorClock connects, StringTransport carries the bytes."""

import struct
from dataclasses import dataclass

import pytest
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from pgtwist.backend.login import ServerLogin
from pgtwist.cluster.catalog import FUNCTIONS_SQL, NOT_FETCHED
from pgtwist.cluster.health import PROBE_SQL, ClusterMonitor, PromoteError
from pgtwist.routing.policy import LAG_BYTES, parse_lsn, read_exclusions
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.framing import frame, pop_messages, pop_startup_packet

WELCOME = (
    m.authentication_ok()
    + m.parameter_status("server_version", "17.0")
    + m.backend_key_data(4242, b"\x00\x00\x00\x01")
    + m.ready_for_query()
)


@dataclass(frozen=True)
class Addr:
    host: str
    port: int

    def __str__(self):
        return f"{self.host}:{self.port}"


def data_row(values):
    out = [struct.pack("!h", len(values))]
    for v in values:
        out.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    return frame(p.DATA_ROW, b"".join(out))


def answer(values) -> bytes:
    return data_row(values) + m.command_complete("SELECT 1") + m.ready_for_query()


def primary_row(lsn="0/3000000", timeline=1):
    return [b"f", lsn.encode(), str(timeline).encode(), None, None, None]


def replica_row(lsn="0/3000000", timeline=1, delay="0", receive=None, upstream=True):
    return [
        b"t", lsn.encode(), str(timeline).encode(), None if delay is None else delay.encode(), (receive or lsn).encode(),
        b"t" if upstream else b"f",
    ]


class FakeConn:
    """The node's end of one connection from the monitor."""

    def __init__(self, proto, transport):
        self.proto = proto
        self.transport = transport

    def login(self):
        self.proto.dataReceived(WELCOME)

    def sent(self) -> list[tuple[int, bytes]]:
        buf = bytearray(self.transport.value())
        assert pop_startup_packet(buf, p.MAX_STARTUP_PACKET) is not None
        return pop_messages(buf, p.MAX_PROTOCOL_MESSAGE)

    def queries(self) -> list[str]:
        return [m.decode_query(body) for t, body in self.sent() if t == p.QUERY]

    def reply(self, values):
        self.proto.dataReceived(answer(values))

    def lose(self):
        self.proto.connectionLost(Failure(ConnectionDone()))


class Harness:
    def __init__(self, count=3, **kw):
        self.reactor = MemoryReactorClock()
        self.nodes = [Addr(f"10.0.0.{i + 1}", 5432) for i in range(count)]
        self.events: list[tuple[str, str]] = []
        self.logins = 0
        kw.setdefault("interval", 1.0)
        kw.setdefault("timeout", 2.0)
        kw.setdefault("backoff_max", 10.0)
        self.monitor = ClusterMonitor(
            self.reactor, self.nodes, self.login_factory, on_change=lambda s, what: self.events.append((s.name, what)), **kw
        )
        self.taken = 0

    def login_factory(self, node):
        self.logins += 1
        return ServerLogin("monitor", "postgres", None, node_name=str(node))

    def name(self, i):
        return str(self.nodes[i])

    def state(self, i):
        return self.monitor.states[self.name(i)]

    def attempts(self, i) -> list[int]:
        """Indexes into reactor.tcpClients of connection attempts to node *i*."""
        host = self.nodes[i].host
        return [k for k, c in enumerate(self.reactor.tcpClients) if c[0] == host]

    def accept(self, i, attempt=-1) -> FakeConn:
        k = self.attempts(i)[attempt]
        factory = self.reactor.tcpClients[k][2]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return FakeConn(proto, transport)

    def refuse(self, i, attempt=-1):
        k = self.attempts(i)[attempt]
        factory = self.reactor.tcpClients[k][2]
        factory.clientConnectionFailed(self.reactor.connectors[k], Failure(ConnectionRefusedError()))

    def up(self, i, row) -> FakeConn:
        """Accept the pending connection to node *i*, log in, answer the probe with *row*."""
        conn = self.accept(i)
        conn.login()
        assert conn.queries() == [PROBE_SQL]
        conn.reply(row)
        return conn

    def cluster(self):
        """Start: node 0 primary, nodes 1.. replicas; returns their connections."""
        self.monitor.start()
        conns = [self.up(0, primary_row("0/5000000"))]
        for i in range(1, len(self.nodes)):
            conns.append(self.up(i, replica_row("0/5000000")))
        return conns


# -- probing ----------------------------------------------------------------------------------------


def test_start_connects_to_every_node_and_reads_roles():
    h = Harness()
    h.monitor.start()
    assert [(c[0], c[1]) for c in h.reactor.tcpClients] == [("10.0.0.1", 5432), ("10.0.0.2", 5432), ("10.0.0.3", 5432)]
    assert all(c[3] == 2.0 for c in h.reactor.tcpClients)  # the connect is bounded by the timeout too
    h.up(0, primary_row("16/B374D848", timeline=3))
    h.up(1, replica_row("16/B3000000", timeline=3, delay="1.5", receive="16/B374D848"))
    h.up(2, replica_row("16/B374D848", timeline=3, delay="7.25"))
    p0, r1, r2 = h.state(0), h.state(1), h.state(2)
    assert (p0.role, p0.up, p0.lsn, p0.timeline) == ("primary", True, parse_lsn("16/B374D848"), 3)
    assert (r1.role, r1.up, r1.timeline) == ("replica", True, 3)
    assert r1.lag_bytes == 0x74D848 and r1.lag_seconds == 1.5
    assert r1.receive_lsn == parse_lsn("16/B374D848")
    # Replayed everything the primary had: any replay delay is an idle primary, not lag.
    assert r2.lag_bytes == 0 and r2.lag_seconds == 0.0
    assert p0.lag_bytes == 0 and p0.lag_seconds == 0.0
    assert p0.checked_at == 0.0 and p0.last_error is None
    assert h.events == [(h.name(0), "up"), (h.name(1), "up"), (h.name(2), "up")]
    assert h.monitor.running


def test_replica_lag_without_a_primary_is_against_the_freshest_replica():
    h = Harness(count=2)
    h.monitor.start()
    h.up(1, replica_row("0/100", delay="3.0"))
    # (Its own replay delay is kept: only a primary's position says a delay is an idle primary's.)
    assert h.state(1).lag_bytes == 0 and h.state(1).lag_seconds == 3.0
    h.up(0, primary_row("0/400"))
    assert h.state(1).lag_bytes == 0x300


def test_without_a_primary_a_replica_behind_another_gets_no_reads():
    """The primary froze or died: nothing new is written, and a replica that had not received
    all of it stays behind. It would serve reads older than the other replica's, which clients
    read (found by the freeze drill with 96 sessions: stale reads on the replica behind)."""
    h = Harness(count=3)
    h.monitor.start()
    h.up(1, replica_row("0/100"))
    h.up(2, replica_row("0/180"))
    assert h.state(1).lag_bytes == 0x80 and h.state(2).lag_bytes == 0
    exclusions = read_exclusions(list(h.monitor.states.values()), max_lag_bytes=1 << 20, max_lag_seconds=30.0)
    assert exclusions[h.name(1)] == LAG_BYTES and exclusions[h.name(2)] is None
    # Replicas of another timeline are not compared with these.
    h2 = Harness(count=3)
    h2.monitor.start()
    h2.up(1, replica_row("0/100", timeline=1))
    h2.up(2, replica_row("0/180", timeline=2))
    assert h2.state(1).lag_bytes == 0 and h2.state(2).lag_bytes == 0


def test_probes_repeat_every_interval_on_the_kept_connection():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row("0/100"))
    h.reactor.advance(0.99)
    assert conn.queries() == [PROBE_SQL]
    h.reactor.advance(0.01)
    assert conn.queries() == [PROBE_SQL, PROBE_SQL]
    conn.reply(primary_row("0/200"))
    assert h.state(0).lsn == 0x200 and h.state(0).checked_at == 1.0
    h.reactor.advance(1.0)
    assert len(conn.queries()) == 3
    assert len(h.reactor.tcpClients) == 1 and h.logins == 1  # one connection, one login


def test_probe_timeout_marks_down_and_hangs_up():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row())
    h.reactor.advance(1.0)  # second probe sent, never answered
    h.reactor.advance(1.99)
    assert h.state(0).up
    h.reactor.advance(0.01)
    assert not h.state(0).up
    assert h.state(0).last_error == "no answer within 2s"
    assert conn.transport.disconnecting  # aborted: a silent node never reads a Terminate
    assert h.events == [(h.name(0), "up"), (h.name(0), "down")]
    # A late answer on the dead connection changes nothing.
    conn.reply(primary_row("0/999"))
    assert not h.state(0).up and h.state(0).lsn != 0x999


def test_connect_that_never_completes_times_out():
    h = Harness(count=1)
    h.monitor.start()
    h.reactor.advance(2.0)
    assert h.state(0).last_error == "no answer within 2s"
    assert h.reactor.connectors[0].stoppedConnecting
    assert h.events == []  # it was never up: nothing changed


def test_backoff_doubles_up_to_the_maximum_then_resets():
    h = Harness(count=1)
    h.monitor.start()
    times = []
    for n in range(6):
        assert len(h.attempts(0)) == n + 1
        times.append(h.reactor.seconds())
        h.refuse(0)
        (timer,) = h.reactor.getDelayedCalls()  # only the next probe is pending
        h.reactor.advance(timer.getTime() - h.reactor.seconds() - 0.01)
        assert len(h.attempts(0)) == n + 1  # not a moment early
        h.reactor.advance(timer.getTime() - h.reactor.seconds())
    # failures: 1 -> 1 s, 2 -> 2 s, 3 -> 4 s, 4 -> 8 s, then capped at 10 s
    assert times == [0.0, 1.0, 3.0, 7.0, 15.0, 25.0]
    assert "refused" in h.state(0).last_error
    # Back up: the normal interval again, on the kept connection.
    conn = h.up(0, primary_row())
    assert h.state(0).up
    h.reactor.advance(1.0)
    assert len(conn.queries()) == 2 and len(h.attempts(0)) == 7


def test_login_refused_marks_down_with_the_nodes_message():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.accept(0)
    conn.proto.dataReceived(m.error_response("FATAL", "28P01", 'password authentication failed for user "monitor"'))
    assert not h.state(0).up
    assert h.state(0).last_error == 'password authentication failed for user "monitor"'
    assert conn.transport.disconnecting


def test_query_error_marks_down_and_reconnects_next_time():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row())
    h.reactor.advance(1.0)
    conn.proto.dataReceived(m.error_response("ERROR", "42501", "permission denied for function pg_walfile_name") + m.ready_for_query())
    assert not h.state(0).up
    assert "permission denied" in h.state(0).last_error
    h.reactor.advance(1.0)
    assert len(h.attempts(0)) == 2


def test_garbage_answer_marks_down():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.accept(0)
    conn.login()
    conn.reply([b"f", b"not an lsn", b"1", None, None])
    assert not h.state(0).up and h.state(0).last_error == "unexpected answer to the health probe"


def test_fatal_notice_on_an_idle_connection_then_reconnect():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row())
    conn.proto.dataReceived(m.error_response("FATAL", "57P01", "terminating connection due to administrator command"))
    conn.lose()
    assert h.state(0).up  # an idle connection dying is not a verdict; the next probe decides
    h.reactor.advance(1.0)
    assert len(h.attempts(0)) == 2
    h.up(0, primary_row())
    assert h.events == [(h.name(0), "up")]


def test_idle_connection_lost_reconnects_at_next_probe():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row())
    conn.lose()
    h.reactor.advance(1.0)
    assert len(h.attempts(0)) == 2
    h.refuse(0)
    assert not h.state(0).up


def test_broken_login_factory_counts_as_a_failed_probe():
    h = Harness(count=1)

    def bad(node):
        raise RuntimeError("no such user")

    h.monitor.login_factory = bad
    h.monitor.start()
    assert h.state(0).last_error == "cannot probe: no such user"
    h.reactor.advance(1.0)  # and it keeps trying
    assert h.state(0).last_error == "cannot probe: no such user"


# -- role changes and split brain -------------------------------------------------------------------


def test_failover_events_and_fencing():
    h = Harness()
    conns = h.cluster()
    h.events.clear()
    # The primary dies.
    conns[0].lose()
    h.reactor.advance(1.0)
    h.refuse(0)
    assert h.events == [(h.name(0), "down")]
    assert h.state(0).lag_bytes is None
    # Replica 1 is promoted: its next probe says primary on timeline 2.
    conns[1].reply(replica_row("0/5000000"))  # answer to the probe already sent at t=1
    h.reactor.advance(1.0)
    conns[1].reply(primary_row("0/5000100", timeline=2))
    conns[2].reply(replica_row("0/5000000"))
    assert h.events[-1] == (h.name(1), "promoted")
    assert h.state(2).lag_bytes == 0x100
    # The old primary comes back on the old timeline, still claiming primary: fenced.
    h.reactor.advance(1.0)  # its backoff: 1 s after the first failure
    h.up(0, primary_row("0/5000000", timeline=1))
    assert h.events[-2:] == [(h.name(0), "up"), (h.name(0), "fenced")]
    assert h.state(0).fenced and not h.state(1).fenced


def test_primary_demoted_event():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row())
    h.reactor.advance(1.0)
    conn.reply(replica_row())
    assert h.events == [(h.name(0), "up"), (h.name(0), "demoted")]


def test_fenced_node_unfenced_when_rebuilt_as_replica():
    h = Harness(count=2)
    h.monitor.start()
    a = h.up(0, primary_row(timeline=1))
    b = h.up(1, primary_row(timeline=2))
    assert h.state(0).fenced
    h.reactor.advance(1.0)
    a.reply(replica_row(timeline=2))
    b.reply(primary_row(timeline=2))
    assert not h.state(0).fenced
    assert h.events[-2:] == [(h.name(0), "demoted"), (h.name(0), "unfenced")]


def test_most_caught_up_replica():
    h = Harness()
    h.monitor.start()
    h.up(0, primary_row("0/900"))
    h.up(1, replica_row("0/500", receive="0/800"))
    h.up(2, replica_row("0/700", receive="0/700"))
    assert h.monitor.most_caught_up_replica().name == h.name(1)  # it will have more once it replays
    h.state(1).up = False
    assert h.monitor.most_caught_up_replica().name == h.name(2)
    h.state(2).fenced = True
    assert h.monitor.most_caught_up_replica() is None


def test_most_caught_up_replica_prefers_the_newest_timeline_then_received_wal():
    h = Harness(count=4)
    h.monitor.start()
    h.up(0, primary_row("0/900", timeline=2))
    h.up(1, replica_row("0/F00", receive="0/F00", timeline=1))  # more WAL, on the old history
    h.up(2, replica_row("0/600", receive="0/800", timeline=2))
    h.up(3, replica_row("0/700", receive="0/700", timeline=2))
    assert h.monitor.most_caught_up_replica().name == h.name(2)
    # Equal positions: the smallest name, the same choice from one call to the next.
    h.state(3).receive_lsn = h.state(2).receive_lsn
    h.state(3).lsn = h.state(2).lsn
    assert h.monitor.most_caught_up_replica().name == h.name(2)


def test_replica_keeps_its_timeline_and_loses_its_upstream_when_its_wal_receiver_stops():
    h = Harness(count=2)
    h.monitor.start()
    h.up(0, primary_row("0/900", timeline=3))
    r = h.up(1, replica_row("0/900", timeline=3))
    assert (h.state(1).timeline, h.state(1).upstream) == (3, True)
    # The primary died: no WAL receiver, so received_tli is NULL (0) and the upstream is gone.
    h.reactor.advance(1.0)
    r.reply(replica_row("0/900", timeline=0, upstream=False))
    assert (h.state(1).timeline, h.state(1).upstream) == (3, False)
    # Streaming from a promoted node on the next timeline: both follow.
    h.reactor.advance(1.0)
    r.reply(replica_row("0/A00", timeline=4))
    assert (h.state(1).timeline, h.state(1).upstream) == (4, True)


def test_a_replica_first_seen_without_a_wal_receiver_has_an_unknown_timeline():
    h = Harness(count=2)
    h.monitor.start()
    h.up(0, primary_row("0/900", timeline=2))
    h.up(1, replica_row("0/900", timeline=0, upstream=False))
    assert (h.state(1).timeline, h.state(1).upstream) == (0, False)
    assert h.state(0).upstream is None


def test_on_change_errors_do_not_stop_the_monitor():
    h = Harness(count=1)

    def boom(state, what):
        raise RuntimeError("observer bug")

    h.monitor.on_change = boom
    h.monitor.start()
    conn = h.up(0, primary_row())
    assert h.state(0).up
    h.reactor.advance(1.0)
    assert len(conn.queries()) == 2  # still probing on schedule


# -- mark_down and probe_now ------------------------------------------------------------------------


def test_mark_down_is_immediate_and_probes_right_away():
    h = Harness(count=2)
    conns = h.cluster()
    h.events.clear()
    h.monitor.mark_down(h.name(1), "connection refused")
    assert not h.state(1).up and h.state(1).last_error == "connection refused"
    assert h.events == [(h.name(1), "down")]
    assert conns[1].transport.disconnecting  # the kept connection likely died too
    assert len(h.attempts(1)) == 2  # a fresh probe at once
    h.up(1, replica_row("0/5000000"))
    assert h.events == [(h.name(1), "down"), (h.name(1), "up")]


def test_mark_down_of_a_down_node_keeps_its_backoff():
    h = Harness(count=1)
    h.monitor.start()
    h.refuse(0)
    h.monitor.mark_down(h.name(0), "again")
    h.monitor.mark_down("nowhere:1", "unknown node")
    assert len(h.attempts(0)) == 1
    assert h.events == []


def test_mark_down_during_a_probe_lets_the_probe_decide():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row())
    h.reactor.advance(1.0)  # probe in flight
    h.monitor.mark_down(h.name(0), "server closed the connection")
    assert not h.state(0).up
    conn.reply(primary_row())
    assert h.state(0).up
    assert [w for _, w in h.events] == ["up", "down", "up"]


def test_verify_probes_at_once_and_leaves_a_node_that_answers_up():
    """57P01 from live traffic: pg_terminate_backend() of one backend must not take the node out."""
    h = Harness(count=2)
    conns = h.cluster()
    h.events.clear()
    h.monitor.verify(h.name(0), "connection lost: 57P01 terminating connection due to administrator command")
    assert h.state(0).up and h.events == []
    assert conns[0].queries() == [PROBE_SQL, PROBE_SQL]  # probed at once, on the kept connection
    h.monitor.verify(h.name(0), "again")  # a flood shares the probe in flight
    assert len(conns[0].queries()) == 2
    conns[0].reply(primary_row("0/5000000"))
    assert h.state(0).up and h.events == []


def test_verify_marks_down_only_when_the_probe_fails():
    """57P01 from a fast shutdown: the probe's fresh login is refused (57P03), and that is evidence."""
    h = Harness(count=2)
    conns = h.cluster()
    h.events.clear()
    h.monitor.verify(h.name(0), "connection lost: 57P01")
    assert h.state(0).up
    conns[0].lose()  # the kept connection was shut down too: a fresh one decides
    h.refuse(0)
    assert not h.state(0).up and h.events == [(h.name(0), "down")]


def test_verify_of_a_down_or_unknown_node_does_nothing():
    h = Harness(count=1)
    h.monitor.start()
    h.refuse(0)
    h.monitor.verify(h.name(0), "57P01")
    h.monitor.verify("nowhere:1", "57P01")
    assert len(h.attempts(0)) == 1 and h.events == []


def test_probe_now_fires_after_the_answer_and_replaces_the_timer():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row("0/100"))
    results = []
    h.monitor.probe_now(h.name(0)).addCallback(results.append)
    assert conn.queries() == [PROBE_SQL, PROBE_SQL] and results == []
    # A second caller joins the probe in flight.
    h.monitor.probe_now(h.name(0)).addCallback(results.append)
    assert len(conn.queries()) == 2
    conn.reply(primary_row("0/200"))
    assert results == [h.state(0), h.state(0)] and results[0].lsn == 0x200
    h.reactor.advance(0.99)
    assert len(conn.queries()) == 2  # the old schedule was replaced, not doubled
    h.reactor.advance(0.01)
    assert len(conn.queries()) == 3


def test_probe_now_all_and_failures():
    h = Harness(count=2)
    h.monitor.start()
    results = []
    h.monitor.probe_now().addCallback(results.append)
    h.up(0, primary_row())
    assert results == []
    h.refuse(1)
    assert results == [h.monitor.states]
    failures = []
    h.monitor.probe_now("x:1").addErrback(failures.append)
    assert failures and failures[0].check(KeyError)


def test_probe_now_when_stopped_answers_at_once():
    h = Harness(count=1)
    results = []
    h.monitor.probe_now(h.name(0)).addCallback(results.append)
    assert results == [h.state(0)] and h.reactor.tcpClients == []


# -- promote ----------------------------------------------------------------------------------------


def test_promote_runs_pg_promote_then_reprobes():
    h = Harness(count=2)
    conns = h.cluster()
    results = []
    h.monitor.promote(h.name(1)).addCallback(results.append)
    assert len(h.attempts(1)) == 2  # its own connection: the probe one stays free
    promo = h.accept(1)
    promo.login()
    assert promo.queries() == ["SELECT pg_promote(true, 60)"]
    promo.reply([b"t"])
    sent = [t for t, _ in promo.sent()]
    assert sent[-1] == p.TERMINATE and promo.transport.disconnecting
    assert conns[1].queries() == [PROBE_SQL, PROBE_SQL]  # re-probed at once
    conns[1].reply(primary_row("0/5000100", timeline=2))
    assert results == [h.state(1)] and h.state(1).role == "primary"
    assert h.state(0).fenced  # the old primary is still up and now loses


def test_promote_that_does_not_finish():
    h = Harness(count=2)
    h.cluster()
    failures = []
    h.monitor.promote(h.name(1), wait_seconds=5).addErrback(failures.append)
    promo = h.accept(1)
    promo.login()
    assert promo.queries() == ["SELECT pg_promote(true, 5)"]
    promo.reply([b"f"])
    assert failures[0].check(PromoteError)
    assert "did not finish promoting within 5s" in str(failures[0].value)


def test_promote_refused():
    h = Harness(count=2)
    h.cluster()
    failures = []
    h.monitor.promote(h.name(0)).addErrback(failures.append)
    promo = h.accept(0)
    promo.login()
    promo.proto.dataReceived(m.error_response("ERROR", "55000", "recovery is not in progress") + m.ready_for_query())
    assert failures[0].check(PromoteError)
    assert "recovery is not in progress" in str(failures[0].value)


def test_promote_no_answer_times_out():
    h = Harness(count=2)
    h.cluster()
    failures = []
    h.monitor.promote(h.name(1), wait_seconds=5).addErrback(failures.append)
    promo = h.accept(1)
    promo.login()
    h.reactor.advance(6.99)  # pg_promote's own wait plus the probe timeout
    assert failures == []
    h.reactor.advance(0.01)
    assert failures[0].check(PromoteError)
    assert "no answer within 7s" in str(failures[0].value)
    assert promo.transport.disconnecting


def test_promote_unknown_node():
    h = Harness(count=1)
    failures = []
    h.monitor.promote("x:1").addErrback(failures.append)
    assert failures[0].check(KeyError)


# -- stop -------------------------------------------------------------------------------------------


def test_stop_says_goodbye_and_stops_probing():
    h = Harness(count=2)
    conns = h.cluster()
    h.reactor.advance(1.0)  # probes in flight
    done = []
    h.monitor.stop().addCallback(done.append)
    assert not h.monitor.running
    for c in conns:
        assert c.transport.disconnecting
        assert [t for t, _ in c.sent()][-1] == p.TERMINATE
    assert done == []
    conns[0].lose()
    conns[1].lose()
    assert done == [None]
    before = len(h.reactor.tcpClients)
    h.reactor.advance(30)
    assert len(h.reactor.tcpClients) == before
    assert h.reactor.getDelayedCalls() == []


def test_stop_gives_up_waiting_after_the_timeout():
    h = Harness(count=1)
    h.cluster()
    done = []
    h.monitor.stop().addCallback(done.append)
    h.reactor.advance(2.0)
    assert done == [None]


def test_stop_with_connects_pending_is_immediate():
    h = Harness(count=2)
    h.monitor.start()
    done = []
    h.monitor.stop().addCallback(done.append)
    assert done == [None]
    assert all(c.stoppedConnecting for c in h.reactor.connectors)
    assert h.reactor.getDelayedCalls() == []


def test_start_twice_is_harmless():
    h = Harness(count=1)
    h.monitor.start()
    h.monitor.start()
    assert len(h.reactor.tcpClients) == 1


@pytest.mark.parametrize("interval,backoff_max,expected", [(1.0, 10.0, [1, 2, 4, 8, 10, 10]), (0.5, 3.0, [0.5, 1, 2, 3, 3, 3])])
def test_backoff_formula(interval, backoff_max, expected):
    h = Harness(count=1, interval=interval, backoff_max=backoff_max)
    assert [h.monitor._backoff(n) for n in range(1, 7)] == expected


# -- a kept connection dying under a probe -----------------------------------------------------------


def test_kept_connection_lost_under_a_probe_retries_on_a_fresh_one():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row())
    h.reactor.advance(1.0)
    conn.lose()  # e.g. the node restarted between probes
    assert len(h.attempts(0)) == 2 and h.state(0).up
    h.up(0, primary_row("0/200"))
    assert h.state(0).lsn == 0x200
    assert h.events == [(h.name(0), "up")]  # no false "down"


def test_fatal_under_a_probe_retries_and_a_refusal_then_marks_down():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row())
    h.reactor.advance(1.0)
    conn.proto.dataReceived(m.error_response("FATAL", "57P01", "terminating connection due to administrator command"))
    assert conn.transport.disconnecting
    assert len(h.attempts(0)) == 2 and h.state(0).up
    h.refuse(0)
    assert not h.state(0).up and "refused" in h.state(0).last_error


def test_retry_shares_the_probe_deadline():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row())
    h.reactor.advance(1.0)
    h.reactor.advance(1.5)
    conn.lose()
    h.reactor.advance(0.5)  # 2 s after the probe started: the fresh attempt has not answered
    assert not h.state(0).up and h.state(0).last_error == "no answer within 2s"
    assert h.reactor.connectors[1].stoppedConnecting


def test_a_fresh_connection_lost_is_not_retried():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.accept(0)
    conn.lose()
    assert not h.state(0).up and len(h.attempts(0)) == 1


# -- function volatility (pg_proc), read on the primary's probe connection -------------------------


def rows_answer(rows) -> bytes:
    return b"".join(data_row(r) for r in rows) + m.command_complete(f"SELECT {len(rows)}") + m.ready_for_query()


def functions_cluster(**kw):
    h = Harness(functions_refresh=30.0, **kw)
    conns = h.cluster()
    return h, conns


@pytest.fixture
def health_log(monkeypatch):
    from twisted.logger import Logger

    from pgtwist.cluster import health

    events: list[dict] = []
    monkeypatch.setattr(health, "log", Logger(namespace="test", observer=events.append))
    return events


def test_without_functions_refresh_pg_proc_is_never_read():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.up(0, primary_row())
    assert conn.queries() == [PROBE_SQL]
    assert h.monitor.functions is NOT_FETCHED


def test_the_primary_probe_connection_reads_pg_proc_and_replicas_do_not():
    h, (primary, r1, r2) = functions_cluster()
    assert primary.queries() == [PROBE_SQL, FUNCTIONS_SQL]
    assert r1.queries() == [PROBE_SQL] and r2.queries() == [PROBE_SQL]
    assert h.monitor.functions.is_volatile("f")  # (nothing known yet)
    primary.proto.dataReceived(rows_answer([[b"f", b"f"], [b"g", b"t"]]))
    assert not h.monitor.functions.is_volatile("f") and h.monitor.functions.is_volatile("g")
    assert h.monitor.functions.is_volatile("h")  # unknown: volatile
    assert len(h.reactor.tcpClients) == 3  # no connection of its own


def test_a_probe_due_during_the_read_waits_behind_it_and_the_node_stays_up():
    h, (primary, _, _) = functions_cluster()
    h.reactor.advance(1.0)
    assert primary.queries() == [PROBE_SQL, FUNCTIONS_SQL, PROBE_SQL]
    primary.proto.dataReceived(rows_answer([[b"f", b"f"]]))
    primary.reply(primary_row("0/6000000"))
    assert h.state(0).up and h.state(0).lsn == 0x6000000
    assert not h.monitor.functions.is_volatile("f")


def test_pg_proc_is_read_again_after_the_refresh_interval():
    h, (primary, _, _) = functions_cluster()
    primary.proto.dataReceived(rows_answer([[b"f", b"f"]]))
    for _ in range(29):
        h.reactor.advance(1.0)
        primary.reply(primary_row())
    assert primary.queries().count(FUNCTIONS_SQL) == 1
    h.reactor.advance(1.0)
    primary.reply(primary_row())
    assert primary.queries().count(FUNCTIONS_SQL) == 2
    primary.proto.dataReceived(rows_answer([[b"f", b"t"]]))
    assert h.monitor.functions.is_volatile("f")


def test_ddl_seen_asks_for_a_read_at_the_next_probe_and_a_read_under_way_is_stale():
    h, (primary, _, _) = functions_cluster()
    h.monitor.functions_changed()  # (while the first read is under way)
    primary.proto.dataReceived(rows_answer([[b"f", b"f"]]))
    h.reactor.advance(1.0)
    primary.reply(primary_row())
    assert primary.queries().count(FUNCTIONS_SQL) == 2
    primary.proto.dataReceived(rows_answer([[b"f", b"f"]]))
    h.reactor.advance(1.0)
    primary.reply(primary_row())
    assert primary.queries().count(FUNCTIONS_SQL) == 2
    h.monitor.functions_changed()
    h.reactor.advance(1.0)
    primary.reply(primary_row())
    assert primary.queries().count(FUNCTIONS_SQL) == 3


def test_a_failed_read_is_a_warning_retried_a_second_later_and_the_node_stays_up(health_log):
    h, (primary, _, _) = functions_cluster()
    primary.proto.dataReceived(m.error_response("ERROR", "42501", "permission denied for table pg_proc") + m.ready_for_query())
    assert h.state(0).up
    assert any("cannot read function volatility" in e.get("log_format", "") for e in health_log)
    assert not [e for e in health_log if "log_failure" in e]  # a warning, not a traceback
    h.reactor.advance(1.0)
    primary.reply(primary_row())
    assert primary.queries().count(FUNCTIONS_SQL) == 2


def test_without_a_primary_a_replica_is_read():
    h = Harness(count=2, functions_refresh=30.0)
    h.monitor.start()
    replica = h.up(1, replica_row())
    assert replica.queries() == [PROBE_SQL, FUNCTIONS_SQL]


def test_stop_while_reading_says_nothing(health_log):
    h, (primary, _, _) = functions_cluster()
    h.monitor.stop()
    assert not [e for e in health_log if "volatility" in e.get("log_format", "")]



# -- stepping aside for a client's DROP DATABASE ------------------------------------------------------


def test_step_aside_closes_the_probe_connection_and_opens_none_until_the_time_is_up():
    h = Harness(count=2)
    conns = h.cluster()
    before = len(h.attempts(0))
    h.monitor.step_aside(h.name(0), 5.0)
    assert conns[0].transport.disconnecting  # (a Terminate: the node's session ends now)
    assert h.state(0).up and h.state(0).role == "primary"  # as last probed
    h.reactor.advance(4.9)
    assert len(h.attempts(0)) == before  # no probe connection meanwhile
    assert conns[1].queries()[1:2] == [PROBE_SQL]  # (the other node goes on being probed on its kept connection)
    h.reactor.advance(0.2)
    assert len(h.attempts(0)) == before + 1  # a new one afterwards
    h.up(0, primary_row("0/5000000"))
    assert h.events[-1:] != [(h.name(0), "down")]


def test_step_aside_asked_during_a_probe_waits_for_its_answer():
    h = Harness(count=1)
    h.monitor.start()
    conn = h.accept(0)
    conn.login()
    h.monitor.step_aside(h.name(0), 3.0)
    assert not conn.transport.disconnecting  # (the probe under way ends first)
    conn.reply(primary_row("0/100"))
    assert conn.transport.disconnecting and h.state(0).up
    h.reactor.advance(2.9)
    assert len(h.attempts(0)) == 1
    h.reactor.advance(0.2)
    assert len(h.attempts(0)) == 2


def test_step_aside_of_an_unknown_node_or_a_stopped_monitor_does_nothing():
    h = Harness(count=1)
    h.monitor.step_aside("nowhere:1", 3.0)
    h.monitor.step_aside(h.name(0), 3.0)  # (not started)
    assert h.reactor.tcpClients == []


def test_a_database_dropped_on_the_node_is_told_from_the_node_being_down():
    # A client's DROP DATABASE through pgtwist: the node serves its other databases, and must not
    # look like a dead primary to auto_promote.
    h = Harness(count=1)
    h.monitor.start()
    conn = h.accept(0)
    conn.proto.dataReceived(m.error_response("FATAL", "3D000", 'database "postgres" does not exist'))
    assert not h.state(0).up and h.state(0).database_missing
    h.reactor.advance(1.0)
    h.up(0, primary_row("0/200"))  # (made again)
    assert h.state(0).up and not h.state(0).database_missing
    h.monitor._drop_conn(h.monitor._slots[h.name(0)])
    h.reactor.advance(1.0)
    h.refuse(0)  # (the node itself gone: not that)
    assert not h.state(0).up and not h.state(0).database_missing


def test_a_probe_asked_for_while_stepping_aside_waits_until_then():
    h = Harness(count=1)
    h.monitor.start()
    h.up(0, primary_row("0/100"))
    h.monitor.step_aside(h.name(0), 3.0)
    states = []
    h.monitor.probe_now(h.name(0)).addCallback(states.append)
    h.monitor.verify(h.name(0), "57P01 seen")
    assert len(h.attempts(0)) == 1 and states == []
    h.reactor.advance(3.0)
    assert len(h.attempts(0)) == 2
    h.up(0, primary_row("0/100"))
    assert states and states[0].up


def test_a_node_that_is_away_is_probed_at_most_2_s_apart_one_that_refuses_the_login_10_s():
    # A restarted primary is seen back within 2 s of its start; a wrong health_user password (or
    # a pg_hba rule, a dropped database) is not fixed by waiting, and each attempt is a FATAL in
    # the node's log: those stay as far apart as before.
    from pgtwist.cluster import health

    h = Harness(count=1, interval=0.5, backoff_max=health.BACKOFF_MAX)
    assert [h.monitor._backoff(n) for n in range(1, 7)] == [0.5, 1, 2, 2, 2, 2]
    assert [h.monitor._backoff(n, refused=True) for n in range(1, 7)] == [0.5, 1, 2, 4, 8, 10]
    h.monitor.start()
    for _ in range(6):
        conn = h.accept(0)
        conn.proto.dataReceived(m.error_response("FATAL", "28P01", 'password authentication failed for user "monitor"'))
        (timer,) = h.reactor.getDelayedCalls()
        delay = timer.getTime() - h.reactor.seconds()
        h.reactor.advance(delay)
    assert delay == 10.0
