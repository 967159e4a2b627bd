"""Relay: client statement names over shared server statements, injected and synthesized messages, in order."""

from pgtwist.pooling.relay import Relay
from pgtwist.pooling.statements import SERVER_NAME_PREFIX, Schema, ServerStatements, Statement, parse_body
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.framing import frame, pop_messages

PARSE_COMPLETE = frame(p.PARSE_COMPLETE)
BIND_COMPLETE = frame(p.BIND_COMPLETE)
CLOSE_COMPLETE = frame(p.CLOSE_COMPLETE)
NO_DATA = frame(p.NO_DATA)
ROW = frame(p.DATA_ROW, b"\x00\x01\x00\x00\x00\x011")


class FakeServer:
    """What the relay uses of a ServerConnection: its shared statements."""

    def __init__(self, limit=100):
        self.statements = ServerStatements(limit)


def messages(data: bytes) -> list[tuple[int, bytes]]:
    buf = bytearray(data)
    out = pop_messages(buf, p.MAX_PROTOCOL_MESSAGE)
    assert not buf
    return out


def types(data: bytes) -> str:
    return "".join(chr(t) for t, _ in messages(data))


def send(relay, server, data: bytes) -> tuple[bytes, bytes]:
    """Client messages through the relay: (what goes to the server, what the proxy answers itself)."""
    to_server: list = []
    to_client: list = []
    items = messages(data)
    relay.upcoming = items  # (as the session does: what follows a Bind in the same read)
    for at, (msg_type, body) in enumerate(items):
        relay.at = at
        relay.client_message(msg_type, body, server, to_server, to_client)
    relay.upcoming = ()
    return b"".join(to_server), b"".join(to_client)


def receive(relay, data: bytes) -> bytes:
    """Server messages through the relay as the session feeds them: captured ones looked at, the rest passed on."""
    capture = relay.capture()  # (fixed for one read, as the server's scanner's is)
    out: list = []
    for msg_type, body in messages(data):
        if msg_type in capture:
            relay.server_message(msg_type, body, out)
        else:
            out.append(frame(msg_type, body))
    return b"".join(out)


def shared(sql: str) -> str:
    return Statement.from_definition(messages(m.parse("x", sql))[0][1][2:]).server_name


def parse_names(data: bytes) -> list[str]:
    return [body.split(b"\x00", 1)[0].decode() for t, body in messages(data) if t == p.PARSE]


def bind_statements(data: bytes) -> list[str]:
    return [body.split(b"\x00")[1].decode() for t, body in messages(data) if t == p.BIND]


SQL = "SELECT $1::int"
SHARED = shared(SQL)
EXTENDED_REPLY = BIND_COMPLETE + ROW + m.command_complete("SELECT 1")


def prepared(sql=SQL, name="s1", server=None, schema=None):
    """A relay whose client prepared *name* on *server* (answered): (relay, server)."""
    relay, server = Relay(schema), server or FakeServer()
    to_server, to_client = send(relay, server, m.parse(name, sql) + m.sync())
    assert to_client == b""
    assert receive(relay, PARSE_COMPLETE + m.ready_for_query()) == PARSE_COMPLETE + m.ready_for_query()
    assert relay.idle
    return relay, server


# -- renaming -----------------------------------------------------------------------------------


def test_named_statement_runs_under_its_shared_name():
    relay, server = Relay(), FakeServer()
    batch = m.parse("s1", SQL) + m.bind("", "s1", [b"1"]) + m.describe("S", "s1") + m.execute() + m.sync()
    to_server, to_client = send(relay, server, batch)
    assert to_client == b""
    assert SHARED.startswith(SERVER_NAME_PREFIX)
    assert parse_names(to_server) == [SHARED] and bind_statements(to_server) == [SHARED]
    assert types(to_server) == "PBDES"
    (describe,) = [b for t, b in messages(to_server) if t == p.DESCRIBE]
    assert describe == b"S" + SHARED.encode() + b"\x00"
    assert SHARED in server.statements and relay.statements["s1"].server_name == SHARED
    # The parameters and the rest of the Bind travel unchanged.
    assert messages(to_server)[1][1].endswith(messages(m.bind("", "s1", [b"1"]))[0][1][4:])
    reply = PARSE_COMPLETE + BIND_COMPLETE + frame(p.PARAMETER_DESCRIPTION, b"\x00\x00") + NO_DATA + m.command_complete("SELECT 1") + m.ready_for_query()
    assert receive(relay, reply) == reply
    assert relay.idle and relay.extended == 0


def test_unnamed_statements_pass_through_untouched():
    relay, server = Relay(), FakeServer()
    batch = m.parse("", "SELECT 1") + m.bind("", "") + m.execute() + m.sync()
    to_server, to_client = send(relay, server, batch)
    assert to_server == batch and to_client == b""
    assert len(server.statements) == 0


def test_a_second_client_shares_the_server_statement_and_its_parse_renews_it():
    server = FakeServer()
    schema = Schema()
    prepared(server=server, schema=schema)
    other = Relay(schema)
    # The client's Parse reaches the server as its own would: the shared copy is closed and
    # prepared again (it may predate a schema change), the CloseComplete the client's not.
    batch = m.parse("", "SELECT 2") + m.bind("", "") + m.execute() + m.parse("mine", SQL) + m.bind("", "mine", [b"2"]) + m.execute() + m.sync()
    to_server, to_client = send(other, server, batch)
    assert to_client == b""
    assert types(to_server) == "PBE" + "CPBE" + "S"
    assert parse_names(to_server) == ["", SHARED]
    assert bind_statements(to_server) == ["", SHARED]
    reply = PARSE_COMPLETE + EXTENDED_REPLY + CLOSE_COMPLETE + PARSE_COMPLETE + EXTENDED_REPLY + m.ready_for_query()
    out = receive(other, reply)
    assert out == PARSE_COMPLETE + EXTENDED_REPLY + PARSE_COMPLETE + EXTENDED_REPLY + m.ready_for_query()
    assert other.idle


def test_a_copy_older_than_the_client_s_parse_is_prepared_again():
    schema = Schema()
    server = FakeServer()
    relay, _ = prepared(server=server, schema=schema)  # the copy on server: tick 1
    newer = Relay(schema)
    elsewhere = FakeServer()
    send(newer, elsewhere, m.parse("mine", SQL) + m.sync())  # the client parsed later (tick 2), elsewhere
    receive(newer, PARSE_COMPLETE + m.ready_for_query())
    to_server, _ = send(newer, server, m.bind("", "mine") + m.describe("P", "") + m.execute() + m.sync())
    assert types(to_server) == "CPBDES"  # closed and prepared again first, swallowed
    out = receive(newer, CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + m.command_complete("SELECT 1") + m.ready_for_query())
    assert types(out) == "2nCZ"
    # The older client's statement uses the renewed copy as it is.
    to_server, _ = send(relay, server, m.bind("", "s1") + m.execute() + m.sync())
    assert types(to_server) == "BES"


def test_bind_on_a_server_lacking_the_statement_injects_a_swallowed_parse():
    relay, first = prepared()
    fresh = FakeServer()
    to_server, to_client = send(relay, fresh, m.bind("", "s1", [b"1"]) + m.execute() + m.sync())
    assert types(to_server) == "PBES" and parse_names(to_server) == [SHARED]
    assert SHARED in fresh.statements
    out = receive(relay, PARSE_COMPLETE + EXTENDED_REPLY + m.ready_for_query())
    assert out == EXTENDED_REPLY + m.ready_for_query()  # the client never asked for that Parse


def test_describe_on_a_server_lacking_the_statement_injects_a_parse_too():
    relay, _ = prepared()
    fresh = FakeServer()
    to_server, _ = send(relay, fresh, m.describe("S", "s1") + m.sync())
    assert types(to_server) == "PDS"
    out = receive(relay, PARSE_COMPLETE + frame(p.PARAMETER_DESCRIPTION, b"\x00\x00") + NO_DATA + m.ready_for_query())
    assert types(out) == "tnZ"


def test_unknown_client_name_goes_to_the_server_as_is():
    relay, server = Relay(), FakeServer()
    to_server, to_client = send(relay, server, m.bind("", "nosuch") + m.sync())
    assert bind_statements(to_server) == ["nosuch"] and to_client == b""


def test_a_shared_name_the_client_never_prepared_is_refused_by_the_proxy():
    relay, server = prepared()
    other = Relay()
    to_server, to_client = send(other, server, m.bind("", SHARED) + m.execute() + m.sync())
    # Everything up to Sync is skipped; the Sync still goes, so the ReadyForQuery comes from the server.
    assert types(to_server) == "S"
    fields = m.decode_fields(messages(to_client)[0][1])
    assert fields["C"] == sqlstate.INVALID_SQL_STATEMENT_NAME
    assert receive(other, m.ready_for_query()) == m.ready_for_query()


# -- errors ---------------------------------------------------------------------------------------


def test_error_mid_batch_drops_queued_replies_and_undoes_registrations():
    server = FakeServer()
    owner, _ = prepared(server=server)
    relay = Relay()
    send(relay, server, m.parse("old", "SELECT 'old'") + m.sync())
    receive(relay, PARSE_COMPLETE + m.ready_for_query())
    new_shared = shared("SELECT 'new'")
    batch = (
        m.parse("", "SELEKT") + m.bind("", "") + m.execute()  # fails at the server
        + m.parse("s2", SQL)  # shared already: closed and prepared again
        + m.parse("s3", "SELECT 'new'")  # goes to the server, recorded there
        + m.close("S", "old")  # answered by the proxy, queued
        + m.sync()
    )
    to_server, to_client = send(relay, server, batch)
    assert to_client == b""
    assert parse_names(to_server) == ["", SHARED, new_shared]
    assert new_shared in server.statements and set(relay.statements) == {"s2", "s3"}
    error = m.error_response("ERROR", "42601", 'syntax error at or near "SELEKT"')
    out = receive(relay, error + m.ready_for_query())
    assert out == error + m.ready_for_query()  # no ParseComplete, no CloseComplete
    assert set(relay.statements) == {"old"}  # s2 and s3 undone, the Close skipped
    assert new_shared not in server.statements
    # The server skipped the Close of SHARED too: it may still hold it, so its next Parse closes it first.
    assert SHARED not in server.statements and SHARED in server.statements.leftover
    assert relay.idle and relay.extended == 0


def test_queries_after_a_failed_extended_message_are_skipped_like_the_server_does():
    # PostgreSQL answers nothing until Sync after an extended-protocol error, simple Queries and
    # FunctionCalls included: the relay must not wait for their ReadyForQuery (it hung so).
    server = FakeServer()
    relay = Relay()
    batch = m.execute("") + m.query("SELEC 1") + m.query("SELECT 2") + m.sync() + m.query("SELECT 3")
    to_server, to_client = send(relay, server, batch)
    assert to_server == batch and to_client == b""
    error = m.error_response("ERROR", "34000", 'portal "" does not exist')
    out = receive(relay, error + m.ready_for_query())
    assert out == error + m.ready_for_query()
    assert not relay.idle  # SELECT 3 is still owed its answer
    out = receive(relay, m.command_complete("SELECT 1") + m.ready_for_query())
    assert relay.idle and relay.extended == 0


def test_not_idle_while_the_server_may_skip_to_a_sync_still_to_come():
    # Nothing is owed after the error, but the server skips everything until the client's Sync:
    # handed to another client then, it would swallow that client's work unanswered.
    server = FakeServer()
    relay = Relay()
    send(relay, server, m.execute("") + m.query("SELECT 1"))
    receive(relay, m.error_response("ERROR", "34000", 'portal "" does not exist'))
    assert not relay.queue and not relay.idle
    send(relay, server, m.sync())
    receive(relay, m.ready_for_query())
    assert relay.idle
    # A plain extended batch is idle once its Sync is answered, as before.
    send(relay, server, m.parse("", "SELECT 1") + m.bind("", "") + m.execute() + m.sync())
    assert not relay.idle
    receive(relay, PARSE_COMPLETE + BIND_COMPLETE + ROW + m.command_complete("SELECT 1") + m.ready_for_query())
    assert relay.idle


def test_error_of_a_simple_query_waits_for_its_ready_for_query():
    relay, server = Relay(), FakeServer()
    send(relay, server, m.query("SELEKT") + m.parse("s1", SQL) + m.sync())
    error = m.error_response("ERROR", "42601", "syntax error")
    out = receive(relay, error + m.ready_for_query() + PARSE_COMPLETE + m.ready_for_query())
    assert types(out) == "EZ1Z"
    assert "s1" in relay.statements


def test_duplicate_parse_goes_to_the_server_and_the_error_names_the_client_statement():
    relay, server = prepared()
    to_server, to_client = send(relay, server, m.parse("s1", "SELECT 2") + m.sync())
    assert to_client == b""
    # The server refuses it itself (aborting a transaction as PostgreSQL would): under the shared name it holds.
    ((t, body),) = [(t, b) for t, b in messages(to_server) if t == p.PARSE]
    assert body == parse_body(SHARED, messages(m.parse("x", "SELECT 2"))[0][1][2:])
    error = m.error_response("ERROR", sqlstate.DUPLICATE_PREPARED_STATEMENT, f'prepared statement "{SHARED}" already exists')
    out = receive(relay, error + m.ready_for_query())
    fields = m.decode_fields(messages(out)[0][1])
    assert fields["M"] == 'prepared statement "s1" already exists'
    assert fields["C"] == "42P05" and fields["S"] == "ERROR"
    assert types(out) == "EZ"
    # The client's statement is still the one it had.
    assert relay.statements["s1"].server_name == SHARED and SHARED in server.statements


def test_duplicate_parse_on_a_server_lacking_the_statement_prepares_it_first():
    relay, _ = prepared()
    fresh = FakeServer()
    to_server, _ = send(relay, fresh, m.parse("s1", "SELECT 2") + m.sync())
    assert parse_names(to_server) == [SHARED, SHARED]  # the injected one, then the duplicate
    error = m.error_response("ERROR", "42P05", f'prepared statement "{SHARED}" already exists')
    out = receive(relay, PARSE_COMPLETE + error + m.ready_for_query())
    assert types(out) == "EZ"
    assert m.decode_fields(messages(out)[0][1])["M"] == 'prepared statement "s1" already exists'


def test_fatal_from_the_server_is_kept_not_forwarded():
    relay, server = Relay(), FakeServer()
    send(relay, server, m.query("SELECT pg_sleep(10)"))
    fatal = m.error_response("FATAL", "57P01", "terminating connection due to administrator command")
    to_client: list = []
    assert relay.server_message(p.ERROR_RESPONSE, messages(fatal)[0][1], to_client) is None
    assert to_client == []
    assert relay.server_fatal["C"] == "57P01" and relay.server_fatal["M"].startswith("terminating")
    assert not relay.idle  # the query is still owed its answer


def test_panic_is_kept_too_but_errors_pass():
    relay, server = Relay(), FakeServer()
    send(relay, server, m.query("SELECT 1"))
    out = receive(relay, m.error_response("PANIC", "XX000", "boom"))
    assert out == b"" and relay.server_fatal["M"] == "boom"
    relay = Relay()
    out = receive(relay, m.error_response("ERROR", "XX000", "plain"))
    assert types(out) == "E" and relay.server_fatal is None


def test_proxy_made_error_skips_to_sync():
    relay, server = Relay(), FakeServer()
    relay.fail(sqlstate.FEATURE_NOT_SUPPORTED, "no", to_client := [])
    assert types(b"".join(to_client)) == "E" and relay.skipping
    to_server, to_client2 = send(relay, server, m.bind("", "") + m.execute() + m.sync())
    assert to_server == m.sync() and to_client2 == b""
    assert receive(relay, m.ready_for_query()) == m.ready_for_query()
    assert relay.idle


# -- Close and eviction ---------------------------------------------------------------------------


def test_close_of_a_named_statement_is_answered_by_the_proxy():
    relay, server = prepared()
    to_server, to_client = send(relay, server, m.close("S", "s1"))
    assert to_server == b"" and to_client == CLOSE_COMPLETE
    assert "s1" not in relay.statements
    assert SHARED in server.statements  # other clients may still use it
    # Closing a name that does not exist is no error either (as in PostgreSQL).
    assert send(relay, server, m.close("S", "never")) == (b"", CLOSE_COMPLETE)


def test_close_behind_requests_in_flight_waits_its_turn():
    relay, server = prepared()
    to_server, to_client = send(relay, server, m.bind("", "s1", [b"1"]) + m.execute() + m.close("S", "s1") + m.sync())
    assert types(to_server) == "BES" and to_client == b""
    out = receive(relay, EXTENDED_REPLY + m.ready_for_query())
    assert out == EXTENDED_REPLY + CLOSE_COMPLETE + m.ready_for_query()


def test_close_of_a_portal_or_the_unnamed_statement_goes_to_the_server():
    relay, server = Relay(), FakeServer()
    to_server, to_client = send(relay, server, m.close("P", "c1") + m.close("S", "") + m.sync())
    assert to_server == m.close("P", "c1") + m.close("S", "") + m.sync() and to_client == b""
    assert receive(relay, CLOSE_COMPLETE * 2 + m.ready_for_query()) == CLOSE_COMPLETE * 2 + m.ready_for_query()


def test_eviction_beyond_max_prepared_statements_injects_a_swallowed_close():
    server = FakeServer(limit=1)
    relay, _ = prepared(server=server)
    other_shared = shared("SELECT 2")
    to_server, _ = send(relay, server, m.parse("s2", "SELECT 2") + m.sync())
    assert types(to_server) == "CPS"
    ((t, close_body),) = [(t, b) for t, b in messages(to_server) if t == p.CLOSE]
    assert close_body == b"S" + SHARED.encode() + b"\x00"
    assert list(server.statements.names) == [other_shared]
    out = receive(relay, CLOSE_COMPLETE + PARSE_COMPLETE + m.ready_for_query())
    assert out == PARSE_COMPLETE + m.ready_for_query()
    # s1 is still the client's: the next Bind prepares it again (evicting s2's).
    to_server, _ = send(relay, server, m.bind("", "s1") + m.execute() + m.sync())
    assert types(to_server) == "CPBES" and parse_names(to_server) == [SHARED]
    out = receive(relay, CLOSE_COMPLETE + PARSE_COMPLETE + EXTENDED_REPLY + m.ready_for_query())
    assert out == EXTENDED_REPLY + m.ready_for_query()


# -- the server going away -------------------------------------------------------------------------


def test_forget_server_undoes_what_was_never_answered():
    relay, server = Relay(), FakeServer()
    send(relay, server, m.parse("s1", SQL) + m.bind("", "s1") + m.execute())
    relay.fail(sqlstate.FEATURE_NOT_SUPPORTED, "x", [])
    assert relay.skipping and not relay.idle
    relay.forget_server()
    assert relay.idle and relay.extended == 0 and not relay.skipping
    assert relay.statements == {} and len(server.statements) == 0


def test_capture_widens_while_extended_requests_are_in_flight():
    relay, server = Relay(), FakeServer()
    send(relay, server, m.query("SELECT 1"))
    assert p.PARSE_COMPLETE not in relay.capture()
    send(relay, server, m.parse("", "SELECT 1"))
    assert p.PARSE_COMPLETE in relay.capture()


def test_ready_for_query_tracks_the_transaction_status():
    relay, server = Relay(), FakeServer()
    send(relay, server, m.query("BEGIN"))
    out: list = []
    assert relay.server_message(p.READY_FOR_QUERY, b"T", out) == p.TX_IN_TRANSACTION
    assert relay.tx_status == p.TX_IN_TRANSACTION


# -- stale shared statements ---------------------------------------------------------------------

STALE = m.error_response("ERROR", "0A000", "cached plan must not change result type")
DESCRIBED_RUN = m.bind("", "s1", [b"1"]) + m.describe("P", "") + m.execute() + m.sync()
DESCRIBED_REPLY = BIND_COMPLETE + NO_DATA + m.command_complete("SELECT 1") + m.ready_for_query()


def test_statement_is_stale_by_sqlstate_message_or_routine():
    from pgtwist.pooling.relay import statement_is_stale

    assert statement_is_stale({"C": "0A000", "M": "cached plan must not change result type"})
    assert statement_is_stale({"C": "0A000", "M": "le plan en cache ne doit pas modifier le type en résultat", "R": "RevalidateCachedQuery"})
    assert statement_is_stale({"C": "XX000", "M": "cache lookup failed for type 16392"})
    assert not statement_is_stale({"C": "0A000", "M": "cannot do something else"})
    assert not statement_is_stale({"C": "XX000", "M": "could not open file"})
    assert not statement_is_stale({"C": "42P01", "M": "relation does not exist"})


def test_a_stale_copy_is_forgotten_and_the_batch_sent_again_unseen():
    relay, server = prepared()
    to_server, _ = send(relay, server, DESCRIBED_RUN)
    assert types(to_server) == "BDES"
    out = receive(relay, STALE + m.ready_for_query())
    assert out == b""  # neither the error nor its ReadyForQuery: the client hears of the retry only
    assert SHARED not in server.statements and SHARED in server.statements.leftover
    again, relay.again = relay.again, None
    assert b"".join(frame(t, b) for t, b in again) == DESCRIBED_RUN  # as the client sent it
    relay.replaying = True
    to_server, to_client = send(relay, server, DESCRIBED_RUN)
    relay.replaying = False
    assert types(to_server) == "CPBDES" and parse_names(to_server) == [SHARED] and to_client == b""
    out = receive(relay, CLOSE_COMPLETE + PARSE_COMPLETE + DESCRIBED_REPLY)
    assert out == DESCRIBED_REPLY
    assert SHARED in server.statements and relay.idle


def test_a_retried_batch_that_fails_again_gives_the_client_postgresql_s_error():
    relay, server = prepared()
    relay.replaying = True  # (what the session sets while it sends a batch again)
    send(relay, server, DESCRIBED_RUN)
    relay.replaying = False
    out = receive(relay, STALE + m.ready_for_query())
    assert out == STALE + m.ready_for_query() and relay.again is None


def test_a_stale_copy_inside_a_transaction_gives_postgresql_s_own_error():
    relay, server = prepared()
    send(relay, server, m.query("BEGIN"))
    receive(relay, m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    send(relay, server, DESCRIBED_RUN)
    out = receive(relay, STALE + m.ready_for_query(p.TX_FAILED))
    assert out == STALE + m.ready_for_query(p.TX_FAILED) and relay.again is None
    assert SHARED not in server.statements  # prepared again (Close first) on its next use


def test_a_run_without_describe_is_not_retried():
    """A client decoding rows by an earlier description (asyncpg) must learn of the new result type."""
    relay, server = prepared()
    send(relay, server, m.bind("", "s1", [b"1"]) + m.execute() + m.sync())
    out = receive(relay, STALE + m.ready_for_query())
    assert out == STALE + m.ready_for_query() and relay.again is None
    assert SHARED in server.statements.leftover


def test_nothing_is_retried_after_an_execute_in_the_same_batch():
    relay, server = prepared()
    send(relay, server, m.parse("", "INSERT INTO t VALUES (1)") + m.bind("", "") + m.execute() + DESCRIBED_RUN)
    out = receive(relay, PARSE_COMPLETE + BIND_COMPLETE + m.command_complete("INSERT 0 1") + STALE + m.ready_for_query())
    assert types(out) == "12CEZ" and relay.again is None


def test_a_stale_describe_holds_back_its_parameter_description():
    relay, server = prepared()
    send(relay, server, m.describe("S", "s1") + m.sync())
    param = frame(p.PARAMETER_DESCRIPTION, b"\x00\x01\x00\x00\x40\x08")
    lookup = m.error_response("ERROR", "XX000", "cache lookup failed for type 16392")
    assert receive(relay, param) == b""
    assert receive(relay, lookup + m.ready_for_query()) == b""
    assert [t for t, _ in relay.again] == [p.DESCRIBE, p.SYNC]
    # When it is fine, the ParameterDescription goes out with the RowDescription.
    relay, server = prepared()
    send(relay, server, m.describe("S", "s1") + m.sync())
    assert receive(relay, param) == b""
    assert receive(relay, NO_DATA + m.ready_for_query()) == param + NO_DATA + m.ready_for_query()
    # And before any other error.
    relay, server = prepared()
    send(relay, server, m.describe("S", "s1") + m.sync())
    other = m.error_response("ERROR", "42501", "permission denied")
    assert receive(relay, param + other + m.ready_for_query()) == param + other + m.ready_for_query()


def test_no_retry_when_more_was_sent_behind_the_failed_batch():
    """Sending it again would put it behind what the client sent next: the client gets the error."""
    relay, server = prepared()
    send(relay, server, DESCRIBED_RUN)
    assert receive(relay, STALE) == b""
    send(relay, server, m.query("SELECT 2"))
    out = receive(relay, m.ready_for_query())
    assert out == STALE + m.ready_for_query() and relay.again is None
    assert receive(relay, m.command_complete("SELECT 1") + m.ready_for_query()) == m.command_complete("SELECT 1") + m.ready_for_query()
    assert relay.idle


def test_the_fast_path_batch_is_retried_unless_its_answer_began():
    relay, server = prepared()
    items = messages(DESCRIBED_RUN)
    relay.expect_batch(items, server.statements, SHARED)
    assert receive(relay, STALE + m.ready_for_query()) == b""
    assert relay.again == items
    relay.again = None
    relay, server = prepared()
    relay.expect_batch(items, server.statements, SHARED)
    relay.hot = None  # (the session saw bytes of its answer go out)
    assert receive(relay, STALE + m.ready_for_query()) == STALE + m.ready_for_query()
    assert SHARED in server.statements  # (nothing known about which statement failed)


def test_ddl_makes_older_copies_stale_for_clients_that_describe():
    schema = Schema()
    relay, server = prepared(schema=schema)
    statement = relay.statements["s1"]
    assert relay.fresh(statement, server.statements, True)
    schema.ddl()
    assert not relay.fresh(statement, server.statements, True)
    assert relay.fresh(statement, server.statements, False)  # PostgreSQL decides, as for the client's own
    to_server, _ = send(relay, server, DESCRIBED_RUN)
    assert types(to_server) == "CPBDES"
    receive(relay, CLOSE_COMPLETE + PARSE_COMPLETE + DESCRIBED_REPLY)
    assert relay.fresh(statement, server.statements, True)
    to_server, _ = send(relay, server, m.bind("", "s1") + m.execute() + m.sync())
    assert types(to_server) == "BES"


def test_search_path_is_part_of_the_shared_name():
    server = FakeServer()
    a, b, c = Relay(scope="app_a"), Relay(scope="app_b"), Relay(scope="app_a")
    names = []
    for relay in (a, b, c):
        to_server, _ = send(relay, server, m.parse("s", SQL) + m.sync())
        names.append(parse_names(to_server)[-1])
    assert names[0] != names[1] and names[0] == names[2]
    assert SHARED not in names  # (the server default's, "")


# -- a fresh copy for a client that decodes by an earlier description (asyncpg) --------------------


def row_description(*columns, table=0):
    """RowDescription body: (name, type oid) per column."""
    out = len(columns).to_bytes(2, "big")
    for name, oid in columns:
        out += name.encode() + b"\x00" + table.to_bytes(4, "big") + b"\x00\x01" + oid.to_bytes(4, "big") + b"\x00\x04" + b"\xff\xff\xff\xff" + b"\x00\x00"
    return out


PARAMS = frame(p.PARAMETER_DESCRIPTION, b"\x00\x00")
ONE_COLUMN = row_description(("x", 23), table=16400)


def described(server=None):
    """A client that prepared and described s1 (as asyncpg does), on *server*."""
    relay, server = Relay(), server or FakeServer()
    send(relay, server, m.parse("s1", "SELECT * FROM t") + m.describe("S", "s1") + m.sync())
    receive(relay, PARSE_COMPLETE + PARAMS + frame(p.ROW_DESCRIPTION, ONE_COLUMN) + m.ready_for_query())
    return relay, server


def test_result_shape_is_names_types_and_modifiers_only():
    from pgtwist.pooling.relay import result_shape

    assert result_shape(b"") == ()
    assert result_shape(row_description(("x", 23), table=1)) == result_shape(row_description(("x", 23), table=2))
    assert result_shape(row_description(("x", 23))) != result_shape(row_description(("x", 25)))
    assert result_shape(row_description(("x", 23))) != result_shape(row_description(("y", 23)))
    assert result_shape(row_description(("x", 23))) != result_shape(row_description(("x", 23), ("y", 23)))


def test_an_undescribed_run_on_a_fresh_copy_waits_for_its_description_then_goes():
    relay, _ = described()
    fresh = FakeServer()
    to_server, to_client = send(relay, fresh, m.bind("", "s1") + m.execute())
    assert types(to_server) == "PDH" and to_client == b""  # Parse, Describe, Flush: the run is held
    more, _ = send(relay, fresh, m.sync())
    assert more == b"" and [t for t, _ in relay.holding] == [p.BIND, p.EXECUTE, p.SYNC]
    # Recreated with the same columns (another table OID): fine, the run goes as sent.
    out = receive(relay, PARSE_COMPLETE + PARAMS + frame(p.ROW_DESCRIPTION, row_description(("x", 23), table=99999)))
    assert out == b"" and relay.holding is None and [t for t, _ in relay.again] == [p.BIND, p.EXECUTE, p.SYNC]
    again, relay.again = relay.again, None
    relay.replaying = True
    to_server, _ = send(relay, fresh, b"".join(frame(t, b) for t, b in again))
    relay.replaying = False
    assert types(to_server) == "BES" and bind_statements(to_server) == [shared_name(relay)]


def shared_name(relay):
    return relay.statements["s1"].server_name


def test_a_fresh_copy_of_another_shape_fails_the_run_as_postgresql_would():
    relay, _ = described()
    fresh = FakeServer()
    send(relay, fresh, m.bind("", "s1") + m.execute() + m.sync())
    receive(relay, PARSE_COMPLETE + PARAMS + frame(p.ROW_DESCRIPTION, row_description(("x", 23), ("y", 23))))
    again, relay.again = relay.again, None
    relay.replaying = True
    to_server, _ = send(relay, fresh, b"".join(frame(t, b) for t, b in again))
    relay.replaying = False
    assert types(to_server) == "BES" and bind_statements(to_server) == [SERVER_NAME_PREFIX + "stale"]
    missing = m.error_response("ERROR", "26000", f'prepared statement "{SERVER_NAME_PREFIX}stale" does not exist')
    out = receive(relay, missing + m.ready_for_query())
    fields = m.decode_fields(messages(out)[0][1])
    assert (fields["C"], fields["M"], fields["R"]) == ("0A000", "cached plan must not change result type", "RevalidateCachedQuery")
    assert types(out) == "EZ"
    # Every Bind and Describe of it fails so (the fast path's too) until the client prepares it anew.
    assert "s1" in relay.doomed
    to_server, _ = send(relay, fresh, m.describe("S", "s1") + m.sync())
    assert messages(to_server)[0] == (p.DESCRIBE, b"S" + SERVER_NAME_PREFIX.encode() + b"stale\x00")
    out = receive(relay, missing + m.ready_for_query())
    assert m.decode_fields(messages(out)[0][1])["C"] == "0A000"
    to_server, _ = send(relay, fresh, m.close("S", "s1") + m.parse("s1", "SELECT * FROM t") + m.sync())
    assert not relay.doomed and types(to_server) == "CPS"  # (the copy it held goes first)
    receive(relay, CLOSE_COMPLETE + PARSE_COMPLETE + m.ready_for_query())
    to_server, _ = send(relay, fresh, m.bind("", "s1") + m.execute() + m.sync())
    assert types(to_server) == "BES" and bind_statements(to_server) == [shared_name(relay)]


def test_a_fresh_copy_that_fails_to_prepare_lets_the_held_run_go_to_be_skipped():
    relay, _ = described()
    fresh = FakeServer()
    send(relay, fresh, m.bind("", "s1") + m.execute() + m.sync())
    gone = m.error_response("ERROR", "42P01", 'relation "t" does not exist')
    out = receive(relay, gone)
    assert out == gone and relay.holding is None and relay.again is not None
    relay.again = None


def test_a_described_run_is_not_held():
    relay, _ = described()
    to_server, _ = send(relay, FakeServer(), m.bind("", "s1") + m.describe("P", "") + m.execute() + m.sync())
    assert types(to_server) == "PBDES" and relay.holding is None


def test_a_portal_description_tells_the_statement_s_shape_too():
    """pgjdbc describes the portal of its first run, then runs without describing."""
    relay, server = Relay(), FakeServer()
    send(relay, server, m.parse("s1", "SELECT * FROM t") + m.bind("", "s1") + m.describe("P", "") + m.execute() + m.sync())
    receive(relay, PARSE_COMPLETE + BIND_COMPLETE + frame(p.ROW_DESCRIPTION, ONE_COLUMN) + m.command_complete("SELECT 0") + m.ready_for_query())
    assert relay.shapes["s1"][1] == (((b"x", (23).to_bytes(4, "big"), b"\xff\xff\xff\xff"),))
    to_server, _ = send(relay, FakeServer(), m.bind("", "s1") + m.execute() + m.sync())
    assert types(to_server) == "PDH"  # checked before it runs on a fresh copy
    # A later unnamed statement's portal tells nothing about s1.
    relay.forget_server()
    send(relay, server, m.parse("", "SELECT 1, 2") + m.bind("", "") + m.describe("P", "") + m.execute() + m.sync())
    receive(relay, PARSE_COMPLETE + BIND_COMPLETE + frame(p.ROW_DESCRIPTION, row_description(("a", 23), ("b", 23))) + m.command_complete("SELECT 1") + m.ready_for_query())
    assert relay.shapes["s1"][1] == (((b"x", (23).to_bytes(4, "big"), b"\xff\xff\xff\xff"),))


def test_what_is_kept_about_a_statement_goes_with_it():
    relay, server = described()
    assert "s1" in relay.shapes
    send(relay, server, m.close("S", "s1"))
    assert "s1" not in relay.shapes and "s1" not in relay.statements
    relay, server = described()
    relay.doomed = {"s1"}
    relay.drop()
    assert relay.statements == {} and relay.shapes is None and relay.doomed is None
