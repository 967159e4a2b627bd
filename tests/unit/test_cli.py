"""The `pgtwist` command: --version, check, example-config, passwd (run is exercised in tests/shipping)."""

import io
from pathlib import Path

import pytest

from pgtwist import __version__
from pgtwist.tools import cli

ROOT = Path(__file__).resolve().parents[2]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"pgtwist {__version__} (Twisted ")


def test_help_points_at_the_installed_example(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "pgbalance.toml" in out and "example-config" in out


def test_the_example_config_is_etc_pgbalance_toml_and_passes_check(tmp_path, capsys):
    assert cli.example_config_text() == (ROOT / "etc" / "pgbalance.toml").read_text()
    assert cli.main(["example-config"]) == 0
    copy = tmp_path / "pgbalance.toml"
    copy.write_text(capsys.readouterr().out)
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(copy), out, err) == 0 and out.getvalue() == f"{copy}: OK\n"


def test_check_exits_78_with_every_mistake(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('listen = "local host:6432"\npool_size = 0\n')
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(bad), out, err) == cli.EX_CONFIG
    assert out.getvalue() == ""
    assert "listen: 'local host' cannot be a host name or IP address" in err.getvalue()
    assert "pool_size: must be between 1 and 100000, not 0" in err.getvalue()


def test_passwd_is_pgtwist_passwd(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("secret\n"))
    assert cli.main(["passwd", "app"]) == 0
    line = capsys.readouterr().out
    assert line.startswith('"app" "SCRAM-SHA-256$4096:')


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "run" in capsys.readouterr().out


def test_the_plugin_is_reachable_from_an_editable_install(monkeypatch):
    # `pip install -e .` serves the pgtwist package through an import hook, and twistd looks
    # for plugins only in twisted.plugins' search path: the source tree's plugin directory
    # joins it, once, so `pgtwist run` and each worker find `pgbalance` from anywhere.
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    import twisted.plugins

    plugins = str(Path(cli.__file__).resolve().parents[2] / "twisted" / "plugins")
    monkeypatch.setattr(twisted.plugins, "__path__", [p for p in twisted.plugins.__path__ if p != plugins])
    cli.plugin_reachable()
    cli.plugin_reachable()
    assert twisted.plugins.__path__.count(plugins) == 1
    assert "pgbalance" in {maker.tapname for maker in getPlugins(IServiceMaker)}
