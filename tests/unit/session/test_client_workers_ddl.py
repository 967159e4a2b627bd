"""A session's DDL under workers = N: the other workers' hold on replica reads is told before the
transaction's answer reaches the client, handed to its read-back (or probes), and never left
renewed after its transaction (review cases: a temporary table after DDL, a read-only link, a
pinned session's second migration). And a lone Sync after an error ends the skip to Sync."""

from __future__ import annotations

from pgtwist.routing.policy import NodeState
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.routing import P
from tests.harness.session import Z_IDLE, Z_IN, Setup, lose, messages, sent, types
from tests.unit.service.test_notices import Link
from tests.unit.session.test_placement_failover import TERMINATED
from tests.unit.session.test_placement_read_your_writes import on, run


class WorkerLink(Link):
    """What the Proxy asks of its workers.WorkerLink besides the DDL notices."""

    def tag(self, secret):
        return secret

    def forward_cancel(self, *args, **kwargs):
        return False


def setup():
    s = Setup()
    router = s.proxy.routers["appdb"]
    router.elsewhere = s.proxy.worker = WorkerLink()
    return s, router


def answer_probes(s, lsn=0x7000):
    """Every probe of the primary asked for (ddl_by_probe asks twice, one after the other)."""
    for _ in range(3):
        for _, d in list(s.monitor.probes):
            if not d.called:
                d.callback(NodeState(P, role="primary", up=True, lsn=lsn))


def ddl_answered_with_more_owed(s, then: str):
    """A pipelined CREATE TABLE and SELECT 1: the DDL is answered; the client sends *then* before
    the SELECT's answer, and both are answered."""
    c, ct = s.client()
    c.got_data(m.query("CREATE TABLE a (x int)") + m.query("SELECT 1"))
    server = c.server
    sent(server)
    server.got_data(m.command_complete("CREATE TABLE") + Z_IDLE)
    c.got_data(m.query(then))
    sent(server)
    server.got_data(m.command_complete("SELECT 1") + Z_IDLE)
    server.got_data(m.command_complete("SELECT 1") + Z_IDLE)
    return c


def janitor(s, ticks=5):
    for _ in range(ticks):
        s.clock.advance(1.0)
        s.proxy.maintain()


def test_the_hold_is_told_before_the_answer_and_settled_by_the_read_back():
    s, router = setup()
    c, ct = s.client()
    c.got_data(m.query("CREATE TABLE a (x int)"))
    server = c.server
    sent(server)
    assert router.elsewhere.told == []  # (not while it runs: a long DDL would hold every read elsewhere)
    seen = []
    hold = router.elsewhere.ddl_hold
    router.elsewhere.ddl_hold = lambda name: seen.append(ct.value()) or hold(name)
    ct.clear()
    server.got_data(m.command_complete("CREATE TABLE") + Z_IDLE)
    assert seen == [b""]  # (told before the client had a byte of its answer)
    assert router.elsewhere.told[0][0] == "hold" and list(router.told.values()) == [None]  # (claimed by the read-back)
    janitor(s, 1)
    assert router.elsewhere.told[-1][0] == "again"  # (renewed while the read-back lasts)


def test_ready_for_query_of_ddl_and_of_a_begin_in_one_read_tells_the_others():
    s, router = setup()
    c, ct = s.client()
    c.got_data(m.query("CREATE TABLE a (x int)") + m.query("BEGIN"))
    server = c.server
    sent(server)
    server.got_data(m.command_complete("CREATE TABLE") + Z_IDLE + m.command_complete("BEGIN") + Z_IN)
    assert router.elsewhere.told and router.elsewhere.told[0][0] == "hold"


def test_a_pin_after_the_ddl_was_answered_hands_its_wait_to_probes():
    # Pipelined: the DDL's answer, then the session pins itself before its next answer; no
    # read-back runs on a pinned connection, so the wait was renewed for the session's life.
    s, router = setup()
    c = ddl_answered_with_more_owed(s, "SELECT pg_advisory_lock(1)")
    assert c.pinned and s.monitor.probes  # (the primary's position from probes begun after the commit)
    answer_probes(s)
    assert not router.told and router.elsewhere.told[-1] == ("settle", "appdb", 42, 0x7000)


def test_a_temporary_table_after_an_answered_ddl_still_bounds_it():
    s, router = setup()
    ddl_answered_with_more_owed(s, "CREATE TEMP TABLE t (x int)")
    answer_probes(s)
    settles = [t for t in router.elsewhere.told if t[0] == "settle"]
    assert settles and all(t[3] is not None for t in settles), settles


def test_a_pinned_sessions_pipelined_ddl_is_probed_after_its_own_answer():
    s, router = setup()
    c, ct = s.client()
    run(c, "SELECT pg_advisory_lock(1)")
    server = c.server
    c.got_data(m.query("SELECT 1") + m.query("CREATE TABLE a (x int)"))
    sent(server)
    server.got_data(m.command_complete("SELECT 1") + Z_IDLE)
    assert not s.monitor.probes  # (the CREATE TABLE has not committed yet)
    server.got_data(m.command_complete("CREATE TABLE") + Z_IDLE)
    assert s.monitor.probes


def test_ddl_then_a_temporary_table_in_one_transaction_is_told_and_settled_by_probes():
    # The temporary table pins the session before the commit: the CREATE TABLE is still told
    # (other sessions see it), bounded by probes rather than a read-back, and leaves no wait behind.
    s, router = setup()
    c, _ = s.client()
    c.got_data(m.query("BEGIN"))
    server = c.server
    sent(server)
    server.got_data(m.command_complete("BEGIN") + Z_IN)
    c.got_data(m.query("CREATE TABLE a (x int)"))
    sent(server)
    server.got_data(m.command_complete("CREATE TABLE") + Z_IN)
    c.got_data(m.query("CREATE TEMP TABLE t (x int)"))
    sent(server)
    server.got_data(m.command_complete("CREATE TABLE") + Z_IN)
    c.got_data(m.query("COMMIT"))
    sent(server)
    server.got_data(m.command_complete("COMMIT") + Z_IDLE)
    assert c.pinned and [t[0] for t in router.elsewhere.told] == ["hold"]
    answer_probes(s)
    janitor(s)
    assert not router.told and router.elsewhere.told[-1] == ("settle", "appdb", 42, 0x7000)


def test_ddl_refused_on_a_read_only_link_leaves_no_wait_behind():
    s, router = setup()
    c, _ = s.client()
    c.got_data(m.query("BEGIN READ ONLY"))
    server = c.server
    assert on(server) != P
    sent(server)
    server.got_data(m.command_complete("BEGIN") + Z_IN)
    c.got_data(m.query("CREATE TABLE a (x int)"))
    sent(server)
    server.got_data(m.error_response("ERROR", "25006", "cannot execute CREATE TABLE in a read-only transaction") + m.ready_for_query(p.TX_FAILED))
    c.got_data(m.query("ROLLBACK"))
    sent(server)
    server.got_data(m.command_complete("ROLLBACK") + Z_IDLE)
    assert not router.told and router.elsewhere.told == []  # (nothing written: nothing told)


def test_a_pinned_sessions_every_migration_is_told_with_its_own_position():
    s, router = setup()
    mig, _ = s.client()
    run(mig, "SELECT pg_advisory_lock(1)")
    run(mig, "CREATE TABLE a (x int)")
    run(mig, "CREATE TABLE b (x int)")  # (before the first one's probes are in)
    for i, (_, d) in enumerate(list(s.monitor.probes)):
        d.callback(NodeState(P, role="primary", up=True, lsn=0x1000 * (i + 1)))
    for i, (_, d) in enumerate(list(s.monitor.probes)):
        if not d.called:
            d.callback(NodeState(P, role="primary", up=True, lsn=0x8000 + i))
    settles = [t for t in router.elsewhere.told if t[0] == "settle"]
    holds = [t for t in router.elsewhere.told if t[0] == "hold"]
    assert len(holds) == 2 and len(settles) == 2 and {t[2] for t in settles} == {t[2] for t in holds}
    assert not router.told


def test_a_lone_sync_after_an_error_ends_the_skip_to_sync():
    # asyncpg: Parse, Describe, Flush; the connection is lost and pgtwist answers the error; the
    # client then Syncs alone, between transactions, and sends its next query, which must run.
    s = Setup()
    session, ct = s.client()
    session.got_data(m.parse("stmt1", "SELECT 2") + m.describe("S", "stmt1") + m.flush())
    server = session.server
    server.got_data(TERMINATED)
    lose(server)
    assert types(ct.value()) == "E"
    ct.clear()
    session.got_data(m.sync())
    assert ct.value() == m.ready_for_query(p.TX_IDLE)
    session.got_data(m.query("SELECT 1"))
    assert [t for t, _ in messages(session.server.transport.value())] == [p.QUERY]
