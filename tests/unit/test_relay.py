"""Relay: client statement names over shared server statements, injected and synthesized messages, in order."""

from pgtwist.relay import Relay
from pgtwist.statements import SERVER_NAME_PREFIX, ServerStatements, Statement, parse_body
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
    for msg_type, body in messages(data):
        relay.client_message(msg_type, body, server, to_server, to_client)
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


def prepared(sql=SQL, name="s1", server=None):
    """A relay whose client prepared *name* on *server* (answered): (relay, server)."""
    relay, server = Relay(), server or FakeServer()
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


def test_a_second_client_reuses_the_server_statement():
    server = FakeServer()
    prepared(server=server)
    other = Relay()
    # Something unnamed in front: the synthesized ParseComplete must wait for its replies.
    batch = m.parse("", "SELECT 2") + m.bind("", "") + m.execute() + m.parse("mine", SQL) + m.bind("", "mine", [b"2"]) + m.execute() + m.sync()
    to_server, to_client = send(other, server, batch)
    assert to_client == b""
    assert parse_names(to_server) == [""]  # no second Parse of the shared statement
    assert bind_statements(to_server) == ["", SHARED]
    reply = PARSE_COMPLETE + EXTENDED_REPLY + EXTENDED_REPLY + m.ready_for_query()
    out = receive(other, reply)
    assert types(out) == "12DC" + "1" + "2DC" + "Z"
    assert out == PARSE_COMPLETE + EXTENDED_REPLY + PARSE_COMPLETE + EXTENDED_REPLY + m.ready_for_query()
    assert other.idle


def test_parse_of_a_known_statement_with_nothing_in_flight_is_answered_at_once():
    server = FakeServer()
    prepared(server=server)
    other = Relay()
    to_server, to_client = send(other, server, m.parse("mine", SQL))
    assert to_server == b"" and to_client == PARSE_COMPLETE
    assert other.statements["mine"].server_name == SHARED


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
        + m.parse("s2", SQL)  # shared already: answered by the proxy, queued
        + m.parse("s3", "SELECT 'new'")  # goes to the server, recorded there
        + m.close("S", "old")  # answered by the proxy, queued
        + m.sync()
    )
    to_server, to_client = send(relay, server, batch)
    assert to_client == b""
    assert parse_names(to_server) == ["", new_shared]
    assert new_shared in server.statements and set(relay.statements) == {"s2", "s3"}
    error = m.error_response("ERROR", "42601", 'syntax error at or near "SELEKT"')
    out = receive(relay, error + m.ready_for_query())
    assert out == error + m.ready_for_query()  # no ParseComplete, no CloseComplete
    assert set(relay.statements) == {"old"}  # s2 and s3 undone, the Close skipped
    assert new_shared not in server.statements and SHARED in server.statements
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
