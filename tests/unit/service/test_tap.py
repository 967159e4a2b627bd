"""twistd integration: `twistd pgbalance` options and makeService()."""

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from pgtwist.auth import md5_hash
from pgtwist.service import lifecycle as servicemod
from pgtwist.service import tap
from pgtwist.service.lifecycle import PgBalanceService

GOOD = (
    'listen = "127.0.0.1:7432"\n'
    'auth_type = "md5"\n'
    "[databases.appdb]\n"
    'nodes = ["db1:5432"]\n'
    "[users.app]\n"
    f'password = "{md5_hash("app", "pw")}"\n'
)


def options(*argv) -> tap.Options:
    o = tap.Options()
    o.parseOptions(list(argv))
    return o


@pytest.fixture
def good_config(tmp_path):
    path = tmp_path / "pgbalance.toml"
    path.write_text(GOOD)
    return str(path)


def test_options_require_config_or_demo():
    with pytest.raises(usage.UsageError, match="--config"):
        options()


def test_options_refuse_both():
    with pytest.raises(usage.UsageError, match="exclude each other"):
        options("--config", "x.toml", "--demo")


def test_options_parse(good_config):
    o = options("-c", good_config, "--check")
    assert o["config"] == good_config and o["check"] and not o["demo"]
    d = options("--demo", "--demo-replicas", "2", "--demo-listen", "127.0.0.1:7000")
    assert d["demo"] and d["demo-replicas"] == 2 and d["demo-listen"] == "127.0.0.1:7000"


def test_options_demo_replicas_must_be_an_int():
    with pytest.raises(usage.UsageError):
        options("--demo", "--demo-replicas", "two")


def test_make_service_with_good_config(good_config):
    reactor = MemoryReactorClock()
    svc = tap.makeService(options("--config", good_config), reactor=reactor)
    assert isinstance(svc, PgBalanceService)
    assert svc.reactor is reactor and svc.proxy.reactor is reactor
    assert svc.config.source == good_config
    assert svc.config.auth_type == "md5"
    assert reactor.tcpServers == []  # nothing listens before startService


def test_service_listens_on_start_and_stops(good_config, monkeypatch):
    monkeypatch.setattr(servicemod, "raise_nofile_limit", lambda: 1024)
    reactor = MemoryReactorClock()
    svc = tap.makeService(options("--config", good_config), reactor=reactor)
    svc.startService()
    ((port, factory, backlog, interface),) = reactor.tcpServers
    assert (port, interface) == (7432, "127.0.0.1")
    assert factory.proxy is svc.proxy
    results = []
    svc.stopService().addBoth(results.append)
    assert results == [None]
    assert reactor.getDelayedCalls() == []  # no timer left behind


def test_broken_config_exits_78_with_errors_on_stderr(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('pool_size = 0\nlisten = "h:x"\n[databases.appdb]\nnodes = []\n')
    with pytest.raises(SystemExit) as e:
        tap.makeService(options("--config", str(path)), reactor=MemoryReactorClock())
    assert e.value.code == 78
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: ")
    for key in ("pool_size: ", "listen: ", "databases.appdb.nodes: ", "users: "):
        assert f"\n  {key}" in err
    assert "Traceback" not in err


def test_missing_config_file_exits_78(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tap.makeService(options("--config", str(tmp_path / "none.toml")), reactor=MemoryReactorClock())
    assert e.value.code == 78
    assert "cannot read" in capsys.readouterr().err


def test_invalid_toml_exits_78(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("this is not toml\n")
    with pytest.raises(SystemExit) as e:
        tap.makeService(options("--config", str(path)), reactor=MemoryReactorClock())
    assert e.value.code == 78
    assert "invalid TOML" in capsys.readouterr().err


def test_check_exits_0_and_says_ok(good_config, capsys):
    with pytest.raises(SystemExit) as e:
        tap.makeService(options("--config", good_config, "--check"), reactor=MemoryReactorClock())
    assert e.value.code == 0
    assert capsys.readouterr().out == f"{good_config}: OK\n"


def test_twistd_plugin_points_at_tap():
    from twisted.plugins import pgbalance

    assert pgbalance.pgbalance.tapname == "pgbalance"
    assert pgbalance.pgbalance.module == "pgtwist.service.tap"


def test_demo_options_parse_with_their_defaults():
    from pgtwist.service.tap import Options

    options = Options()
    options.parseOptions(["--demo"])
    assert options["demo-replicas"] == 1  # an int even when not given: LocalCluster compares it
    options = Options()
    options.parseOptions(["--demo", "--demo-replicas", "2"])
    assert options["demo-replicas"] == 2


def test_demo_config_fronts_every_node_in_transaction_mode():
    from types import SimpleNamespace

    from pgtwist.tools.demo import demo_config

    nodes = [SimpleNamespace(addr="127.0.0.1:20001"), SimpleNamespace(addr="127.0.0.1:20002")]
    cluster = SimpleNamespace(app_database="postgres", nodes=nodes, app_user="app", app_password="pw-not-default")
    config = demo_config(cluster, "127.0.0.1:16499")
    assert config.pool_mode == "transaction"
    assert [str(n) for n in config.databases["appdb"].nodes] == ["127.0.0.1:20001", "127.0.0.1:20002"]


def test_a_listener_that_cannot_open_is_a_listen_error_naming_its_key(monkeypatch, good_config):
    # Under twistd (signals=True) the same message is one line on stderr and exit 78: tests/shipping.
    import errno

    from twisted.internet.error import CannotListenError

    from pgtwist import config as configmod

    class Taken(MemoryReactorClock):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "Address already in use"))

    monkeypatch.setattr(servicemod, "raise_nofile_limit", lambda: 1024)
    svc = PgBalanceService(configmod.load(good_config), Taken())
    with pytest.raises(servicemod.ListenError) as e:
        svc.privilegedStartService()
    assert str(e.value) == f"{good_config}: listen: cannot listen on 127.0.0.1:7432: Address already in use"
