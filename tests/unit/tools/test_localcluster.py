"""Pure (no PostgreSQL needed) tests for pgtwist.tools.localcluster."""

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from pgtwist.tools import localcluster
from pgtwist.tools.localcluster import LocalClusterError, Node, free_port


def test_free_port_below_ephemeral_range_and_bindable():
    for _ in range(20):
        port = free_port()
        assert 20000 <= port < 32768
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_free_port_rejects_ephemeral_range():
    with pytest.raises(ValueError):
        free_port(low=30000, high=40000)


def test_find_bindir_error_is_actionable(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(localcluster, "Path", _PathWithFakeRoot(tmp_path))
    with pytest.raises(LocalClusterError) as exc:
        localcluster.find_bindir()
    msg = str(exc.value)
    assert "install the Debian package postgresql" in msg
    assert "./dev" in msg


def test_find_bindir_prefers_pg_config_then_highest_version(monkeypatch, tmp_path):
    for version in ("9.6", "13", "15"):
        d = tmp_path / "usr/lib/postgresql" / version / "bin"
        d.mkdir(parents=True)
        (d / "initdb").touch()
    monkeypatch.setattr(localcluster, "Path", _PathWithFakeRoot(tmp_path))
    # No pg_config: highest numeric version wins (15 > 13 > 9.6).
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert localcluster.find_bindir() == tmp_path / "usr/lib/postgresql/15/bin"

    # pg_config pointing at a dir with initdb wins over the glob.
    monkeypatch.setattr(shutil, "which", lambda name: "/fake/pg_config" if name == "pg_config" else None)
    monkeypatch.setattr(
        subprocess, "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=str(tmp_path / "usr/lib/postgresql/13/bin") + "\n"),
    )
    assert localcluster.find_bindir() == tmp_path / "usr/lib/postgresql/13/bin"


class _PathWithFakeRoot:
    """Stand-in for pathlib.Path that maps absolute /usr/lib/postgresql under a temp root."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, p, *rest):
        p = str(p)
        if p.startswith("/usr/lib/postgresql"):
            return self.root / p.lstrip("/")
        return Path(p, *rest)


def test_node_addr():
    assert Node("primary", "127.0.0.1", 25432, Path("/tmp/x")).addr == "127.0.0.1:25432"


def test_quoting_helpers():
    assert localcluster._dsn_quote("abc") == "abc"
    assert localcluster._dsn_quote("") == "''"
    assert localcluster._dsn_quote("a b'c\\") == r"'a b\'c\\'"
    assert localcluster._sql_literal("it's") == "'it''s'"
    assert localcluster._sql_ident('we"ird') == '"we""ird"'
    assert localcluster._conf_quote("/tmp/o'k") == "'/tmp/o''k'"


def test_root_without_postgres_os_user_is_explained(monkeypatch, tmp_path):
    import pwd

    monkeypatch.setattr(localcluster.os, "geteuid", lambda: 0)

    def no_such_user(name):
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", no_such_user)
    with pytest.raises(LocalClusterError, match="useradd --system"):
        localcluster.LocalCluster(
            base=tmp_path, bindir=tmp_path, app_user="app", app_password="x",
            superuser_password="y",
        )


def test_dsn_overrides(monkeypatch, tmp_path):
    monkeypatch.setattr(localcluster.os, "geteuid", lambda: 1000)  # no postgres user needed
    c = localcluster.LocalCluster(
        base=tmp_path, bindir=tmp_path, app_user="app", app_password="pw",
        superuser_password="su",
    )
    node = Node("primary", "127.0.0.1", 25000, tmp_path / "primary")
    assert c.dsn(node) == "host=127.0.0.1 port=25000 dbname=postgres user=app password=pw"
    assert c.dsn(node, user="postgres", password=None, application_name="a b") == (
        "host=127.0.0.1 port=25000 dbname=postgres user=postgres application_name='a b'"
    )
