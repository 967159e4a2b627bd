"""SQL pgtwist runs on a client's server connection: extended protocol under its own names, never a Query.

PostgreSQL drops the unnamed prepared statement and portal whenever a simple Query arrives; what
the proxy sends on a client's behalf (settings synced and read back, the read-your-writes WAL
position, startup settings restored after RESET) must leave them as they were.
"""

from pgtwist.pooling.statements import INTERNAL_NAME, internal_batch
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.session import Harness, finish_internal, internal_answer, messages, split_internal, types

OWN = INTERNAL_NAME.encode() + b"\x00"


def test_internal_batch_is_named_extended_protocol_closed_before_and_after():
    msgs = messages(internal_batch(["RESET \"a\"", "SELECT 1"]))
    assert "".join(chr(t) for t, _ in msgs) == "CC" + "PBECC" * 2 + "S"
    # Only the proxy's own statement and portal are named: never the unnamed ones ("").
    for t, body in msgs:
        if t == p.CLOSE:
            assert body in (b"P" + OWN, b"S" + OWN)
        elif t == p.PARSE:
            assert m.decode_parse(body)[0] == INTERNAL_NAME
        elif t == p.BIND:
            portal, statement, params, _ = m.decode_bind(body)
            assert (portal, statement, params) == (INTERNAL_NAME, INTERNAL_NAME, [])
        elif t == p.EXECUTE:
            assert m.decode_execute(body) == (INTERNAL_NAME, 0)
    assert [m.decode_parse(b)[1] for t, b in msgs if t == p.PARSE] == ["RESET \"a\"", "SELECT 1"]


def test_startup_settings_are_applied_without_a_query():
    h = Harness(pool_mode="transaction")
    session, ct = h.client(application_name="x", options="-c search_path=a")
    (server,) = h.proxy.servers
    sent = messages(server.transport.value())
    assert p.QUERY not in [t for t, _ in sent]
    before, (sql,) = split_internal(sent)
    assert before == [] and "set_config(E'application_name', E'x', false)" in sql
    server.transport.clear()
    server.got_data(internal_answer(rows=[[b"x", b"a"]], params=[("application_name", "x")]))
    assert session.state == "linked" and types(ct.value()).endswith("KZ")


def unnamed_then_set_config():
    """Transaction pooling: the client parses the unnamed statement, then runs a named statement
    calling set_config(..., false); its server connection is released after each."""
    h = Harness(pool_mode="transaction")
    session, ct = h.client()
    server = session.server
    session.got_data(m.parse("", "select $1::int + 1") + m.sync())
    server.got_data(m.parse_complete() + m.ready_for_query())
    session.got_data(m.parse("s1", "select set_config('application_name', 'x', false)") + m.sync())
    server.got_data(m.parse_complete() + m.ready_for_query())
    server.transport.clear()
    session.got_data(m.bind("", "s1") + m.execute() + m.sync())
    assert session.server is server
    return h, session, ct, server


def test_the_read_back_after_set_config_is_no_query():
    h, session, ct, server = unnamed_then_set_config()
    server.got_data(
        m.bind_complete() + m.data_row([b"x"]) + m.command_complete("SELECT 1")
        + m.parameter_status("application_name", "x") + m.ready_for_query()
    )
    sent = messages(server.transport.value())
    before, (sql,) = split_internal(sent)
    assert [chr(t) for t, _ in before] == list("BES")  # the client's own run, renamed
    assert p.QUERY not in [t for t, _ in sent]
    assert "current_setting(E'application_name', true)" in sql
    ct.clear()
    server.got_data(internal_answer(rows=[[b"x"]]))
    assert ct.value() == b"" and session.settings["application_name"] == "x"
    assert session.state == "idle" and server in h.pool.idle


def test_the_restore_after_reset_all_is_no_query():
    h = Harness(pool_mode="transaction")
    session, ct = h.client(application_name="app1")
    (server,) = h.proxy.servers
    finish_internal(server)
    server.transport.clear()
    session.got_data(m.parse("", "select $1::int + 1") + m.parse("r", "RESET ALL") + m.bind("", "r") + m.execute() + m.sync())
    sent = messages(server.transport.value())
    assert p.QUERY not in [t for t, _ in sent]
    before, (sql,) = split_internal(sent)
    assert [chr(t) for t, _ in before] == list("PPBES")
    assert sql == "SELECT pg_catalog.set_config(E'application_name', E'app1', false)"


def test_the_read_your_writes_position_is_read_without_a_query():
    from tests.harness.session import P, Setup, sent

    s = Setup()
    session, ct = s.client()
    session.got_data(m.query("INSERT INTO t VALUES (1)"))
    server = session.server
    assert str(server.node) == P
    sent(server)
    server.got_data(m.command_complete("INSERT 0 1") + m.ready_for_query())
    out = messages(sent(server))
    assert p.QUERY not in [t for t, _ in out]
    before, (sql,) = split_internal(out)
    assert before == [] and "pg_current_wal_insert_lsn()" in sql
    server.got_data(internal_answer(rows=[[b"0/100", b"0/100", b"on"]]))
    assert session.min_lsn == 0x100 and session.state == "idle"
