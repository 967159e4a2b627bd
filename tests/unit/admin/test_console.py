"""The pgbalance admin console: login hook, SHOW result sets (simple and extended protocol), actions, errors."""

import struct

import pytest
from twisted.internet import defer
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
    # The console is PgBouncer's pseudo-database, under whichever name it was reached.
    assert by_id[session.id]["database"] == "pgbouncer" and by_id[session.id]["session_state"] == "admin"
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


def test_show_config_writes_values_as_pgbouncer_does(proxy):
    """Sorted by key; booleans 1/0 and whole seconds without a fraction, as PgBouncer's SHOW CONFIG."""
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW CONFIG"))
    names, rows = result_rows(transport.value())
    keys = [r[0] for r in rows]
    assert keys == sorted(keys)
    config = {r[0]: r[1:] for r in rows}
    assert config["server_idle_timeout"][:2] == ["600", "600"] and config["log_connections"][:2] == ["1", "1"]
    assert config["auto_promote"][0] == "0"


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


# What a real PgBouncer 1.18.0 sends (psycopg ClientCursor against its admin console): every column's
# name and type, in order. T text, I4 int4, I8 int8, N numeric, B bytea.
PGBOUNCER_1_18 = {
    "VERSION": "version:T",
    "LISTS": "list:T items:I4",
    "DATABASES": "name:T host:T port:I4 database:T force_user:T pool_size:I4 min_pool_size:I4 reserve_pool:I4 pool_mode:T max_connections:I4 current_connections:I4 paused:I4 disabled:I4",
    "USERS": "name:T pool_mode:T",
    "STATS": "database:T total_xact_count:N total_query_count:N total_received:N total_sent:N total_xact_time:N total_query_time:N total_wait_time:N avg_xact_count:N avg_query_count:N avg_recv:N avg_sent:N avg_xact_time:N avg_query_time:N avg_wait_time:N",
    "STATS_TOTALS": "database:T xact_count:N query_count:N bytes_received:N bytes_sent:N xact_time:N query_time:N wait_time:N",
    "STATS_AVERAGES": "database:T xact_count:N query_count:N bytes_received:N bytes_sent:N xact_time:N query_time:N wait_time:N",
    "POOLS": "database:T user:T cl_active:I4 cl_waiting:I4 cl_active_cancel_req:I4 cl_waiting_cancel_req:I4 sv_active:I4 sv_active_cancel:I4 sv_being_canceled:I4 sv_idle:I4 sv_used:I4 sv_tested:I4 sv_login:I4 maxwait:I4 maxwait_us:I4 pool_mode:T",
    "CLIENTS": "type:T user:T database:T state:T addr:T port:I4 local_addr:T local_port:I4 connect_time:T request_time:T wait:I4 wait_us:I4 close_needed:I4 ptr:T link:T remote_pid:I4 tls:T application_name:T",
    "SERVERS": "type:T user:T database:T state:T addr:T port:I4 local_addr:T local_port:I4 connect_time:T request_time:T wait:I4 wait_us:I4 close_needed:I4 ptr:T link:T remote_pid:I4 tls:T application_name:T",
    "CONFIG": "key:T value:T default:T changeable:T",
    "MEM": "name:T size:I4 used:I4 free:I4 memtotal:I4",
    "FDS": "fd:I4 task:T user:T database:T addr:T port:I4 cancel:I8 link:I4 client_encoding:T std_strings:T datestyle:T timezone:T password:T scram_client_key:B scram_server_key:B",
}
_TYPE_OIDS = {"T": 25, "I4": 23, "I8": 20, "N": 1700, "B": 17}


@pytest.mark.parametrize("what", sorted(PGBOUNCER_1_18))
def test_pgbouncer_views_have_pgbouncer_columns_and_types_first(proxy, what):
    client(proxy)
    wanted = [(name, _TYPE_OIDS[kind]) for name, kind in (c.split(":") for c in PGBOUNCER_1_18[what].split())]
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query(f"show {what.lower()};"))
    desc = next(body for t, body in messages(transport.value()) if t == p.ROW_DESCRIPTION)
    got = [(name, oid) for name, oid, _ in row_description(desc)]
    assert got[: len(wanted)] == wanted  # (pgtwist's own columns may follow, never come between)


def test_the_console_is_pgbouncers_pseudo_database_in_its_views(proxy):
    client(proxy)
    session, transport = client(proxy, user="admin", database="pgbouncer")
    other, _ = admin_session(proxy)  # (reached as pgbalance: the same console)

    def show(what):
        transport.clear()
        session.got_data(m.query(f"SHOW {what}"))
        names, rows = result_rows(transport.value())
        return [dict(zip(names, r)) for r in rows]

    (admin_db,) = [r for r in show("DATABASES") if r["name"] == "pgbouncer"]
    assert admin_db == admin_db | {"host": None, "port": "6432", "database": "pgbouncer", "force_user": "pgbouncer",
                                   "pool_size": "2", "pool_mode": "statement", "current_connections": "0",
                                   "current_client_connections": "2"}
    assert [r["name"] for r in show("DATABASES")] == ["appdb", "pgbouncer"]  # sorted, as PgBouncer's lists
    pools = show("POOLS")
    assert [(r["database"], r["user"]) for r in pools] == [("appdb", "app"), ("pgbouncer", "pgbouncer")]
    assert (pools[1]["cl_active"], pools[1]["sv_active"], pools[1]["pool_mode"]) == ("2", "0", "statement")
    assert [r["name"] for r in show("USERS")] == ["admin", "app", "pgbouncer"]
    assert [r["database"] for r in show("STATS")] == ["appdb", "pgbouncer"]
    assert [r["database"] for r in show("STATS_TOTALS")] == ["appdb", "pgbouncer"]
    assert [r["database"] for r in show("STATS_AVERAGES")] == ["appdb", "pgbouncer"]
    lists = {r["list"]: int(r["items"]) for r in show("LISTS")}
    assert (lists["databases"], lists["users"], lists["pools"], lists["used_clients"]) == (2, 3, 2, 3)
    assert (lists["free_clients"], lists["free_servers"], lists["used_servers"]) == (0, 0, 1)
    clients = {r["id"]: r for r in show("CLIENTS")}
    assert clients[session.id]["database"] == clients[other.id]["database"] == "pgbouncer"
    assert [r["task"] for r in show("FDS")] == ["client", "server"]  # (not the console's own sockets)


def test_databases_pool_mode_is_the_databases_own(proxy):
    """PgBouncer's SHOW DATABASES pool_mode: the database's pool_mode=, NULL when it has none (the
    global one applies then); SHOW POOLS says the mode each pool runs in."""
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW DATABASES"))
    names, rows = result_rows(transport.value())
    assert dict(zip(names, rows[0]))["pool_mode"] is None
    proxy = TestProxy(make_config(databases={"appdb": {"nodes": ["db1:5432"], "pool_mode": "transaction"}}))
    client(proxy)
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW DATABASES; SHOW POOLS"))
    names, rows = result_rows(transport.value())
    assert dict(zip(names, rows[0]))["pool_mode"] == "transaction"


def test_pgbouncer_values_where_pgtwist_has_none(proxy):
    """'' (not NULL) for link, tls and application_name, as PgBouncer sends; an idle client is
    'active', as PgBouncer's lists have it; FDS links are 0 when there is no link."""
    app, _ = client(proxy)
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW CLIENTS"))
    names, rows = result_rows(transport.value())
    clients = {r[names.index("id")]: dict(zip(names, r)) for r in rows}
    admin = clients[session.id]
    assert (admin["state"], admin["link"], admin["tls"], admin["application_name"]) == ("active", "", "", "")
    psql, psql_transport = client(proxy, user="admin", database="pgbouncer", application_name="psql")
    psql_transport.clear()
    psql.got_data(m.query("SHOW CLIENTS"))
    names, rows = result_rows(psql_transport.value())
    assert {r[names.index("id")]: r[names.index("application_name")] for r in rows}[psql.id] == "psql"
    assert admin["request_time"] is not None and admin["wait"] == "0"
    transport.clear()
    session.got_data(m.query("SHOW SERVERS"))
    names, rows = result_rows(transport.value())
    server = dict(zip(names, rows[0]))
    assert (server["state"], server["link"], server["tls"]) == ("active", app.id, "")
    transport.clear()
    session.got_data(m.query("SHOW FDS"))
    names, rows = result_rows(transport.value())
    fds = [dict(zip(names, r)) for r in rows]
    assert all(r["cancel"] is None and r["password"] is None and r["scram_client_key"] is None for r in fds)


def test_a_waiting_client_says_how_long_it_has_waited():
    """PgBouncer's wait / wait_us: how long a waiting client has been in its pool's queue."""
    proxy = TestProxy(make_config(databases={"appdb": {"nodes": ["db1:5432"], "pool_size": 1}}))
    first, _ = client(proxy)
    second, _ = client(proxy)
    assert (first.state, second.state) == ("linked", "waiting")
    proxy.reactor.advance(2.25)
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW CLIENTS; SHOW POOLS"))
    names, rows = result_rows(transport.value())
    clients = {r[names.index("id")]: dict(zip(names, r)) for r in rows}
    assert (clients[second.id]["state"], clients[second.id]["wait"], clients[second.id]["wait_us"]) == ("waiting", "2", "250000")
    assert (clients[first.id]["wait"], clients[first.id]["link"]) == ("0", "s1")


def test_int4_and_numeric_columns_in_binary(proxy):
    """asyncpg and other binary readers decode PgBouncer's int4 and numeric columns."""
    client(proxy)
    session, transport = admin_session(proxy)
    for sql, column, decode in (("SHOW POOLS", "cl_active", lambda v: struct.unpack("!i", v)[0]),
                                ("SHOW STATS_TOTALS", "xact_count", lambda v: v)):
        transport.clear()
        session.got_data(m.parse("", sql) + m.bind("", "", result_formats=[1]) + m.describe("P", "") + m.execute("") + m.sync())
        (_, desc), (_, row), *_ = [x for x in messages(transport.value()) if x[0] in (p.ROW_DESCRIPTION, p.DATA_ROW)]
        values = dict(zip([c[0] for c in row_description(desc)], m.decode_data_row(row)))
        if column == "cl_active":
            assert decode(values[column]) == 1
        else:  # numeric 0: no digits, weight 0, positive, scale 0
            assert values[column] == b"\x00\x00\x00\x00\x00\x00\x00\x00"


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


def test_set_pool_size_reaches_the_databases_that_inherit_it_only():
    # SET pool_size changed the top-level value, which every database had copied at load:
    # no pool changed size. Now the databases without a pool_size of their own take it
    # (PgBouncer's default_pool_size), and their pools shrink or grow at once.
    config = make_config(
        databases={
            "appdb": {"dbname": "postgres", "nodes": ["db1:5432"], "pool_size": 2},
            "other": {"dbname": "postgres", "nodes": ["db1:5432"]},
        },
        pool_size=5,
        max_db_connections=9,
    )
    proxy = TestProxy(config)
    assert proxy.config.databases["other"].inherited == {"pool_size", "max_db_connections", "reserve_pool_size"}
    assert proxy.config.databases["appdb"].inherited == {"max_db_connections", "reserve_pool_size"}
    actions.set_setting(proxy, "pool_size", "3")
    actions.set_setting(proxy, "max_db_connections", "4")
    dbs = proxy.config.databases
    assert (dbs["appdb"].pool_size, dbs["other"].pool_size) == (2, 3)
    assert (dbs["appdb"].max_db_connections, dbs["other"].max_db_connections) == (4, 4)
    shown = {row[0] for row in console.run(proxy, "SHOW CONFIG").rows}
    assert not any("inherited" in key for key in shown)


def test_set_pool_size_below_one_is_refused():
    proxy = TestProxy(make_config())
    with pytest.raises(actions.ActionError):
        actions.set_setting(proxy, "pool_size", "0")
    assert proxy.config.databases["appdb"].pool_size == 2


# -- what a restarted worker takes on (workers = N) ----------------------------------------------------


def test_the_consoles_state_is_what_it_paused_disabled_and_set_and_another_proxy_takes_it_on():
    # A worker restarted after a death started from the file: it served what the operator had
    # paused or disabled on every worker, with settings SET on the others only.
    import json

    live = TestProxy(make_config())
    session, transport = admin_session(live)
    transport.clear()
    session.got_data(m.query(
        "PAUSE appdb; DISABLE appdb; SET query_wait_timeout = 7; SET client_encoding = 'UTF8'; SET pool_size = 3; SET query_wait_timeout = '9'"
    ))
    assert types(transport.value()) == "CCCCCCZ"
    state = json.loads(json.dumps(actions.console_state(live)))  # (what it is on the wire)
    # (SET as typed, the latest last; client_encoding and the like a driver sets are not pgtwist's)
    assert state == {"paused": ["appdb"], "disabled": ["appdb"], "set": {"pool_size": "3", "query_wait_timeout": "'9'"}}

    restarted = TestProxy(make_config())
    taken, skipped = actions.take_state(restarted, state)
    assert taken == ["PAUSE appdb", "DISABLE appdb", "SET pool_size = 3", "SET query_wait_timeout = '9'"] and skipped == []
    assert actions.console_state(restarted) == state  # (and it passes them on, should another restart)
    assert restarted.config.query_wait_timeout == 9 and restarted.config.databases["appdb"].pool_size == 2  # (its own)
    waiting, _ = client(restarted)
    assert waiting.state == "closed"  # disabled
    restarted.disabled.clear()
    waiting, _ = client(restarted)
    assert waiting.state == "waiting" and next(iter(restarted.pools.values())).paused


def test_a_state_the_file_no_longer_allows_is_skipped_and_said():
    # The others have not reloaded a file that dropped a database (or that SET may no longer change).
    proxy = TestProxy(make_config())
    state = {"paused": ["*", "gone"], "disabled": ["gone"], "set": {"pool_size": "0", "listen": "'x'", "query_wait_timeout": "4"}}
    taken, skipped = actions.take_state(proxy, state)
    assert taken == ["PAUSE *", "SET query_wait_timeout = 4"]
    assert skipped == [
        'PAUSE gone: no database "gone"',
        'DISABLE gone: no database "gone"',
        "SET pool_size = 0: invalid value for pool_size: at least 1",
        "SET listen = 'x': not a setting SET changes",
    ]
    assert proxy.paused == {"*"} and proxy.overrides == {"query_wait_timeout": "4"}


def test_an_answer_at_once_after_a_wait_does_not_overtake_the_answers_before_it(proxy):
    # PAUSE of an unused pool is done at once (its wait has fired): its CommandComplete still comes
    # after SHOW VERSION's rows in the same Query, and after the extended protocol's ParseComplete.
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW VERSION; PAUSE"))
    assert types(transport.value()) == "TDCCZ"
    session.got_data(m.query("RESUME"))
    transport.clear()
    session.got_data(m.parse("", "PAUSE") + m.bind("", "") + m.describe("P", "") + m.execute("") + m.sync())
    assert types(transport.value()) == "12nCZ"


class PendingLink:
    """workers = N as the console sees it: the other workers answer when the test says so."""

    def __init__(self):
        self.asked: list = []

    def tag(self, secret):
        return secret

    def every_worker(self, what, rows):
        self.asked.append(defer.Deferred())
        return self.asked[-1].addCallback(lambda missing: ([dict(r, worker=0) for r in rows], missing))

    def everywhere(self, action, *parts):
        self.asked.append(defer.Deferred())
        return self.asked[-1]

    def kill_elsewhere(self, client_id):
        self.asked.append(defer.Deferred())
        return self.asked[-1]


def test_under_workers_the_console_answers_once_the_others_have_and_serves_meanwhile(proxy):
    link = proxy.worker = PendingLink()
    session, transport = admin_session(proxy)
    transport.clear()
    # Simple and extended protocol: nothing is answered (and nothing after it run) until the
    # other workers' rows are in; the reactor is not held meanwhile, so clients are served.
    session.got_data(m.query("SHOW SERVERS; SHOW VERSION") + m.query("SET query_wait_timeout = 9"))
    assert transport.value() == b"" and len(link.asked) == 1
    app, app_transport = client(proxy)
    assert app.state == "linked"
    link.asked[0].callback([1])
    assert types(transport.value()) == "TNCTDCZ" and len(link.asked) == 2  # (N: the notice) then SET, asked too
    assert "worker 1 did not answer: its rows are missing" in transport.value().decode("latin-1")
    assert proxy.config.query_wait_timeout == 9  # (done here at once; the answer waits for the others)
    link.asked[1].callback([])
    assert types(transport.value()).endswith("CZ")
    transport.clear()
    session.got_data(m.parse("", "SHOW SERVERS") + m.bind("", "") + m.describe("P", "") + m.execute("") + m.sync())
    assert types(transport.value()) == "12T"
    link.asked[2].callback([])
    assert types(transport.value()) == "12TDCZ"  # (the app client's server connection, a row now)


def test_under_workers_a_client_no_worker_knows_is_an_error_once_they_have_said_so(proxy):
    link = proxy.worker = PendingLink()
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("KILL w1.c9; SHOW VERSION"))
    assert transport.value() == b""
    link.asked[0].callback(False)
    assert types(transport.value()) == "EZ" and fields_of(transport.value())["C"] == "42704"
    transport.clear()
    session.got_data(m.parse("", "KILL w1.c9") + m.bind("", "") + m.execute("") + m.sync() + m.query("SHOW VERSION"))
    link.asked[1].callback(True)
    assert types(transport.value()) == "12CZTDCZ"
    transport.clear()
    session.got_data(m.query("KILL w1.c9"))
    link.asked[2].callback(None)  # (worker 1 did not answer)
    fields = fields_of(transport.value())
    assert fields["C"] == "58000" and fields["M"] == "worker 1 did not answer: client w1.c9 not killed"


class AnsweredLink(PendingLink):
    """The other workers' answers are in at once (a client id of no live worker, say)."""

    def kill_elsewhere(self, client_id):
        return defer.succeed(False)


def test_bad_bytes_sent_while_the_others_are_asked_close_the_console_as_ever(proxy):
    # (Review.) Bytes the console reads once a held answer is in are the session's to refuse.
    link = proxy.worker = PendingLink()
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW SERVERS") + m.query("SHOW VERSION") + b"Q" + struct.pack("!I", 5) + b"x")  # (no NUL)
    assert transport.value() == b""
    link.asked[0].callback([])
    out = transport.value()
    assert types(out) == "TCZTDCZE" and fields_of(out)["C"] == "08P01" and transport.disconnecting


def test_many_commands_answered_at_once_in_one_read_do_not_recurse(proxy):
    # (Review.) A wait that has fired already is answered in line, not through a call per command.
    proxy.worker = AnsweredLink()
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data((m.parse("", "KILL w1.c9") + m.bind("", "") + m.execute("") + m.sync()) * 2000)
    assert types(transport.value()) == "12EZ" * 2000 and not transport.disconnecting
    transport.clear()
    session.got_data(m.query(";".join(["KILL w1.c9"] * 3)) + m.query("SHOW VERSION"))
    assert types(transport.value()) == "EZTDCZ"  # (the statements after an error are not run)


def test_nothing_after_terminate_is_run(proxy):
    proxy.worker = AnsweredLink()
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.parse("", "KILL w1.c9") + m.bind("", "") + m.execute("") + m.sync() + m.terminate() + m.query("PAUSE"))
    assert types(transport.value()) == "12EZ" and not proxy.paused


def test_an_admin_who_leaves_calls_off_what_the_console_waits_for(proxy):
    # (Review.) The other workers' requests are hung up on (their waits end with them).
    link = proxy.worker = PendingLink()
    session, transport = admin_session(proxy)
    transport.clear()
    session.got_data(m.query("SHOW SERVERS"))
    session.connection_lost(Failure(ConnectionDone()))
    assert link.asked[0].called and transport.value() == b""  # (cancelled; nothing answered)
