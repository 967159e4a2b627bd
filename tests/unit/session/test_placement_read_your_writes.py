"""Read-your-writes: which transactions note the primary's WAL position, and how batches are placed.

The real ClientSession, Pool and ServerConnection on StringTransports behind a fake monitor
(P + R1 + R2, tests.harness.session.Setup): a link whose release sends _WRITE_LSN_SQL
tracked a write; a link given back (lent) without it did not.
"""

import pytest

from pgtwist.pooling.statements import Statement
from pgtwist.routing import batch
from pgtwist.session.client import _WRITE_LSN_SQL, POSITION_UNKNOWN
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.framing import frame

from tests.harness.routing import R1, R2, P, clustered
from tests.harness.session import Z_IDLE, Z_IN, Setup, keeps_its_server, lose, messages, queries, sent, types

ROW = m.row_description([("x", 23)]) + m.data_row([b"1"])
EXTENDED_REPLY = m.parse_complete() + m.bind_complete() + m.command_complete("SELECT 1")


def answer(server, *statuses):
    """The node answers each owed Query / Sync with a CommandComplete and ReadyForQuery *status*."""
    server.got_data(b"".join(m.command_complete("OK") + m.ready_for_query(s) for s in statuses))


def run(session, sql, status=p.TX_IDLE):
    """One simple Query through the client's (new or kept) link, answered by the node."""
    session.got_data(m.query(sql))
    server = session.server
    sent(server)
    answer(server, status)
    return server


def tracked(server) -> bool:
    """The release of *server*'s link asked the node for its WAL position (and nothing else)."""
    out = queries(sent(server))
    assert out in ([], [_WRITE_LSN_SQL]), out
    return out == [_WRITE_LSN_SQL]


def commit_is_tracked(session, reply: bytes) -> bool:
    """The node answers the client's last request in its transaction with *reply*; the client
    commits: whether the release asks the node for its WAL position."""
    server = session.server
    sent(server)
    server.got_data(reply + Z_IN)
    return tracked(run(session, "COMMIT"))


def finish_lsn(server, insert="0/5000", flush="0/4000", synchronous_commit="on"):
    server.got_data(
        m.row_description([("a", 25), ("b", 25), ("c", 25)])
        + m.data_row([insert.encode(), flush.encode(), synchronous_commit.encode()])
        + m.command_complete("SELECT 1")
        + Z_IDLE
    )


def on(server) -> str:
    return str(server.node)


# -- the decision to track -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "statements",
    [
        pytest.param(["INSERT INTO t VALUES (1)"], id="autocommit-insert"),
        pytest.param(["BEGIN", "INSERT INTO t VALUES (1)", "COMMIT"], id="begin-insert-commit"),
        pytest.param(["START TRANSACTION", "UPDATE t SET x = 1", "END"], id="start-update-end"),
        pytest.param(["BEGIN", "SELECT 1", "DELETE FROM t", "COMMIT"], id="read-first-then-write"),
        pytest.param(["BEGIN; SELECT 1", "INSERT INTO t VALUES (1)", "COMMIT"], id="begin-and-read-in-one-string"),
        pytest.param(["BEGIN", "SELECT f()", "COMMIT"], id="volatile-function-in-transaction"),
        pytest.param(["BEGIN", "COPY t FROM STDIN", "COMMIT"], id="copy-from-in-transaction"),
        pytest.param(["BEGIN", "CALL p()", "COMMIT"], id="call"),
        pytest.param(["BEGIN", "INSERT INTO t VALUES (1)", "PREPARE TRANSACTION 'g'"], id="prepare-transaction"),
        pytest.param(["COMMIT PREPARED 'g'"], id="commit-prepared"),
        pytest.param(["SELECT 1; INSERT INTO t VALUES (1)"], id="multi-statement"),
        pytest.param(["BEGIN; INSERT INTO t VALUES (1); COMMIT"], id="transaction-in-one-string"),
    ],
)
def test_work_that_may_write_on_the_primary_notes_the_wal_position(statements):
    s = Setup()
    session, ct = s.client()
    for i, sql in enumerate(statements):
        last = i == len(statements) - 1
        server = run(session, sql, p.TX_IDLE if last or sql.startswith(("SELECT 1;", "COMMIT PREPARED")) else p.TX_IN_TRANSACTION)
        assert on(server) == P
    assert session.state == "preparing" and tracked(server)
    finish_lsn(server, insert="0/5000", flush="0/4000", synchronous_commit="on")
    assert session.min_lsn == 0x4000  # the flush position, after a synchronous commit
    # The client's next read waits for a replica that has replayed that far: none has.
    session.got_data(m.query("SELECT 1"))
    assert on(session.server) == P


@pytest.mark.parametrize(
    "statements",
    [
        pytest.param(["BEGIN", "SELECT 1", "COMMIT"], id="read-only-transaction-on-the-primary"),
        pytest.param(["BEGIN", "SELECT 1", "SHOW x", "SET LOCAL x = 1", "ROLLBACK"], id="reads-and-settings"),
        pytest.param(["/* pgtwist:primary */ SELECT 1"], id="read-hinted-to-the-primary"),
    ],
)
def test_reads_on_the_primary_do_not(statements):
    s = Setup()
    session, ct = s.client()
    for i, sql in enumerate(statements):
        server = run(session, sql, p.TX_IDLE if i == len(statements) - 1 else p.TX_IN_TRANSACTION)
        assert on(server) == P
    assert not tracked(server) and keeps_its_server(session)
    assert session.min_lsn == 0


def test_reads_on_replicas_are_never_watched():
    s = Setup()
    session, ct = s.client()
    server = run(session, "SELECT 1")
    assert on(server) in (R1, R2)
    assert not tracked(server)
    session.got_data(m.query("BEGIN READ ONLY"))
    server = session.server
    assert on(server) in (R1, R2)
    sent(server)
    answer(server, p.TX_IN_TRANSACTION)
    run(session, "SELECT 2", p.TX_IN_TRANSACTION)
    run(session, "COMMIT")
    assert not tracked(server)


def test_a_read_that_fell_back_to_the_primary_is_watched_and_a_write_behind_it_counts():
    s = Setup()
    session, ct = s.client()
    session.min_lsn = 10**6  # no replica has replayed that far: reads go to the primary
    session.got_data(m.query("SELECT 1") + m.query("INSERT INTO t VALUES (1)"))
    server = session.server
    assert on(server) == P and session.decision.want == "replica" and session.decision.on_primary
    # Not held back for a new link: the primary runs both, and the write is noted.
    assert queries(sent(server)) == ["SELECT 1", "INSERT INTO t VALUES (1)"]
    answer(server, p.TX_IDLE, p.TX_IDLE)
    assert tracked(server)


def test_the_statement_the_link_was_placed_by_is_not_classified_twice(monkeypatch):
    s = Setup()
    session, ct = s.client()
    router = session.router
    seen = []
    original = router.classify
    monkeypatch.setattr(router, "classify", lambda sql, *a, **k: seen.append(sql) or original(sql, *a, **k))
    run(session, "BEGIN", p.TX_IN_TRANSACTION)
    run(session, "SELECT 1", p.TX_IN_TRANSACTION)
    server = run(session, "COMMIT")
    assert seen == ["BEGIN", "SELECT 1", "COMMIT"]
    assert not tracked(server)


def test_a_kept_connection_starts_each_link_afresh():
    s = Setup()
    session, ct = s.client()
    server = run(session, "INSERT INTO t VALUES (1)")
    assert tracked(server)
    finish_lsn(server)
    # Replicas catch up; the next work on the primary is a read-only transaction: not tracked.
    for state in s.monitor.states.values():
        state.lsn = 0x10000
    run(session, "BEGIN", p.TX_IN_TRANSACTION)
    server = run(session, "COMMIT")
    assert on(server) == P and not tracked(server)


def test_extended_protocol_transaction_is_tracked():
    s = Setup()
    session, ct = s.client()

    def batch_(sql):
        return m.parse("", sql) + m.bind("", "") + m.execute() + m.sync()

    session.got_data(batch_("BEGIN"))
    server = session.server
    assert on(server) == P and session.lease.watch
    sent(server)
    server.got_data(EXTENDED_REPLY + Z_IN)
    session.got_data(batch_("INSERT INTO t VALUES (1)"))
    assert session.lease.wrote and session.lease.watch == 0
    sent(server)
    server.got_data(EXTENDED_REPLY + Z_IN)
    session.got_data(batch_("COMMIT"))
    sent(server)
    server.got_data(EXTENDED_REPLY + Z_IDLE)
    assert tracked(server)


def test_a_named_statement_that_writes_counts():
    s = Setup()
    session, ct = s.client()
    session.relay.statements["ins"] = Statement.from_definition(b"INSERT INTO t VALUES ($1)\x00\x00\x00")
    run(session, "BEGIN", p.TX_IN_TRANSACTION)
    session.got_data(m.bind("", "ins", [b"1"]) + m.execute() + m.sync())
    # (ParseComplete: the proxy's own Parse of the shared copy, ahead of the client's Bind.)
    assert commit_is_tracked(session, m.parse_complete() + m.bind_complete() + m.command_complete("INSERT 0 1"))


def test_a_bind_of_the_unnamed_statement_parsed_elsewhere_counts():
    s = Setup()
    session, ct = s.client()
    run(session, "BEGIN", p.TX_IN_TRANSACTION)
    session.got_data(m.bind("", "") + m.execute() + m.sync())
    assert commit_is_tracked(session, m.bind_complete() + m.command_complete("INSERT 0 1"))


def test_a_function_call_message_counts():
    s = Setup()
    session, ct = s.client()
    run(session, "BEGIN", p.TX_IN_TRANSACTION)
    # FunctionCall of OID 1: no argument formats, no arguments, text result (a well-formed body).
    session.got_data(frame(p.FUNCTION_CALL, b"\x00\x00\x00\x01" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00"))
    assert commit_is_tracked(session, frame(ord("V"), b"\xff\xff\xff\xff"))  # (FunctionCallResponse: a NULL result)


def test_read_your_writes_off_tracks_nothing():
    s = Setup(read_your_writes=False)
    session, ct = s.client()
    run(session, "BEGIN", p.TX_IN_TRANSACTION)
    run(session, "INSERT INTO t VALUES (1)", p.TX_IN_TRANSACTION)
    server = run(session, "COMMIT")
    assert not tracked(server)


def test_the_lsn_query_waits_for_the_end_of_the_transaction():
    """COMMIT AND CHAIN leaves the client in a transaction: nothing is asked until it ends."""
    s = Setup()
    session, ct = s.client()
    run(session, "BEGIN", p.TX_IN_TRANSACTION)
    run(session, "INSERT INTO t VALUES (1)", p.TX_IN_TRANSACTION)
    server = run(session, "COMMIT AND CHAIN", p.TX_IN_TRANSACTION)
    assert session.state == "linked" and sent(server) == b""
    run(session, "COMMIT")
    assert tracked(server)


def test_a_read_sent_while_the_lsn_is_asked_for_waits_for_it():
    s = Setup()
    session, ct = s.client()
    server = run(session, "INSERT INTO t VALUES (1)")
    assert tracked(server)
    session.got_data(m.query("SELECT 1"))  # pipelined right behind the write's ReadyForQuery
    assert session.state == "preparing" and session.backlog
    finish_lsn(server, flush="0/9000")
    assert session.min_lsn == 0x9000
    assert on(session.server) == P  # no replica has replayed 0/9000 (they are at 10)


@pytest.mark.parametrize("how", ["connection lost", "no row"])
def test_a_write_whose_position_was_never_read_back_keeps_the_client_s_reads_on_the_primary(how):
    """The primary froze or died between the client's commit and pgtwist's read-back of its WAL
    position (found by the freeze drill with 96 sessions: a session then read from a replica that
    lacked its own acknowledged write). No replica is known to hold the write: the client's reads
    stay on the primary, and the first read-back there tells a position again."""
    s = Setup()
    session, ct = s.client()
    server = run(session, "INSERT INTO t VALUES (1)")
    assert tracked(server)
    session.got_data(m.query("SELECT 1"))  # the client's next read, sent at once
    if how == "connection lost":
        lose(server)
    else:
        server.got_data(m.row_description([("a", 25), ("b", 25), ("c", 25)]) + m.command_complete("SELECT 0") + Z_IDLE)
    assert session.min_lsn == POSITION_UNKNOWN
    if how == "connection lost":  # (the node is taken for down: the read waits for a primary, never a replica)
        assert session.state == "waiting" and session.server is None
        s.set_up(P, True)
        s.clock.advance(1.0)  # (placement's retry)
    server = session.server
    assert on(server) == P  # (the replicas, at 10, are not known to hold the write)
    sent(server)
    answer(server, p.TX_IDLE)
    assert tracked(server)  # a read on the primary now tells where the client's writes end
    finish_lsn(server, insert="0/9", flush="0/9")
    assert session.min_lsn == 9
    assert on(run(session, "SELECT 2")) in (R1, R2)


# -- batches placed whole ------------------------------------------------------------------------


def test_an_extended_batch_reading_then_writing_goes_to_the_primary_whole():
    s = Setup()
    session, ct = s.client()
    session.got_data(
        m.parse("", "SELECT 1") + m.bind("", "") + m.execute()
        + m.parse("", "INSERT INTO t VALUES (1)") + m.bind("", "") + m.execute() + m.sync()
    )
    server = session.server
    assert on(server) == P and session.decision.reason.startswith("batch with insert")
    assert types(sent(server)) == "PBEPBES"


def test_an_open_batch_bound_for_a_replica_waits_for_its_end():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.parse("", "SELECT 1") + m.bind("", "") + m.execute())
    assert session.state == "idle" and session.server is None and ct.producerState == "producing"
    # A write in it: the batch can go now, to the primary, and its end follows it there.
    session.got_data(m.parse("", "INSERT INTO t VALUES (1)") + m.bind("", "") + m.execute())
    server = session.server
    assert on(server) == P
    session.got_data(m.sync())
    assert types(sent(server)) == "PBEPBES"
    server.got_data(EXTENDED_REPLY + EXTENDED_REPLY + Z_IDLE)
    assert tracked(server)


def test_an_open_batch_of_reads_goes_to_a_replica_once_it_ends():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.parse("", "SELECT 1") + m.bind("", "") + m.execute())
    assert session.server is None
    session.got_data(m.sync())
    assert on(session.server) in (R1, R2)


def test_a_batch_flushed_before_its_end_goes_to_the_primary():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.parse("", "SELECT 1") + m.bind("", "") + m.execute() + m.flush())
    # (What follows is not known: it counts as a write, so the release notes the WAL position.)
    server = session.server
    assert on(server) == P
    sent(server)
    server.got_data(EXTENDED_REPLY)
    session.got_data(m.sync())
    server.got_data(Z_IDLE)
    assert tracked(server)


def test_a_prepare_that_waits_for_its_description_is_placed_by_its_statement():
    """asyncpg prepares with Parse, Describe, Flush and sends Bind, Execute, Sync once answered."""
    s = Setup()
    session, ct = s.client()
    session.got_data(m.parse("s1", "SELECT 1") + m.describe("S", "s1") + m.flush())
    replica = session.server
    assert on(replica) in (R1, R2)
    sent(replica)
    replica.got_data(m.parse_complete() + m.parameter_description() + m.row_description([("x", 23)]))
    assert session.server is replica  # the batch goes on: the connection stays
    session.got_data(m.bind("", "s1") + m.execute() + m.sync())
    assert types(sent(replica)) == "BES"
    replica.got_data(m.bind_complete() + m.data_row([b"1"]) + m.command_complete("SELECT 1") + Z_IDLE)
    assert not tracked(replica)  # (a replica's link is never watched: nothing to note)


def test_an_open_batch_starting_with_a_write_goes_at_once():
    s = Setup()
    session, ct = s.client()
    session.got_data(m.parse("", "COPY t FROM STDIN") + m.bind("", "") + m.execute())
    assert on(session.server) == P and session.lease.wrote


def test_a_long_open_batch_is_placed_on_the_primary():
    s = Setup()
    session, ct = s.client()
    session.got_data((m.parse("", "SELECT 1") + m.bind("", "") + m.execute()) * (batch.OPEN_LIMIT // 3 + 1))
    assert on(session.server) == P


def test_an_open_batch_on_a_kept_connection_waits_too():
    s = Setup()
    session, ct = s.client()
    server = run(session, "SELECT 1")
    assert keeps_its_server(session) and on(server) in (R1, R2)
    session.got_data(m.parse("", "SELECT 2") + m.bind("", "") + m.execute())
    assert session.state == "idle" and session.server is None and not keeps_its_server(session)
    session.got_data(m.parse("", "UPDATE t SET x = 1") + m.bind("", "") + m.execute() + m.sync())
    assert on(session.server) == P


def test_a_write_batch_pipelined_behind_a_replica_read_is_held_from_its_start():
    s = Setup()
    session, ct = s.client()
    session.got_data(
        m.query("SELECT 1")
        + m.parse("", "SELECT 2") + m.bind("", "") + m.execute()
        + m.parse("", "INSERT INTO t VALUES (1)") + m.bind("", "") + m.execute() + m.sync()
    )
    replica = session.server
    assert on(replica) in (R1, R2)
    assert types(sent(replica)) == "Q"  # the whole second batch waits for the primary
    replica.got_data(ROW + m.command_complete("SELECT 1") + Z_IDLE)
    assert on(session.server) == P
    assert types(sent(session.server)) == "PBEPBES"


# -- pure parts ----------------------------------------------------------------------------------


def items(data: bytes) -> list:
    return messages(data)


def test_first_batch():
    stmts = {"s": Statement.from_definition(b"INSERT INTO t VALUES ($1)\x00\x00\x00")}
    fb = batch.first_batch
    assert fb(items(m.query("SELECT 1") + m.query("INSERT")), stmts) == ("SELECT 1", (), batch.WHOLE)
    two = m.parse("", "SELECT 1") + m.bind("", "") + m.execute() + m.bind("", "s") + m.execute()
    assert fb(items(two + m.sync() + m.query("x")), stmts) == ("SELECT 1", ("INSERT INTO t VALUES ($1)",), batch.WHOLE)
    assert fb(items(two), stmts) == ("SELECT 1", ("INSERT INTO t VALUES ($1)",), batch.OPEN)
    assert fb(items(two + m.flush()), stmts) == ("SELECT 1", ("INSERT INTO t VALUES ($1)",), batch.FLUSHED)
    # The same statement bound again and again (executemany) is one text.
    many = m.bind("", "s") + m.execute() + m.bind("", "s") + m.execute() + m.sync()
    assert fb(items(many), stmts) == ("INSERT INTO t VALUES ($1)", (), batch.WHOLE)
    # The unnamed statement with no Parse before it: unknown (the primary).
    assert fb(items(m.bind("", "") + m.execute() + m.sync()), stmts) == (None, (), batch.WHOLE)
    assert fb(items(m.sync()), stmts) == (None, (), batch.WHOLE)


def test_router_classifies_a_batch_as_a_whole():
    router, _ = clustered()
    assert router.classify("SELECT 1", ("SELECT 2",)).read_only
    c = router.classify("SELECT 1", ("SELECT 2", "UPDATE t SET x = 1"))
    assert not c.read_only and c.reason == "batch with update"
    c = router.classify("SELECT 1", (), unfinished=True)
    assert not c.read_only and c.reason == "batch placed before its end"
    assert router.classify("BEGIN READ ONLY", ("SELECT 1",)).tx == "begin_read_only"


def test_decisions_say_whether_they_landed_on_the_primary():
    router, monitor = clustered()
    assert router.decide("INSERT INTO t VALUES (1)", in_transaction=None, user_rule="auto").on_primary
    read = router.decide("SELECT 1", in_transaction=None, user_rule="auto")
    assert read.want == "replica" and not read.on_primary
    late = router.decide("SELECT 1", in_transaction=None, user_rule="auto", min_lsn=10**9)
    assert late.want == "replica" and late.on_primary and str(late.node) == P


def test_the_batch_a_replica_was_chosen_for_is_never_split():
    """A transaction-control statement after a read in one batch (placed whole on a replica) stays with it."""
    s = Setup()
    session, ct = s.client()
    session.got_data(
        m.parse("", "SELECT 1") + m.bind("", "") + m.execute()
        + m.parse("", "SET TRANSACTION READ ONLY") + m.bind("", "") + m.execute() + m.sync()
    )
    replica = session.server
    assert on(replica) in (R1, R2) and not session.backlog  # nothing held back
    assert types(sent(replica)) == "PBEPBES"


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(m.query("SET LOCAL synchronous_commit = off"), id="set-local"),
        pytest.param(m.query("SELECT set_config('synchronous_commit', 'off', true)"), id="set-config-local"),
        pytest.param(
            m.parse("", "SELECT set_config('synchronous_commit', $1, true)") + m.bind("", "", [b"off"]) + m.execute() + m.sync(),
            id="set-config-local-extended",
        ),
    ],
)
def test_a_transaction_made_asynchronous_is_placed_by_the_insert_position(statement):
    """The session's synchronous_commit (read after the commit) does not say how that commit was made."""
    s = Setup()
    session, ct = s.client()
    run(session, "BEGIN", p.TX_IN_TRANSACTION)
    server = session.server
    session.got_data(statement)
    sent(server)
    server.got_data(m.command_complete("SET") + Z_IN if statement[:1] == b"Q" else EXTENDED_REPLY + Z_IN)
    run(session, "INSERT INTO t VALUES (1)", p.TX_IN_TRANSACTION)
    run(session, "COMMIT")
    assert tracked(server)
    finish_lsn(server, insert="0/5000", flush="0/4000", synchronous_commit="on")
    assert session.min_lsn == 0x5000
    # The next link starts afresh: a synchronous transaction uses the flush position again.
    run(session, "INSERT INTO t VALUES (2)")
    assert tracked(server)
    finish_lsn(server, insert="0/7000", flush="0/6000", synchronous_commit="on")
    assert session.min_lsn == 0x6000


# -- DDL: where it committed bounds every session's replica reads ----------------------------


def test_ddl_holds_every_session_s_replica_reads_until_the_replicas_replayed_it():
    # A migration creates a table through one connection; the application's other connections go
    # on at once. A replica that has not replayed the CREATE answered them "relation does not
    # exist" (42P01), in a mixed workload over the demo cluster.
    s = Setup()
    for state in s.monitor.states.values():
        state.lsn = 0x3000
    migrator, _ = s.client()
    other, _ = s.client()
    server = run(migrator, "CREATE TABLE t (x int)")
    assert on(server) == P and tracked(server)
    # Its client has its answer; its position is being read back: meanwhile no replica reads at all.
    other.got_data(m.query("SELECT * FROM t"))
    assert on(other.server) == P
    answer(other.server, p.TX_IDLE)
    finish_lsn(server, insert="0/5000", flush="0/5000")
    assert s.proxy.routers["appdb"].schema_lsn == 0x5000
    other.got_data(m.query("SELECT * FROM t"))
    assert on(other.server) == P  # no replica has the table yet
    answer(other.server, p.TX_IDLE)
    s.monitor.states[R1].lsn = 0x5000
    other.got_data(m.query("SELECT * FROM t"))
    assert on(other.server) == R1  # this one has


def test_a_plain_write_bounds_only_its_own_client_s_reads():
    s = Setup()
    writer, _ = s.client()
    other, _ = s.client()
    server = run(writer, "INSERT INTO t VALUES (1)")
    finish_lsn(server, insert="0/5000", flush="0/5000")
    assert s.proxy.routers["appdb"].schema_lsn == 0
    other.got_data(m.query("SELECT * FROM t"))
    assert on(other.server) in (R1, R2)


def test_a_ddl_position_that_could_not_be_read_back_lets_replicas_serve_again():
    s = Setup()
    migrator, _ = s.client()
    other, _ = s.client()
    server = run(migrator, "ALTER TABLE t ADD COLUMN y int")
    router = s.proxy.routers["appdb"]
    assert router.ddl_pending == 1
    lose(server)
    assert router.ddl_pending == 0 and router.schema_lsn == 0
    other.got_data(m.query("SELECT * FROM t"))
    assert on(other.server) in (R1, R2)


def test_a_promotion_keeps_a_ddl_bound_up_to_where_the_new_timeline_began():
    # WAL positions go on counting across timelines: a DDL position the promoted node had
    # reached still bounds its replicas' reads; one beyond it (lost with the old primary) would
    # hold every read on the primary until the new one wrote that far, so it is cut to there.
    s = Setup()
    router = s.proxy.routers["appdb"]
    database = s.proxy.config.databases["appdb"]
    router.ddl_committed(0x9000)
    s.monitor.states[R1].lsn = 0xA000
    s.proxy._node_changed(database, s.monitor.states[R1], "promoted")
    assert router.schema_lsn == 0x9000
    s.monitor.states[R2].lsn = 0x8000
    s.proxy._node_changed(database, s.monitor.states[R2], "promoted")
    assert router.schema_lsn == 0x8000


def test_a_ddl_read_back_that_spans_a_promotion_bounds_reads_up_to_the_new_timeline():
    # The DDL committed on the old primary; its position is read back there as a replica that
    # had replayed it is promoted. A replica of the new primary that has not replayed it must
    # not serve the table's reads (42P01); a position beyond the new timeline's start is cut.
    s = Setup()
    states = s.monitor.states
    states[P].lsn = states[R1].lsn = 0x9000
    states[R2].lsn = 0x5000
    migrator, _ = s.client()
    other, _ = s.client()
    server = run(migrator, "CREATE TABLE t (x int)")
    router = s.proxy.routers["appdb"]
    assert router.ddl_pending == 1
    states[P].up = False
    states[R1].role = "primary"
    s.proxy._node_changed(s.proxy.config.databases["appdb"], states[R1], "promoted")
    finish_lsn(server, insert="0/9000", flush="0/9000")
    assert router.ddl_pending == 0 and router.schema_lsn == 0x9000
    other.got_data(m.query("SELECT * FROM t"))
    assert on(other.server) == R1  # not R2, which has not replayed the CREATE


def test_a_ddl_read_back_beyond_the_new_timeline_is_cut_to_its_start():
    s = Setup()
    migrator, _ = s.client()
    server = run(migrator, "CREATE TABLE t (x int)")
    router = s.proxy.routers["appdb"]
    s.monitor.states[R1].lsn = 0x7000
    s.proxy._node_changed(s.proxy.config.databases["appdb"], s.monitor.states[R1], "promoted")
    finish_lsn(server, insert="0/9000", flush="0/9000")  # (lost with the old primary)
    assert router.ddl_pending == 0 and router.schema_lsn == 0x7000


def test_ddl_from_a_pinned_session_bounds_replica_reads_by_a_probe_begun_after_it():
    # Migration tools hold a session advisory lock (Rails, golang-migrate): the session is pinned
    # and no read-back runs on its connection. A probe of the primary that began after the commit
    # tells a position at least as far.
    from pgtwist.cluster.health import NodeState

    s = Setup()
    migrator, _ = s.client()
    run(migrator, "SELECT pg_advisory_lock(1)")
    assert migrator.pinned
    run(migrator, "CREATE TABLE t (x int)")
    router = s.proxy.routers["appdb"]
    assert router.ddl_pending == 1 and [name for name, _ in s.monitor.probes] == [P]
    other, _ = s.client()
    other.got_data(m.query("SELECT * FROM t"))
    assert on(other.server) == P  # meanwhile, no replica reads
    answer(other.server, p.TX_IDLE)
    s.monitor.probes[0][1].callback(NodeState(P, role="primary", up=True, lsn=0x10))  # (begun before the commit)
    assert router.ddl_pending == 1 and len(s.monitor.probes) == 2
    s.monitor.probes[1][1].callback(NodeState(P, role="primary", up=True, lsn=0x7000))
    assert router.ddl_pending == 0 and router.schema_lsn == 0x7000


def test_ddl_from_a_session_pinned_by_its_temporary_table_probes_nothing():
    s = Setup()
    session, _ = s.client()
    run(session, "CREATE TEMP TABLE scratch (x int)")
    assert session.pinned.startswith("temporary")
    run(session, "DROP TABLE scratch")
    assert s.monitor.probes == [] and s.proxy.routers["appdb"].ddl_pending == 0
