"""Reload (read, validate, diff, apply), graceful drain, service signals and shutdown, JSON logs, tap wiring."""

import json
import signal

import pytest
from twisted.application import service as appservice
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from pgtwist import config as configmod
from pgtwist.service import drain, logs, reload, tap
from pgtwist.service.lifecycle import PgBalanceService
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.admin_support import TestProxy, client, messages, types


def play_nodes(svc):
    """The service's proxy opens server connections on StringTransports, as TestProxy does."""
    svc.proxy.servers = []
    svc.proxy.connect_server = TestProxy.connect_server.__get__(svc.proxy)

TEMPLATE = """
listen = "{listen}"
auth_type = "trust"
pool_size = {pool_size}
query_wait_timeout = 30
shutdown_timeout = 5
{extra}
[databases.appdb]
dbname = "postgres"
nodes = ["db1:5432"]
{databases}
[users.app]
password = "{password}"
"""


def write(path, listen="127.0.0.1:6432", pool_size=2, extra="", databases="", password="pw"):
    path.write_text(TEMPLATE.format(listen=listen, pool_size=pool_size, extra=extra, databases=databases, password=password))


@pytest.fixture
def setup(tmp_path):
    path = tmp_path / "pg.toml"
    write(path)
    proxy = TestProxy(configmod.load(path))
    return path, proxy


def errors_of(data: bytes) -> list[str]:
    return [m.decode_fields(b)["C"] for t, b in messages(data) if t == p.ERROR_RESPONSE]


def test_reload_applies_sizes_and_databases_and_keeps_restart_keys(setup):
    path, proxy = setup
    app, transport = client(proxy)
    server = app.server
    write(path, listen="127.0.0.1:7000", pool_size=5, databases='[databases.other]\nnodes = ["db2:5432"]\n')
    outcome = reload.reload_file(proxy)
    assert outcome.ok and outcome.restart == ("listen",)
    assert "pool_size" in outcome.changes.live and outcome.changes.databases_added == ("other",)
    assert str(proxy.config.listen) == "127.0.0.1:6432"  # until a restart
    (pool,) = proxy.pools.values()
    assert pool.size == 5
    assert app.state == "linked" and app.server is server and not transport.disconnecting  # untouched
    other, _ = client(proxy, database="other")
    assert other.state == "linked" and str(other.server.node) == "db2:5432"
    assert proxy.counters.reloads == 1


def test_reload_gives_waiting_clients_the_new_capacity(setup):
    path, proxy = setup
    write(path, pool_size=1)
    assert reload.reload_file(proxy).ok
    first, _ = client(proxy)
    second, _ = client(proxy)
    assert second.state == "waiting"
    write(path, pool_size=2)
    reload.reload_file(proxy)
    assert second.state == "linked"


def test_broken_file_changes_nothing(setup):
    path, proxy = setup
    before = proxy.config
    path.write_text('pool_size = 0\nlisten = "x:y"\n')
    outcome = reload.reload_file(proxy)
    assert not outcome.ok and len(outcome.errors) >= 3
    assert any(e.startswith("pool_size:") for e in outcome.errors)
    assert proxy.config is before and proxy.counters.reload_failures == 1
    path.write_text("not toml [")
    assert not reload.reload_file(proxy).ok and proxy.config is before


def test_a_reload_drops_what_set_changed_and_a_broken_file_keeps_it(setup):
    # SET lasts until the file is read again, in each worker: a worker restarted later must not
    # take a SET the others dropped at their reload (actions.console_state).
    from pgtwist.admin import actions

    path, proxy = setup
    actions.set_setting(proxy, "query_wait_timeout", "7")
    path.write_text("not toml [")
    assert not reload.reload_file(proxy).ok
    assert proxy.overrides == {"query_wait_timeout": "7"} and proxy.config.query_wait_timeout == 7
    write(path)
    assert reload.reload_file(proxy).ok
    assert proxy.overrides == {} and proxy.config.query_wait_timeout == 30


def test_removed_database_retires_its_pool(setup):
    path, proxy = setup
    write(path, databases='[databases.other]\nnodes = ["db2:5432"]\n')
    reload.reload_file(proxy)
    busy, busy_transport = client(proxy, database="other")
    idle, _ = client(proxy, database="other")
    idle.got_data(m.terminate())  # session pooling: its server is reset, then idle
    idle_server = proxy.servers[-1]
    idle_server.got_data(m.command_complete("DISCARD ALL") + m.ready_for_query())
    (pool,) = [pl for pl in proxy.pools.values() if pl.database.name == "other"]
    assert len(pool.idle) == 1
    write(path)  # "other" is gone
    assert reload.reload_file(proxy).changes.databases_removed == ("other",)
    assert pool.retired and pool in proxy.retired_pools and pool not in proxy.pools.values()
    assert idle_server.transport.disconnecting  # idle: closed now
    assert busy.state == "linked" and not busy_transport.disconnecting  # busy: finishes
    refused, t = client(proxy, database="other")
    assert errors_of(t.value()) == ["3D000"]
    busy.got_data(m.terminate())
    busy_server = busy.server or [s for s in proxy.servers if s.pool is pool and s is not idle_server][0]
    busy_server.got_data(m.command_complete("DISCARD ALL") + m.ready_for_query())
    for s in proxy.servers:
        if s.pool is pool and s.transport.disconnecting:
            s.connection_lost(None)
    proxy.maintain()
    assert pool not in proxy.retired_pools


def test_changed_password_forgets_the_pass_through_key(setup):
    path, proxy = setup
    proxy.client_keys["app"] = b"k" * 32
    old_credential = proxy.config.users["app"].credential
    write(path)  # same password: the parsed credential (and its salt) is kept
    reload.reload_file(proxy)
    assert proxy.config.users["app"].credential is old_credential and "app" in proxy.client_keys
    write(path, password="new")
    outcome = reload.reload_file(proxy)
    assert outcome.changes.users_changed == ("app",) and "app" not in proxy.client_keys
    assert proxy.lookup_user("app").plaintext == "new"


def test_reload_needs_a_file():
    proxy = TestProxy(configmod.from_dict({"auth_type": "trust", "databases": {"d": {"nodes": ["h:1"]}}}))
    outcome = reload.reload_file(proxy)
    assert not outcome.ok and "file" in outcome.errors[0]


# -- the service ------------------------------------------------------------------------------


@pytest.fixture
def svc(tmp_path, monkeypatch):
    from pgtwist.service import lifecycle as servicemod

    monkeypatch.setattr(servicemod, "raise_nofile_limit", lambda: 1024)
    path = tmp_path / "pg.toml"
    write(path)
    reactor = MemoryReactorClock()
    reactor.callFromThread = lambda f, *a, **kw: f(*a, **kw)  # (what a signal handler uses)
    svc = PgBalanceService(configmod.load(path), reactor, signals=True)
    play_nodes(svc)
    return svc


def test_service_reload_updates_its_config(svc, tmp_path):
    write(tmp_path / "pg.toml", pool_size=9)
    outcome = svc.reload()
    assert outcome.ok and svc.config is svc.proxy.config and svc.config.pool_size == 9


def test_signals_are_installed_when_running_and_restored_at_stop(svc, tmp_path):
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}
    svc.startService()
    assert svc.reactor.whenRunningHooks  # installed after the reactor's own handlers
    try:
        # Listening already, no handler yet: a SIGHUP now waits (its default action ends the process).
        assert signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        for hook, args, kwargs in svc.reactor.whenRunningHooks:
            hook(*args, **kwargs)
        assert signal.SIGHUP not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        on_hup = signal.getsignal(signal.SIGHUP)
        assert on_hup not in (previous[signal.SIGHUP], signal.SIG_DFL)
        write(tmp_path / "pg.toml", pool_size=7)
        on_hup(signal.SIGHUP, None)
        assert svc.config.pool_size == 7
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert svc._graceful and svc.reactor.hasStopped
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        results = []
        svc.stopService().addBoth(results.append)
    assert results == [None]
    assert {sig: signal.getsignal(sig) for sig in previous} == previous


def test_graceful_stop_drains_before_closing_pools(svc):
    svc.startService()
    busy, busy_t = client(svc.proxy)
    busy.got_data(m.query("BEGIN"))
    busy.server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    svc.shutdown(graceful=True)
    results = []
    svc.stopService().addBoth(results.append)
    assert not svc.accepting and svc.port is None
    svc.reactor.advance(4)
    assert not results and not busy_t.disconnecting  # shutdown_timeout = 5
    svc.shutdown(True)  # a second SIGTERM changes nothing
    busy.got_data(m.query("COMMIT"))
    busy.server.got_data(m.command_complete("COMMIT") + m.ready_for_query(p.TX_IDLE))
    assert errors_of(busy_t.value()) == ["57P01"]
    busy.connection_lost(None)
    svc.reactor.advance(drain.TICK)
    assert results == [None]


def test_plain_stop_is_fast(svc):
    svc.startService()
    busy, busy_t = client(svc.proxy)
    busy.got_data(m.query("BEGIN"))
    busy.server.got_data(m.command_complete("BEGIN") + m.ready_for_query(p.TX_IN_TRANSACTION))
    results = []
    svc.stopService().addBoth(results.append)
    svc.reactor.advance(drain.TICK)
    assert errors_of(busy_t.value()) == ["57P01"]


# -- logs and tap -------------------------------------------------------------------------------


def test_json_log_observer_writes_one_object_per_line(tmp_path):
    path = tmp_path / "pgtwist.log"
    observer = logs.json_observer(str(path))
    log = Logger(namespace="pgtwist.test", observer=observer)
    log.info("client {client} connected", client="c1")
    log.info("server {server} idle", server="s2")
    log.failure("it broke", Failure(ValueError("bad")), node="n1")
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["client"] == "c1" and first["logger"] == "pgtwist.test" and first["level"] == "info"
    assert first["msg"] == "client c1 connected" and first["ts"].endswith("Z")
    assert not [key for key in first if key.startswith("log_")]  # not Twisted's event dump
    third = json.loads(lines[2])
    assert third["level"] == "critical" and third["error"] == "bad" and third["node"] == "n1"


def test_log_level_filters_and_objects_never_reach_a_json_line(tmp_path):
    path = tmp_path / "pgtwist.log"
    observer = logs.filtered(logs.json_observer(str(path)), "warn")
    log = Logger(namespace="pgtwist.test", observer=observer)
    log.info("hidden")
    log.warn("shown {user}", user="u", config=object())
    (line,) = path.read_text().splitlines()
    event = json.loads(line)
    assert event["msg"] == "shown u" and event["user"] == "u" and "config" not in event


def test_with_log_format_sets_the_application_observer():
    inner = appservice.Service()
    assert logs.with_log_format(inner, "text", {"logfile": "-"}).observer is not None  # (log_level filters text too)
    wrapped = logs.with_log_format(inner, "json", {"logfile": "-"})
    application = appservice.Application("pgbalance")
    wrapped.setServiceParent(application)
    assert application.getComponent(ILogObserver) is wrapped.observer
    assert inner.parent is wrapped


def test_tap_json_logs_and_manhole_errors(tmp_path, capsys):
    path = tmp_path / "pg.toml"
    write(path, extra='log_format = "json"')
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    svc = tap.makeService(options, reactor=MemoryReactorClock())
    assert isinstance(svc, logs.WithLogObserver)
    (child,) = list(svc)
    assert isinstance(child, PgBalanceService) and not child.signals
    write(path, extra='[manhole]\nauthorized_keys = "missing"\n')
    with pytest.raises(SystemExit) as e:
        tap.makeService(options, reactor=MemoryReactorClock())
    assert e.value.code == 78
    assert "authorized_keys" in capsys.readouterr().err


def test_transaction_pooled_clients_follow_a_database_moved_by_reload(tmp_path):
    """A reload that changes a database's nodes reaches open sessions at their next transaction:
    their work goes where the database now lives, not to the node it left."""
    path = tmp_path / "pg.toml"
    write(path, extra='pool_mode = "transaction"')
    proxy = TestProxy(configmod.load(path))
    app, transport = client(proxy)
    app.got_data(m.query("SELECT 1"))
    proxy.servers[-1].got_data(m.command_complete("SELECT 1") + m.ready_for_query())
    assert str(proxy.servers[-1].node) == "db1:5432"
    path.write_text(path.read_text().replace('nodes = ["db1:5432"]', 'nodes = ["db2:5432"]'))
    outcome = reload.reload_file(proxy)
    assert outcome.ok
    transport.clear()
    app.got_data(m.query("SELECT 2"))
    server = app.server
    assert server is not None and str(server.node) == "db2:5432"
    assert app.database is proxy.config.databases["appdb"] and app.router is proxy.routers["appdb"]
    server.got_data(m.command_complete("SELECT 1") + m.ready_for_query())
    assert types(transport.value()).endswith("Z")
    assert all(str(pool.node) == "db2:5432" for pool in proxy.pools.values())


def test_changed_pool_mode_of_a_database_retires_its_pools(setup):
    path, proxy = setup
    app, transport = client(proxy)
    (pool,) = proxy.pools.values()
    path.write_text(path.read_text().replace('nodes = ["db1:5432"]', 'nodes = ["db1:5432"]\npool_mode = "transaction"'))
    outcome = reload.reload_file(proxy)
    assert outcome.ok and "databases.appdb.pool_mode" in outcome.changes.live
    assert pool.retired and pool not in proxy.pools.values()
    assert app.state == "linked" and not transport.disconnecting  # its client finishes in session mode
    newcomer, _ = client(proxy)
    assert newcomer.transaction_mode
    assert newcomer.server is None or newcomer.server.pool is not pool
