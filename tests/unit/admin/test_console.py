"""The pgbalance admin console: login hook, SHOW result sets (simple and extended protocol), actions, errors."""

import struct

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from pgtwist.admin import actions, bouncer, console
from pgtwist.service.reload import ReloadOutcome
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.admin_support import TestProxy, client, make_config, messages, result_rows, row_description, types


@pytest.fixture
def proxy():
    return TestProxy(make_config())


def admin_session(proxy):
    session, transport = client(proxy, user="admin", database="pgbalance")
    return session, transport


def fields_of(data: bytes) -> dict:
    for msg_type, body in messages(data):
        if msg_type == p.ERROR_RESPONSE:
            return m.decode_fields(body)
    raise AssertionError(f"no ErrorResponse in {types(data)}")


def test_admin_login_gets_parameters_key_and_ready_without_a_pool(proxy):
    session, transport = admin_session(proxy)
    out = transport.value()
    assert session.state == "admin"
    assert types(out).endswith("SSSSSSSSSSSKZ")
    params = dict(m.decode_parameter_status(b) for t, b in messages(out) if t == p.PARAMETER_STATUS)
    assert params["server_version"].startswith("16") and params["session_authorization"] == "admin"
    assert proxy.pools == {} and proxy.servers == []  # no node involved
    assert session.process_id in proxy.cancel_keys


def test_other_users_are_refused_with_42501(proxy):
    session, transport = client(proxy, user="app", database="pgbalance")
    fields = fields_of(transport.value())
    assert (fields["S"], fields["C"]) == ("FATAL", "42501")
    assert "pgbalance" in fields["M"] and transport.disconnecting
    assert proxy.counters.errors == {"42501": 1}


def test_no_admin_users_configured_refuses_everyone():
    proxy = TestProxy(make_config(admin={"users": []}))
    _, transport = client(proxy, user="admin", database="pgbalance")
    assert fields_of(transport.value())["C"] == "42501"


def test_reserved_database_name_is_a_config_error():
    from pgtwist.config import ConfigError

    with pytest.raises(ConfigError, match="databases.pgbalance: this name is reserved"):
        make_config(databases={"pgbalance": {"nodes": ["db1:5432"]}})


@pytest.mark.parametrize("command", ["CLIENTS", "SERVERS", "POOLS", "NODES", "STATS", "CONFIG", "PREPARED", "HELP"])
def test_show_commands_answer_a_result_set(proxy, command):
    client(proxy)  # one app client, linked to a server
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query(f"show {command.lower()};"))
    out = transport.value()
    assert types(out)[0] == "T" and types(out).endswith("CZ")
    names, rows = result_rows(out)
    assert names == [name for name, _ in console.describe(f"SHOW {command}")]
    tag = [b for t, b in messages(out) if t == p.COMMAND_COMPLETE][0]
    assert tag == f"SHOW {len(rows)}\x00".encode()
    if command != "PREPARED":  # (session pooling keeps no statements)
        assert rows


def test_show_clients_and_pools_show_live_state(proxy):
    app, _ = client(proxy)
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW CLIENTS; SHOW POOLS"))
    out = transport.value()
    assert types(out).count("T") == 2 and types(out).endswith("Z")
    names, rows = result_rows(out)
    by_id = {r[names.index("id")]: dict(zip(names, r)) for r in rows}
    assert by_id[app.id]["state"] == "active" and by_id[app.id]["link"] == "s1"  # PgBouncer's words
    assert by_id[app.id]["session_state"] == "linked"  # ours
    assert by_id[session.id]["database"] == "pgbalance" and by_id[session.id]["session_state"] == "admin"
    second = out[out.index(b"SHOW 2\x00") + len(b"SHOW 2\x00") :]
    pool_names, pool_rows = result_rows(second)
    pool = dict(zip(pool_names, pool_rows[0]))
    assert (pool["database"], pool["user"], pool["pool_size"], pool["sv_active"], pool["cl_active"], pool["paused"]) == (
        "appdb", "app", "2", "1", "1", "f"
    )
    assert pool_names[:16] == [name for name, _ in bouncer.POOLS_COLUMNS[:16]]


def test_show_config_never_shows_passwords(proxy):
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW CONFIG"))
    out = transport.value()
    assert b"adminpw" not in out and b"pw\x00" not in out
    names, rows = result_rows(out)
    config = {r[0]: r[1:] for r in rows}
    # PgBouncer's columns: key, value, default, changeable (pgbouncer_exporter wants 3 or 4 of them)
    assert names == ["key", "value", "default", "changeable"]
    assert config["users.app.password"] == ["********", None, "yes"]
    assert config["listen"][0] == "127.0.0.1:6432" and config["listen"][2] == "no"
    assert config["databases.appdb.pool_size"] == ["2", None, "yes"]


def test_unknown_command_is_an_error_and_the_session_goes_on(proxy):
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW NOTHING; SHOW STATS"))
    out = transport.value()
    assert types(out) == "EZ"  # the error stops the rest of the query string, as PostgreSQL does
    assert fields_of(out)["C"] == "42601"
    transport.clear()
    session.got_data(m.query("SHOW STATS"))
    assert types(transport.value()).startswith("T")


def test_empty_query_and_set_are_accepted(proxy):
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query(" ; ") + m.query("SET extra_float_digits = 3"))
    assert types(transport.value()) == "IZCZ"


def test_extended_protocol_with_binary_results(proxy):
    client(proxy)
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(
        m.parse("", "SHOW NODE_POOLS")
        + m.bind("", "", result_formats=[1])
        + m.describe("P", "")
        + m.execute("")
        + m.sync()
    )
    out = transport.value()
    assert types(out) == "12TDCZ"
    (_, desc), (_, row) = [x for x in messages(out) if x[0] in (p.ROW_DESCRIPTION, p.DATA_ROW)]
    columns = row_description(desc)
    assert all(fmt == 1 for _, _, fmt in columns)
    values = dict(zip([c[0] for c in columns], m.decode_data_row(row)))
    assert struct.unpack("!q", values["size"])[0] == 2
    assert values["paused"] == b"\x00" and values["database"] == b"appdb"
    oids = {name: oid for name, oid, _ in columns}
    assert (oids["database"], oids["size"], oids["paused"], oids["wait_s"]) == (m.OID_TEXT, m.OID_INT8, m.OID_BOOL, m.OID_FLOAT8)


def test_extended_protocol_describe_statement_then_execute(proxy):
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.parse("s1", "SHOW STATS") + m.describe("S", "s1") + m.sync())
    assert types(transport.value()) == "1tTZ"
    transport.clear()
    session.got_data(m.bind("p", "s1") + m.execute("p") + m.close("S", "s1") + m.sync())
    out = transport.value()
    assert types(out)[:2] == "2D" and types(out).endswith("C3Z")


def test_extended_protocol_error_skips_to_sync(proxy):
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.parse("", "BOGUS") + m.bind("", "") + m.describe("P", "") + m.execute("") + m.sync() + m.query("SHOW HELP"))
    out = transport.value()
    assert types(out).startswith("12nEZT")  # parse/bind fine, execute fails, sync, then the next query works
    assert fields_of(out)["C"] == "42601"


def test_pause_resume_and_kill(proxy):
    app, app_transport = client(proxy)
    session, transport = admin_session(proxy)
    (pool,) = proxy.pools.values()
    transport.clear()
    session.got_data(m.query("PAUSE appdb"))
    # PgBouncer's PAUSE: no answer while a server connection is in use (session pooling: until its client leaves).
    assert transport.value() == b"" and pool.paused
    session.got_data(m.query("SHOW VERSION"))
    proxy.reactor.advance(actions.POLL * 3)
    assert transport.value() == b""  # (what came after PAUSE waits for it)
    proxy.servers[0].connection_lost(Failure(ConnectionDone()))
    proxy.reactor.advance(actions.POLL)
    assert types(transport.value()) == "CZTDCZ" and pool.paused and not pool.busy and not pool.idle
    transport.clear()
    session.got_data(m.query("PAUSE nosuchdb"))
    assert fields_of(transport.value())["C"] == "3D000"
    # A client arriving while paused waits.
    waiting, waiting_transport = client(proxy)
    assert waiting.state == "waiting"
    transport.clear()
    session.got_data(m.query("RESUME"))
    assert types(transport.value()) == "CZ" and not pool.paused
    assert waiting.state == "linked"
    transport.clear()
    session.got_data(m.query(f"KILL {waiting.id}"))
    assert types(transport.value()) == "CZ"
    assert fields_of(waiting_transport.value())["C"] == "57P01" and waiting_transport.disconnecting
    transport.clear()
    session.got_data(m.query("KILL c999"))
    assert fields_of(transport.value())["C"] == "42704"
    transport.clear()
    session.got_data(m.query(f"KILL {session.id}"))
    assert fields_of(transport.value())["C"] == "0A000"


def test_pause_of_an_unused_pool_answers_at_once_and_kill_db_drops_everyone(proxy):
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("PAUSE"))
    assert types(transport.value()) == "CZ"
    session.got_data(m.query("RESUME"))
    app, app_transport = client(proxy)
    transport.clear()
    session.got_data(m.query("KILL appdb"))
    assert types(transport.value()) == "CZ"
    assert fields_of(app_transport.value())["C"] == "57P01" and app_transport.disconnecting
    later, _ = client(proxy)
    assert later.state == "waiting"  # PgBouncer: a killed database waits for RESUME


def test_disable_enable_reconnect_wait_close_and_set(proxy):
    session, transport = admin_session(proxy)
    session.got_data(m.query("DISABLE appdb"))
    refused, refused_transport = client(proxy)
    assert fields_of(refused_transport.value())["C"] == "55000"
    session.got_data(m.query("ENABLE appdb"))
    app, _ = client(proxy)
    assert app.state == "linked"
    (pool,) = proxy.pools.values()
    conn = next(iter(pool.busy))
    transport.clear()
    session.got_data(m.query("RECONNECT appdb; WAIT_CLOSE appdb"))
    assert types(transport.value()) == "C" and conn.tainted  # WAIT_CLOSE waits for app's connection
    conn.connection_lost(Failure(ConnectionDone()))
    proxy.reactor.advance(actions.POLL)
    assert types(transport.value()) == "CCZ"
    transport.clear()
    session.got_data(m.query("SET query_wait_timeout = 7; SET client_encoding = 'UTF8'"))
    assert types(transport.value()) == "CCZ" and proxy.config.query_wait_timeout == 7
    transport.clear()
    session.got_data(m.query("SET listen = '0.0.0.0:1'"))
    assert fields_of(transport.value())["C"] == "55P02"
    transport.clear()
    session.got_data(m.query("SET query_wait_timeout = -3"))
    assert fields_of(transport.value())["C"] == "22023" and proxy.config.query_wait_timeout == 7


def test_pools_created_while_paused_start_paused(proxy):
    session, transport = admin_session(proxy)
    session.got_data(m.query("PAUSE"))
    waiting, _ = client(proxy)
    assert waiting.state == "waiting" and next(iter(proxy.pools.values())).paused
    session.got_data(m.query("RESUME appdb"))
    assert waiting.state == "waiting"  # PAUSE without a database paused them all: RESUME appdb is not enough
    session.got_data(m.query("RESUME"))
    assert waiting.state == "linked"


class FakeService:
    def __init__(self, outcome):
        self.outcome = outcome
        self.shutdowns = []

    def reload(self):
        return self.outcome

    def shutdown(self, graceful=True):
        self.shutdowns.append(graceful)


def test_reload_reports_errors_and_restart_keys(proxy):
    from pgtwist.config import ConfigDiff

    session, transport = admin_session(proxy)
    proxy.service = FakeService(ReloadOutcome(False, "/etc/x.toml", ("pool_size: bad", "listen: bad")))
    transport.clear()
    session.got_data(m.query("RELOAD"))
    fields = fields_of(transport.value())
    assert fields["C"] == "F0000" and "nothing changed" in fields["M"]
    assert fields["D"] == "pool_size: bad\nlisten: bad"
    proxy.service = FakeService(ReloadOutcome(True, "/etc/x.toml", changes=ConfigDiff(changed=("listen",), restart=("listen",))))
    transport.clear()
    session.got_data(m.query("RELOAD"))
    out = transport.value()
    assert types(out) == "NCZ"
    notice = m.decode_fields(messages(out)[0][1])
    assert "restart" in notice["M"] and "listen" in notice["M"]


def test_shutdown_is_scheduled_after_the_reply(proxy):
    session, transport = admin_session(proxy)
    service = proxy.service = FakeService(None)
    transport.clear()
    session.got_data(m.query("SHUTDOWN"))
    assert types(transport.value()) == "CZ" and service.shutdowns == []
    proxy.clock.advance(0)
    assert service.shutdowns == [True]


def test_actions_without_a_service_are_refused(proxy):
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("RELOAD"))
    assert fields_of(transport.value())["C"] == "0A000"


def test_terminate_closes_and_later_bytes_are_ignored(proxy):
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.terminate() + m.query("SHOW STATS"))
    assert transport.value() == b"" and transport.disconnecting


def test_startup_pipelined_with_a_query(proxy):
    from twisted.internet.testing import StringTransport

    transport = StringTransport(lenient=True)
    session = proxy.new_client(transport)
    session.got_data(m.startup_message({"user": "admin", "database": "pgbalance"}) + m.query("SHOW HELP"))
    assert types(transport.value()).endswith("KZT" + "D" * len(console.HELP) + "CZ")


def test_malformed_message_is_fatal_08p01(proxy):
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(b"Q\x00\x00\x00\x05x")  # no NUL terminator
    assert fields_of(transport.value())["C"] == "08P01" and transport.disconnecting


def test_pgbouncer_views_have_pgbouncer_columns_first(proxy):
    client(proxy)
    for what, columns in (
        ("VERSION", ["version"]),
        ("LISTS", ["list", "items"]),
        ("STATS", ["database", "total_xact_count", "total_query_count", "total_received", "total_sent",
                   "total_xact_time", "total_query_time", "total_wait_time", "avg_xact_count", "avg_query_count",
                   "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time"]),
        ("STATS_TOTALS", ["database", "xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time",
                          "query_time", "wait_time"]),
        ("DATABASES", ["name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
                       "reserve_pool", "pool_mode", "max_connections", "current_connections", "paused", "disabled"]),
        ("USERS", ["name", "pool_mode"]),
        ("MEM", ["name", "size", "used", "free", "memtotal"]),
        ("FDS", ["fd", "task", "user", "database", "addr", "port", "cancel", "link"]),
        ("SERVERS", ["type", "user", "database", "state", "addr", "port"]),
    ):
        session, transport = admin_session(proxy)
        transport.clear()
        session.got_data(m.query(f"show {what.lower()};"))
        names, rows = result_rows(transport.value())
        assert names[: len(columns)] == columns, what
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW STATS"))
    names, rows = result_rows(transport.value())
    assert [r[0] for r in rows] == ["appdb"]


def test_admin_console_answers_to_pgbouncer_too(proxy):
    session, transport = client(proxy, user="admin", database="pgbouncer")
    transport.clear()
    session.got_data(m.query("SHOW VERSION"))
    names, rows = result_rows(transport.value())
    assert names == ["version"] and rows[0][0].startswith("pgtwist ")


def test_a_resume_ends_a_waiting_pause_without_closing_more(proxy):
    app, _ = client(proxy)
    session, transport = admin_session(proxy)
    other, other_transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("PAUSE appdb"))
    assert transport.value() == b""
    other.got_data(m.query("RESUME appdb"))
    proxy.reactor.advance(actions.POLL)
    assert types(transport.value()) == "CZ"
    (pool,) = proxy.pools.values()
    assert not pool.paused and len(pool.busy) == 1 and app.state == "linked"
