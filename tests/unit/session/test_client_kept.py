"""Transaction pooling's fast paths on a kept ("lent") server connection, byte for byte.

A client between transactions keeps its server connection while nobody else needs one; its
next plain Query, or a Bind/[Describe]/Execute/Sync run of a statement that connection holds,
goes out without the general path. These tests pin what those shortcuts must still do
exactly as the general path would: the bytes on the wire, the statement name rewritten,
the reply forwarded as it came, the connection lent again afterwards.
"""

import pytest

from pgtwist.pooling.statements import SERVER_NAME_PREFIX
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.framing import frame

from tests.harness.session import (
    Harness,
    error_fields,
    finish_internal,
    internal_answer,
    keeps_its_server,
    lose,
    messages,
    split_internal,
)

SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
ROW_DESCRIPTION = frame(ord("T"), b"\x00\x01abalance\x00" + b"\x00" * 18)
ROW = frame(ord("D"), b"\x00\x01\x00\x00\x00\x04-123")
ANSWER = ROW_DESCRIPTION + ROW + m.command_complete("SELECT 1") + m.ready_for_query()


@pytest.fixture
def kept():
    """A transaction-mode client whose server connection is lent to it; transports cleared."""
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    server = session.server
    session.got_data(m.query("SELECT 1"))
    server.got_data(ANSWER)
    assert keeps_its_server(session) and session.state == "linked"
    ct.clear()
    server.transport.clear()
    return session, ct, server


def prepared(session, server, ct, name="S_1"):
    """The client prepares *name* (Parse/Sync); the server answers; the connection is lent again."""
    session.got_data(m.parse(name, SQL, [23]) + m.sync())
    (parse, sync) = messages(server.transport.value())
    assert parse[0] == p.PARSE and parse[1].startswith(SERVER_NAME_PREFIX.encode())
    server.got_data(frame(p.PARSE_COMPLETE) + m.ready_for_query())
    assert keeps_its_server(session)
    server_name = parse[1][: parse[1].index(b"\x00")]
    ct.clear()
    server.transport.clear()
    return server_name


def test_a_plain_query_goes_out_as_sent_and_its_answer_comes_back_as_sent(kept):
    session, ct, server = kept
    query = m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 7")
    session.got_data(query)
    assert server.transport.value() == query and not keeps_its_server(session)
    server.got_data(ANSWER)
    assert ct.value() == ANSWER and keeps_its_server(session)


@pytest.mark.parametrize("split", [None, 2])
def test_a_terminate_gives_the_kept_connection_back_as_it_is(kept, split):
    # A short-lived client's logout: its kept connection goes back to the pool reusable, with
    # no reset and nothing sent; whole (the shortcut) or split, the same.
    session, ct, server = kept
    pool = server.pool
    terminate = m.terminate()
    if split is None:
        session.got_data(terminate)
    else:
        session.got_data(terminate[:split])
        session.got_data(terminate[split:])
    assert session.state == "closed" and session.server is None and session.lease is None
    assert server in pool.idle and server not in pool.lent and server not in pool.busy
    assert server.transport.value() == b"" and not server.tainted
    assert ct.disconnecting


def test_a_query_that_changes_session_state_takes_the_general_path(kept):
    session, ct, server = kept
    session.got_data(m.query("SET search_path TO app"))
    assert server.transport.value() == m.query("SET search_path TO app")
    assert session.dirty == {"search_path"}


@pytest.mark.parametrize("describe", [True, False])
@pytest.mark.parametrize("split", [None, 3, 11, -2])
def test_a_prepared_run_goes_out_renamed_whole_or_split(kept, describe, split):
    session, ct, server = kept
    server_name = prepared(session, server, ct)
    tail = (m.describe("P", "") if describe else b"") + m.execute() + m.sync()
    batch = m.bind("", "S_1", [b"7"]) + tail
    if split is None:
        session.got_data(batch)
    else:
        session.got_data(batch[:split])
        session.got_data(batch[split:])
    assert server.transport.value() == m.bind("", server_name.decode(), [b"7"]) + tail
    reply = frame(p.BIND_COMPLETE) + ANSWER
    server.got_data(reply)
    assert ct.value() == reply and keeps_its_server(session)


def test_an_unnamed_bind_is_forwarded_untouched(kept):
    session, ct, server = kept
    session.got_data(m.parse("", SQL, [23]) + m.sync())
    server.got_data(frame(p.PARSE_COMPLETE) + m.ready_for_query())
    ct.clear()
    server.transport.clear()
    batch = m.bind("", "", [b"7"]) + m.execute() + m.sync()
    session.got_data(batch)
    assert server.transport.value() == batch


def unnamed_run(sql=SQL, describe="P"):
    """What psycopg, node-postgres and pgbench -M extended send for a query with parameters."""
    return m.parse("", sql, [23]) + m.bind("", "", [b"7"]) + (m.describe(describe, "") if describe else b"") + m.execute() + m.sync()


UNNAMED_ANSWER = frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + ANSWER


@pytest.mark.parametrize("describe", ["P", "S", None])
@pytest.mark.parametrize("split", [None, 1, 9, -3])
def test_an_unnamed_run_goes_out_as_sent_and_its_answer_comes_back_whole(kept, describe, split):
    session, ct, server = kept
    batch = unnamed_run(describe=describe)
    if split is None:
        session.got_data(batch)
    else:
        session.got_data(batch[:split])
        session.got_data(batch[split:])
    assert server.transport.value() == batch
    if split is None:
        # One ReadyForQuery owed and nothing per message: the answer is forwarded whole (whole_reply).
        # (A batch split across reads takes the general path from its first piece: same bytes.)
        assert len(session.relay.queue) == 1 and not session.relay.extended
    server.got_data(UNNAMED_ANSWER)
    assert ct.value() == UNNAMED_ANSWER and keeps_its_server(session)


def test_an_unnamed_run_that_fails_gets_postgresql_s_error_and_the_connection_is_lent_again(kept):
    session, ct, server = kept
    session.got_data(unnamed_run("SELECT nosuch FROM pgbench_accounts WHERE aid = $1"))
    error = m.error_response("ERROR", "42703", 'column "nosuch" does not exist')
    server.got_data(error + m.ready_for_query())
    assert ct.value() == error + m.ready_for_query() and keeps_its_server(session)


def test_an_unnamed_run_that_changes_session_state_takes_the_general_path(kept):
    session, ct, server = kept
    session.got_data(unnamed_run("SELECT set_config('search_path', $1, false)"))
    session.got_data(b"")
    assert len(session.relay.queue) > 1  # relayed message by message


def test_an_unnamed_run_replaces_an_unnamed_statement_with_effects(kept):
    """The general path forgets the effects of an earlier unnamed SET once Parse "" replaces it;
    so does the fast path (a later Bind "" runs the new statement, which has none)."""
    session, ct, server = kept
    session.got_data(m.parse("", "SET search_path TO app", []) + m.sync())
    server.got_data(frame(p.PARSE_COMPLETE) + m.ready_for_query())
    assert "" in session._effects_of
    session.got_data(unnamed_run())
    assert "" not in session._effects_of


def test_a_named_parse_in_a_run_takes_the_general_path_and_is_renamed(kept):
    """A read of Parse "S_2", Bind, Execute, Sync is a run to the scanner (its layout is
    checked in one pass) but not an unnamed one: the relay keeps the statement and renames it."""
    session, ct, server = kept
    session.got_data(m.parse("S_2", SQL, [23]) + m.bind("", "S_2", [b"7"]) + m.execute() + m.sync())
    sent = messages(server.transport.value())
    assert session.scanner.run_size == 4  # (walked in one pass)
    assert [t for t, _ in sent] == [p.PARSE, p.BIND, p.EXECUTE, p.SYNC]
    assert sent[0][1].startswith(SERVER_NAME_PREFIX.encode()) and "S_2" in session.relay.statements


def test_a_run_describing_the_unnamed_statement_after_a_named_bind_takes_the_general_path(kept):
    session, ct, server = kept
    server_name = prepared(session, server, ct)
    session.got_data(m.bind("", "S_1", [b"7"]) + m.describe("S", "") + m.execute() + m.sync())
    sent = messages(server.transport.value())
    assert [t for t, _ in sent] == [p.BIND, p.DESCRIBE, p.EXECUTE, p.SYNC]
    assert sent[0][1] == m.bind("", server_name.decode(), [b"7"])[5:]
    assert len(session.relay.queue) > 1  # relayed message by message


def test_a_bind_of_a_statement_the_client_never_prepared_goes_to_the_server_as_named(kept):
    """PostgreSQL itself then answers 26000 about the client's own name."""
    session, ct, server = kept
    batch = m.bind("", "nope", [b"7"]) + m.execute() + m.sync()
    session.got_data(batch)
    assert server.transport.value() == batch
    error = m.error_response("ERROR", "26000", 'prepared statement "nope" does not exist')
    server.got_data(error + m.ready_for_query())
    assert ct.value() == error + m.ready_for_query() and keeps_its_server(session)


@pytest.mark.parametrize("split", [False, True])
def test_reset_all_brings_the_startup_settings_back_and_their_answer_stays_with_the_proxy(split):
    h = Harness(pool_mode="transaction")
    session, ct = h.client(application_name="app1")
    (server,) = h.proxy.servers
    finish_internal(server)  # the startup setting applied on the pooled connection
    assert session.state == "linked"
    ct.clear()
    server.transport.clear()
    session.got_data(m.query("RESET ALL"))
    (reset,), (restore,) = split_internal(messages(server.transport.value()))
    assert reset == (p.QUERY, b"RESET ALL\x00")
    assert restore == "SELECT pg_catalog.set_config(E'application_name', E'app1', false)"
    own = m.command_complete("RESET") + m.parameter_status("application_name", "") + m.ready_for_query()
    injected = internal_answer(rows=[[b"app1"]], params=[("application_name", "app1")])
    if split:
        server.got_data(own)
        server.got_data(injected[:9])
        server.got_data(injected[9:])
    else:
        server.got_data(own + injected)
    # The client's ReadyForQuery waits for the proxy's Query: its settings are known before it.
    assert ct.value() == own[: -len(m.ready_for_query())] + m.parameter_status("application_name", "app1") + m.ready_for_query()
    assert session.relay.idle and session.settings["application_name"] == "app1"
    # Released as usual once the proxy's own Query is answered: the settings are read back.
    assert b"current_setting" in server.transport.value()


def test_reset_all_without_startup_settings_injects_nothing():
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    server = session.server
    server.transport.clear()
    session.got_data(m.query("RESET ALL"))
    assert server.transport.value() == m.query("RESET ALL")


def test_node_lost_while_the_restore_is_owed_reports_the_reset_failed():
    """Its ReadyForQuery was held for the restore, which never came: the client's RESET ALL is
    reported failed (08006), as its effect on the client's settings is not kept either."""
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    from tests.harness.session import types

    h = Harness(pool_mode="transaction")
    session, ct = h.client(application_name="app1")
    (server,) = h.proxy.servers
    finish_internal(server)
    session.got_data(m.query("RESET ALL"))
    server.got_data(m.command_complete("RESET") + m.ready_for_query())
    ct.clear()
    server.connection_lost(Failure(ConnectionLost()))
    assert types(ct.value()) == "EZ" and b"C08006" in ct.value()
    assert session.state == "idle" and session.relay.idle and session.relay.held_ready is None
    assert session.settings["application_name"] == "app1"


def test_reset_all_replayed_after_the_node_died_brings_the_restore_along():
    """RESET ALL only reads (as routing sees it) and got no byte back: it runs again elsewhere."""
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    h = Harness(pool_mode="transaction")
    session, ct = h.client(application_name="app1")
    (first,) = h.proxy.servers
    finish_internal(first)
    ct.clear()
    session.got_data(m.query("RESET ALL"))
    first.connection_lost(Failure(ConnectionLost()))
    assert ct.value() == b"" and not session.relay.swallowing
    second = h.proxy.servers[-1]
    finish_internal(second)  # the client's settings applied on the new connection
    before, (restore,) = split_internal(messages(second.transport.value()))
    assert before[-1] == (p.QUERY, b"RESET ALL\x00") and "set_config(E'application_name'" in restore



def startup_client(**params):
    """A transaction-mode client with startup settings, linked to its (settings-synced) server."""
    h = Harness(pool_mode="transaction")
    session, ct = h.client(**params)
    (server,) = h.proxy.servers
    finish_internal(server)
    ct.clear()
    server.transport.clear()
    return session, ct, server


def test_reset_of_one_startup_setting_keeps_its_own_tag_and_restores_only_that_one():
    session, ct, server = startup_client(application_name="app1", options="-c search_path=a,public")
    session.got_data(m.query("RESET search_path"))
    (reset,), (restore,) = split_internal(messages(server.transport.value()))
    assert reset == (p.QUERY, b"RESET search_path\x00")  # as sent: its CommandComplete says RESET
    assert "'search_path'" in restore and "application_name" not in restore


def test_what_the_same_text_sets_again_is_not_restored():
    session, ct, server = startup_client(application_name="app1", options="-c search_path=a,public")
    session.got_data(m.query("RESET ALL; SET application_name = 'y'"))
    _, (restore,) = split_internal(messages(server.transport.value()))
    assert "'search_path'" in restore and "application_name" not in restore


def test_a_later_statement_of_the_same_batch_setting_a_name_keeps_it_out_of_the_restore():
    session, ct, server = startup_client(application_name="app1", options="-c search_path=a,public")
    batch = (
        m.parse("", "RESET ALL") + m.bind("", "") + m.execute()
        + m.parse("", "SET search_path = b") + m.bind("", "") + m.execute()
        + m.sync()
    )
    session.got_data(batch)
    sent, (restore,) = split_internal(messages(server.transport.value()))
    assert [chr(t) for t, _ in sent] == list("PBEPBES")
    assert "'application_name'" in restore and "search_path" not in restore


# -- inside a transaction: the same fast paths on the connection the client holds -------------

IN_TX = m.ready_for_query(p.TX_IN_TRANSACTION)


@pytest.fixture
def in_transaction(kept):
    session, ct, server = kept
    session.got_data(m.query("BEGIN"))
    server.got_data(m.command_complete("BEGIN") + IN_TX)
    assert session.state == "linked" and not session.lease.lent and session.relay.idle
    ct.clear()
    server.transport.clear()
    return session, ct, server


def test_a_plain_statement_inside_a_transaction_goes_out_as_sent_and_its_answer_whole(in_transaction):
    session, ct, server = in_transaction
    update = m.query("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 7")
    session.got_data(update)
    assert server.transport.value() == update
    # (Its transaction was answered before: nothing of it is ever replayed elsewhere.)
    assert len(session.relay.queue) == 1 and session.lease.sent == [(p.QUERY, b"BEGIN\x00")]
    answer = m.command_complete("UPDATE 1") + IN_TX
    server.got_data(answer)
    assert ct.value() == answer and session.state == "linked" and session.relay.tx_status == p.TX_IN_TRANSACTION
    ct.clear()
    server.got_data(b"")
    session.got_data(m.query("END"))
    server.got_data(m.command_complete("COMMIT") + m.ready_for_query())
    assert ct.value() == m.command_complete("COMMIT") + m.ready_for_query() and keeps_its_server(session)


@pytest.mark.parametrize("split", [None, 4])
def test_runs_inside_a_transaction_go_out_as_the_general_path_would_send_them(in_transaction, split):
    session, ct, server = in_transaction
    session.got_data(m.parse("S_1", SQL, [23]) + m.sync())
    ((_, parse), _) = messages(server.transport.value())
    server_name = parse[: parse.index(b"\x00")]
    server.got_data(frame(p.PARSE_COMPLETE) + IN_TX)
    server.transport.clear()
    batch = m.bind("", "S_1", [b"7"]) + m.describe("P", "") + m.execute() + m.sync()
    for chunk in [batch] if split is None else [batch[:split], batch[split:]]:
        session.got_data(chunk)
    assert server.transport.value() == m.bind("", server_name.decode(), [b"7"]) + batch[batch.index(b"D\x00\x00\x00\x06") :]
    if split is None:  # (split, it takes the general path: the same bytes)
        assert len(session.relay.queue) == 1
    server.transport.clear()
    server.got_data(frame(p.BIND_COMPLETE) + ANSWER[:-6] + IN_TX)
    session.got_data(unnamed_run())
    assert server.transport.value() == unnamed_run()


@pytest.mark.parametrize("begin", [True, False], ids=["in-transaction", "autocommit"])
def test_a_query_whose_read_began_inside_a_header_goes_out_whole(kept, begin):
    """A read that ends a message split across reads is not that message, even when its length
    is the message's (found by review: the fast path sent such a read as it came)."""
    session, ct, server = kept
    status = p.TX_IN_TRANSACTION if begin else p.TX_IDLE
    if begin:
        session.got_data(m.query("BEGIN"))
        server.got_data(m.command_complete("BEGIN") + IN_TX)
        server.transport.clear()
    q1, q2, q3 = (m.query(f"SELECT {i}00") for i in (1, 2, 3))
    session.got_data(q1 + q2[:3])
    server.got_data(m.command_complete("SELECT 1") + m.ready_for_query(status))
    session.got_data(q2[3:] + q3[:3])
    session.got_data(q3[3:])
    assert server.transport.value() == q1 + q2 + q3


def test_a_node_lost_under_a_fast_path_statement_inside_a_transaction_is_not_replayed(in_transaction):
    """Its transaction's work is gone with the connection: the statement is answered with an
    error saying so (08006), never run again elsewhere, and the session goes on."""
    session, ct, server = in_transaction
    session.got_data(m.query("UPDATE pgbench_accounts SET abalance = 1 WHERE aid = 7"))
    assert len(session.relay.queue) == 1  # (the fast path)
    lose(server)
    (fields,) = error_fields(ct.value())
    assert fields["C"] == "08006" and "aborted" in fields["D"]
    assert session.state == "idle" and session.server is None  # (nothing replayed: no link)


def test_what_changes_session_state_inside_a_transaction_takes_the_general_path(in_transaction):
    session, ct, server = in_transaction
    session.got_data(m.query("SET LOCAL search_path TO app"))
    assert session.relay.scope != ""  # (noted: what it prepares is its own until the transaction ends)
    server.got_data(m.command_complete("SET") + IN_TX)
    ct.clear()
    schema = session.relay.schema.ddl_at
    session.got_data(m.query("ALTER TABLE pgbench_accounts ADD COLUMN x int"))
    assert session.relay.schema.ddl_at > schema


# -- schema changes ------------------------------------------------------------------------------

STALE = m.error_response("ERROR", "0A000", "cached plan must not change result type")


def test_ddl_through_the_client_makes_every_connection_s_copies_stale(kept):
    session, ct, server = kept
    schema = session.relay.schema
    before = schema.ddl_at
    session.got_data(m.query("ALTER TABLE pgbench_accounts ADD COLUMN note text"))
    assert server.transport.value() == m.query("ALTER TABLE pgbench_accounts ADD COLUMN note text")
    sent = schema.ddl_at
    assert sent > before
    server.got_data(m.command_complete("ALTER TABLE") + m.ready_for_query())
    assert schema.ddl_at > sent  # once more as it commits: copies prepared meanwhile saw the old schema
    assert session.proxy.schema_for(session.database) is schema


def test_ddl_committed_through_one_worker_is_told_to_the_others(kept):
    # Under workers = N each worker has its own clock: theirs must move too, or their copies
    # answer 0A000 "cached plan must not change result type" inside a client's transaction.
    session, ct, server = kept
    told = []

    class Link:
        def schema_changed(self, name):
            told.append(name)

    session.proxy.worker = Link()
    session.got_data(m.query("ALTER TABLE pgbench_accounts ADD COLUMN note text"))
    assert told == [session.database.name]  # (as it is sent: their copies made before it are stale)
    server.got_data(m.command_complete("ALTER TABLE") + m.ready_for_query())
    assert told == [session.database.name] * 2  # (and as it commits: copies made meanwhile saw the old schema)


def test_a_described_run_of_a_stale_copy_is_prepared_again_first(kept):
    session, ct, server = kept
    server_name = prepared(session, server, ct)
    session.relay.schema.ddl()
    batch = m.bind("", "S_1", [b"7"]) + m.describe("P", "") + m.execute() + m.sync()
    session.got_data(batch)
    got = messages(server.transport.value())
    assert [chr(t) for t, _ in got] == list("CPBDES")
    assert got[0][1] == b"S" + server_name + b"\x00"
    server.got_data(frame(p.CLOSE_COMPLETE) + frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + ANSWER)
    assert ct.value() == frame(p.BIND_COMPLETE) + ANSWER and keeps_its_server(session)
    # Renewed: the fast path again.
    ct.clear()
    server.transport.clear()
    session.got_data(batch)
    assert server.transport.value() == m.bind("", server_name.decode(), [b"7"]) + m.describe("P", "") + m.execute() + m.sync()


def test_an_undescribed_run_of_a_stale_copy_meets_postgresql_s_verdict(kept):
    session, ct, server = kept
    server_name = prepared(session, server, ct)
    session.relay.schema.ddl()
    session.got_data(m.bind("", "S_1", [b"7"]) + m.execute() + m.sync())
    assert server.transport.value() == m.bind("", server_name.decode(), [b"7"]) + m.execute() + m.sync()
    server.got_data(STALE + m.ready_for_query())
    assert ct.value() == STALE + m.ready_for_query()  # (asyncpg prepares it again itself)
    ct.clear()
    server.transport.clear()
    session.got_data(m.parse("S_2", SQL, [23]) + m.sync())
    assert [chr(t) for t, _ in messages(server.transport.value())] == list("CPS")  # the stale copy goes first


@pytest.mark.parametrize("together", [True, False])
def test_a_fast_path_run_that_proves_stale_is_sent_again_unseen(kept, together):
    session, ct, server = kept
    server_name = prepared(session, server, ct)
    batch = m.bind("", "S_1", [b"7"]) + m.describe("P", "") + m.execute() + m.sync()
    session.got_data(batch)
    server.transport.clear()
    if together:
        server.got_data(STALE + m.ready_for_query())
    else:
        server.got_data(STALE)
        server.got_data(m.ready_for_query())
    assert ct.value() == b""
    got = messages(server.transport.value())
    assert [chr(t) for t, _ in got] == list("CPBDES") and got[0][1] == b"S" + server_name + b"\x00"
    server.got_data(frame(p.CLOSE_COMPLETE) + frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + ANSWER)
    assert ct.value() == frame(p.BIND_COMPLETE) + ANSWER
    assert session.relay.idle and keeps_its_server(session)


def test_a_fast_path_run_inside_a_transaction_gets_the_error(kept):
    session, ct, server = kept
    prepared(session, server, ct)
    session.got_data(m.query("BEGIN"))
    server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    ct.clear()
    server.transport.clear()
    session.got_data(m.bind("", "S_1", [b"7"]) + m.describe("P", "") + m.execute() + m.sync())
    server.transport.clear()
    server.got_data(STALE + m.ready_for_query(p.TX_FAILED))
    assert ct.value() == STALE + m.ready_for_query(p.TX_FAILED) and server.transport.value() == b""


def test_set_search_path_keeps_what_the_client_prepares_its_own_until_read_back(kept):
    session, ct, server = kept
    assert session.relay.scope == ""
    session.got_data(m.query("SET search_path TO app"))
    assert session.relay.scope == "\x00" + session.id
    server.got_data(m.command_complete("SET") + m.ready_for_query())
    finish_internal(server)  # the read-back: the node says "x"
    assert session.settings["search_path"] == "x" and session.relay.scope == "x"


def test_a_run_held_for_its_shape_check_survives_the_node_dying():
    """The held run is the client's: replayed elsewhere (a read that got nothing back yet)."""
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    first = session.server
    session.got_data(m.parse("S_1", SQL, [23]) + m.describe("S", "S_1") + m.sync())
    first.got_data(frame(p.PARSE_COMPLETE) + frame(p.PARAMETER_DESCRIPTION, b"\x00\x01\x00\x00\x00\x17") + ROW_DESCRIPTION + m.ready_for_query())
    first.statements.clear()  # (as after another client's DISCARD ALL on it)
    ct.clear()
    first.transport.clear()
    session.got_data(m.bind("", "S_1", [b"7"]) + m.execute() + m.sync())
    assert [chr(t) for t, _ in messages(first.transport.value())] == list("PDH")
    assert session.relay.holding is not None and session.relay.held_requests() == 1
    first.connection_lost(Failure(ConnectionLost()))
    assert ct.value() == b""
    second = h.proxy.servers[-1]
    assert second is not first
    # Placed again: the new connection has no copy either, so the run waits for its check there.
    assert [chr(t) for t, _ in messages(second.transport.value())][-3:] == list("PDH")
    second.transport.clear()
    second.got_data(frame(p.PARSE_COMPLETE) + frame(p.PARAMETER_DESCRIPTION, b"\x00\x01\x00\x00\x00\x17") + ROW_DESCRIPTION)
    assert [chr(t) for t, _ in messages(second.transport.value())] == list("BES")
    second.got_data(frame(p.BIND_COMPLETE) + ANSWER)
    assert ct.value() == frame(p.BIND_COMPLETE) + ANSWER


def test_set_local_search_path_keeps_what_is_prepared_its_own_until_the_transaction_ends(kept):
    session, ct, server = kept
    session.got_data(m.query("BEGIN"))
    server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    session.got_data(m.query("SET LOCAL search_path TO app"))
    assert session.relay.scope == "\x00" + session.id
    server.got_data(m.command_complete("SET") + m.ready_for_query(p.TX_IN_TRANSACTION))
    assert session.relay.scope == "\x00" + session.id
    session.got_data(m.query("COMMIT"))
    server.got_data(m.command_complete("COMMIT") + m.ready_for_query())
    assert session.relay.scope == "" and not session.dirty


def test_a_run_waiting_to_be_retried_is_answered_when_its_node_dies(kept):
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    from tests.harness.session import types

    session, ct, server = kept
    prepared(session, server, ct)
    session.got_data(m.bind("", "S_1", [b"7"]) + m.describe("P", "") + m.execute() + m.sync())
    server.got_data(STALE)  # held: its ReadyForQuery would decide the retry
    assert ct.value() == b""
    server.connection_lost(Failure(ConnectionLost()))
    # The node had answered (its error), so nothing is replayed: the client is told, once, and goes on.
    out = ct.value()
    assert types(out) == "EZ" and b"C08006" in out, out
    assert session.relay.idle


# -- a connection handed over between clients (more clients than server connections) --------------


@pytest.mark.parametrize("work", ["query", "prepared", "unnamed", "unnamed-split", "query-split"])
def test_a_handed_over_connection_takes_the_fast_path_and_its_answer_goes_whole(work):
    """With one server connection for two clients, B's work waits while A holds it; once A's
    transaction ends, B's work goes out as on a kept connection and its answer comes back whole
    (not relayed message by message)."""
    h = Harness(pool_mode="transaction", databases={"appdb": {"dbname": "postgres", "nodes": ["db1:5432"], "pool_size": 1}})
    b, bt = h.client()
    server = b.server
    b.got_data(m.query("SELECT 1"))
    server.got_data(ANSWER)
    server.transport.clear()
    server_name = prepared(b, server, bt)
    a, at = h.client()  # takes the connection back from B between B's transactions
    a.got_data(m.query("BEGIN"))
    assert a.server is server
    server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    server.transport.clear()
    if work == "query":
        sent = m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 7")
        b.got_data(sent)
        expected = sent
    elif work.startswith("unnamed"):
        expected = unnamed_run()
        if work == "unnamed":
            b.got_data(expected)
        else:  # in two reads, the first ending inside the Bind: not one read to send as it came
            b.got_data(expected[:40])
            b.got_data(expected[40:])
    elif work == "query-split":
        expected = m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 7")
        b.got_data(expected[:9])
        b.got_data(expected[9:])
    else:
        tail = m.execute() + m.sync()
        b.got_data(m.bind("", "S_1", [b"7"]) + tail)
        expected = m.bind("", server_name.decode(), [b"7"]) + tail
    assert b.state == "waiting"
    a.got_data(m.query("COMMIT"))
    server.got_data(m.command_complete("COMMIT") + m.ready_for_query())
    assert b.server is server and b.state == "linked"
    assert server.transport.value().endswith(expected)
    assert len(b.relay.queue) == 1 and not b.relay.extended  # (the fast path: nothing per message)
    bt.clear()
    reply = {"prepared": frame(p.BIND_COMPLETE) + ANSWER, "unnamed": UNNAMED_ANSWER, "unnamed-split": UNNAMED_ANSWER}.get(work, ANSWER)
    server.got_data(reply)
    assert bt.value() == reply


def test_a_connection_marked_for_closing_is_not_lent_again(kept):
    # RECONNECT (PgBouncer: closed "after it is released") marks a connection in use; at the end
    # of its transaction it goes back to be closed, not lent to the same client once more.
    session, ct, server = kept
    session.got_data(m.query("BEGIN"))
    server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    server.taint("RECONNECT")
    session.got_data(m.query("COMMIT"))
    server.got_data(m.command_complete("COMMIT") + m.ready_for_query())
    assert session.server is None and not keeps_its_server(session)
    assert server.transport.disconnecting and server not in server.pool.idle


COPY_IN = frame(p.COPY_IN_RESPONSE, b"\x00\x00\x00")


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize("ending", ["done", "fail"])
def test_copy_from_stdin_sent_as_libpq_sends_it_owes_one_ready_for_query(kept, whole, ending):
    """PQexecParams("COPY ... FROM STDIN"): Parse/Bind/Describe/Execute/Sync, data, CopyDone (or
    CopyFail) and a second Sync. PostgreSQL ignores the first Sync while it reads COPY data: one
    ReadyForQuery comes, and the connection is lent again after it (not left owing one)."""
    session, ct, server = kept
    batch = m.parse("", "COPY t FROM STDIN", []) + m.bind("", "", []) + m.describe("P", "") + m.execute() + m.sync()
    if whole:
        session.got_data(batch)  # (the fast path: one entry for the whole batch)
    else:
        session.got_data(batch[:20])
        session.got_data(batch[20:])
    server.got_data(frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + frame(p.NO_DATA) + COPY_IN)
    assert not session.relay.idle and not keeps_its_server(session)  # (mid-COPY: never released)
    session.got_data(frame(p.COPY_DATA, b"1\n"))
    assert not keeps_its_server(session) and session.server is server
    end = frame(p.COPY_DONE) if ending == "done" else frame(p.COPY_FAIL, b"no\x00")
    session.got_data(end + m.sync())
    assert server.transport.value().endswith(frame(p.COPY_DATA, b"1\n") + end + m.sync())
    if ending == "done":
        answer = m.command_complete("COPY 1") + m.ready_for_query()
    else:
        answer = m.error_response("ERROR", "57014", "COPY from stdin failed: no") + m.ready_for_query()
    server.got_data(answer)
    assert ct.value().endswith(answer) and ct.value().count(m.ready_for_query()) == 1
    assert session.relay.idle and keeps_its_server(session)


def test_copy_from_stdin_with_its_data_sent_before_copy_in_response(kept):
    """Parse/Bind/Execute/Sync, the data, CopyDone and Sync in one write, before CopyInResponse
    (a client that does not wait for it): the first Sync is ignored by PostgreSQL, the second
    answered. The connection must be lent again after that ReadyForQuery: before, the relay
    waited for a CopyDone that had gone by already, and kept the connection from every other
    client for as long as this one stayed."""
    session, ct, server = kept
    session.got_data(
        m.parse("", "COPY t FROM STDIN", []) + m.bind("", "", []) + m.execute() + m.sync()
        + frame(p.COPY_DATA, b"1\n") + frame(p.COPY_DONE) + m.sync()
    )  # fmt: skip
    server.got_data(frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + COPY_IN)
    assert not session.relay.idle and session.server is server
    answer = m.command_complete("COPY 1") + m.ready_for_query()
    server.got_data(answer)
    assert ct.value().endswith(answer) and ct.value().count(m.ready_for_query()) == 1
    assert session.relay.idle and keeps_its_server(session)


def test_a_stray_copy_done_does_not_free_a_connection_mid_copy(kept):
    """A CopyDone outside any COPY (PostgreSQL ignores it) before a COPY whose client waits for
    CopyInResponse: the relay must still hold the connection until the real CopyDone."""
    session, ct, server = kept
    session.got_data(frame(p.COPY_DONE) + m.query("SELECT 1"))
    server.got_data(m.command_complete("SELECT 1") + m.ready_for_query())
    session.got_data(m.parse("", "COPY t FROM STDIN", []) + m.bind("", "", []) + m.describe("P", "") + m.execute() + m.sync())
    server.got_data(frame(p.PARSE_COMPLETE) + frame(p.BIND_COMPLETE) + frame(p.NO_DATA) + COPY_IN)
    assert not session.relay.idle and not keeps_its_server(session)  # (mid-COPY: never released)
    session.got_data(frame(p.COPY_DATA, b"1\n") + frame(p.COPY_DONE) + m.sync())
    server.got_data(m.command_complete("COPY 1") + m.ready_for_query())
    assert session.relay.idle and keeps_its_server(session)

