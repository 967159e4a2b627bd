"""DDL is judged statement by statement, not by the session's pin: in a session pinned by its
temporary table, DDL on that table bounds nobody's replica reads, and any other DDL (a permanent
table made, altered, indexed) bounds everyone's, by probes of the primary begun after its commit,
and under workers = N is told to the other workers as its answer goes out.

The real ClientSession and router on StringTransports behind a fake monitor (P + R1 + R2)."""

from __future__ import annotations

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.routing import R1, R2, P
from tests.harness.session import Z_IDLE, Setup, extended, sent
from tests.unit.session.test_client_workers_ddl import answer_probes, janitor
from tests.unit.session.test_client_workers_ddl import setup as workers_setup
from tests.unit.session.test_placement_read_your_writes import answer, on, run


def pinned_by_a_temporary_table(s, sql="CREATE TEMP TABLE scratch (x int)"):
    session, _ = s.client()
    run(session, sql)
    assert session.pinned == "temporary table"
    return session


def reads_on(s) -> str:
    """Where another client's read goes now (its link answered and let go)."""
    other, _ = s.client()
    other.got_data(m.query("SELECT * FROM t"))
    node = on(other.server)
    answer(other.server, p.TX_IDLE)
    return node


def test_a_permanent_table_made_in_a_session_pinned_by_its_temporary_table_bounds_every_read():
    s = Setup()
    session = pinned_by_a_temporary_table(s)
    router = s.proxy.routers["appdb"]
    run(session, "CREATE TABLE t (x int)")
    assert router.ddl_pending == 1 and [name for name, _ in s.monitor.probes] == [P]
    assert reads_on(s) == P  # (until the primary's position after the commit is known)
    answer_probes(s, 0x7000)
    assert router.ddl_pending == 0 and router.schema_lsn == 0x7000


def test_each_kind_of_permanent_ddl_in_such_a_session_is_probed():
    s = Setup()
    session = pinned_by_a_temporary_table(s)
    for sql in (
        "ALTER TABLE t ADD COLUMN y int",
        "CREATE INDEX ON t (x)",
        "DROP TABLE scratch, t",  # (one of them permanent)
        "ALTER TABLE scratch ADD y int",  # (dropped just now: this scratch is another)
    ):
        probes = len(s.monitor.probes)
        run(session, sql)
        assert len(s.monitor.probes) == probes + 1, sql
        answer_probes(s)


def test_ddl_on_its_temporary_relations_sends_no_read_to_the_primary():
    s = Setup()
    session = pinned_by_a_temporary_table(s)
    router = s.proxy.routers["appdb"]
    for sql in (
        "ALTER TABLE scratch ADD COLUMN y int",
        "CREATE INDEX scratch_x ON scratch (x)",
        "ALTER TABLE pg_temp.scratch ALTER COLUMN y TYPE text",
        "ALTER TABLE scratch RENAME TO scratch2",
        "CREATE TEMP TABLE other (x int); DROP INDEX scratch_x; DROP TABLE scratch2, other",
        "CREATE TEMP TABLE scratch (x int)",  # (again: the ORM's next request)
    ):
        run(session, sql)
        assert s.monitor.probes == [] and router.ddl_pending == 0, sql
        assert reads_on(s) in (R1, R2), sql


def test_a_temporary_table_and_a_permanent_one_in_one_text_pins_and_probes():
    s = Setup()
    session, _ = s.client()
    run(session, "CREATE TEMP TABLE scratch (x int); CREATE TABLE t (x int)")
    assert session.pinned == "temporary table" and [name for name, _ in s.monitor.probes] == [P]


def test_permanent_ddl_bound_by_the_extended_protocol_in_such_a_session_is_probed():
    s = Setup()
    session = pinned_by_a_temporary_table(s)
    session.got_data(extended("CREATE TABLE t (x int)"))
    server = session.server
    sent(server)
    assert s.monitor.probes == []  # (not committed yet)
    server.got_data(m.parse_complete() + m.bind_complete() + m.command_complete("CREATE TABLE") + Z_IDLE)
    assert [name for name, _ in s.monitor.probes] == [P]
    answer_probes(s)
    session.got_data(extended("ALTER TABLE scratch ADD y int"))
    sent(server)
    server.got_data(m.parse_complete() + m.bind_complete() + m.command_complete("ALTER TABLE") + Z_IDLE)
    assert len(s.monitor.probes) == 2  # (the first DDL's two: none for the temporary table's)


def test_an_on_commit_drop_table_is_temporary_until_its_transaction_ends():
    s = Setup()
    session = pinned_by_a_temporary_table(s, "CREATE TEMP TABLE scratch (x int) ON COMMIT DROP")
    run(session, "BEGIN", p.TX_IN_TRANSACTION)
    run(session, "CREATE TEMP TABLE batch (x int) ON COMMIT DROP", p.TX_IN_TRANSACTION)
    run(session, "ALTER TABLE batch ADD y int", p.TX_IN_TRANSACTION)
    run(session, "COMMIT")
    assert s.monitor.probes == []
    run(session, "ALTER TABLE batch ADD z int")  # (a permanent batch, if any: the temporary one is gone)
    assert [name for name, _ in s.monitor.probes] == [P]


def test_discard_temp_ends_the_account():
    s = Setup()
    session = pinned_by_a_temporary_table(s)
    run(session, "DISCARD TEMP")
    run(session, "DROP TABLE IF EXISTS scratch")
    assert [name for name, _ in s.monitor.probes] == [P]


def test_ddl_on_a_pg_temp_relation_in_an_unpinned_session_holds_no_read():
    s = Setup()
    session, _ = s.client()
    router = s.proxy.routers["appdb"]
    server = run(session, "DROP TABLE IF EXISTS pg_temp.scratch")
    assert not session.pinned and router.ddl_pending == 0
    assert reads_on(s) in (R1, R2)
    sent(server)


# -- workers = N --------------------------------------------------------------------------------


def test_permanent_ddl_in_such_a_session_is_told_to_the_other_workers_before_its_answer():
    s, router = workers_setup()
    session = pinned_by_a_temporary_table(s)
    link = router.elsewhere
    assert link.told == [] and link.schema == []
    session.got_data(m.query("CREATE TABLE t (x int)"))
    server = session.server
    sent(server)
    assert link.schema == ["appdb"]  # (the schema clocks: when sent, and again at the commit)
    seen = []
    hold = link.ddl_hold
    link.ddl_hold = lambda name: seen.append(session.transport.value()) or hold(name)
    session.transport.clear()
    server.got_data(m.command_complete("CREATE TABLE") + Z_IDLE)
    assert seen == [b""] and link.schema == ["appdb", "appdb"]
    answer_probes(s, 0x7000)
    janitor(s)
    assert not router.told and link.told[-1] == ("settle", "appdb", 42, 0x7000)


def test_ddl_on_its_temporary_relations_is_told_to_nobody():
    s, router = workers_setup()
    session = pinned_by_a_temporary_table(s)
    run(session, "BEGIN", p.TX_IN_TRANSACTION)
    run(session, "ALTER TABLE scratch ADD y int; CREATE INDEX ON scratch (y)", p.TX_IN_TRANSACTION)
    session.got_data(m.query("COMMIT"))
    server = session.server
    sent(server)
    server.got_data(m.command_complete("COMMIT") + Z_IDLE)
    janitor(s)
    assert router.elsewhere.told == [] and router.elsewhere.schema == [] and s.monitor.probes == []



def test_ddl_on_temporary_relations_leaves_the_prepared_statements_clock_alone():
    # (Review.) The clock is the whole database's: each tick has every connection prepare its
    # described statements again. An ORM's temporary table per request ticked it each time,
    # though no other session's statements can name that table.
    s = Setup()
    session = pinned_by_a_temporary_table(s)
    schema = session.relay.schema
    before = schema.ddl_at
    run(session, "ALTER TABLE scratch ADD COLUMN y int; CREATE INDEX ON scratch (x)")
    run(session, "SELECT 1 INTO TEMP other_scratch")
    assert schema.ddl_at == before
    run(session, "ALTER TABLE t ADD COLUMN y int")
    assert schema.ddl_at > before
