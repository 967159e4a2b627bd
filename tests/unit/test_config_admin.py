"""Operations config: [manhole], [admin], [metrics], shutdown_timeout, log_format, audit; flatten, diff, applicable."""

from pathlib import Path

import pytest

from pgtwist import config as configmod
from pgtwist.config import ConfigError

BASE = {
    "auth_type": "md5",
    "databases": {"appdb": {"nodes": ["db1:5432"]}},
    "users": {"app": {"password": "pw"}, "admin": {"password": "apw"}},
}


def cfg(source="<memory>", **overrides):
    return configmod.from_dict({**BASE, **overrides}, source)


def errors(**overrides) -> list[str]:
    with pytest.raises(ConfigError) as e:
        cfg(**overrides)
    return e.value.errors


def test_defaults_leave_everything_off():
    c = cfg()
    assert c.manhole is None and c.metrics is None
    assert c.admin_users == () and c.audit == ()
    assert c.shutdown_timeout == 30.0 and c.log_format == "text"


def test_operations_keys(tmp_path):
    source = str(tmp_path / "pg.toml")
    c = cfg(
        source,
        shutdown_timeout=5,
        log_format="json",
        audit=["app"],
        admin={"users": ["admin"]},
        manhole={"listen": "127.0.0.1:7022", "authorized_keys": "keys/ak"},
        metrics={"listen": "[::1]:9100"},
    )
    assert c.shutdown_timeout == 5.0 and c.log_format == "json" and c.audit == ("app",)
    assert c.admin_users == ("admin",)
    # Files are relative to the config file's directory.
    assert c.manhole.authorized_keys == str(tmp_path / "keys" / "ak")
    assert c.manhole.host_key == str(tmp_path / "manhole_host_key")
    assert (c.manhole.listen.host, c.manhole.listen.port) == ("127.0.0.1", 7022)
    assert (c.metrics.listen.host, c.metrics.listen.port) == ("::1", 9100)


def test_listen_defaults_for_manhole_and_metrics():
    c = cfg(manhole={"authorized_keys": "/ak"}, metrics={})
    assert str(c.manhole.listen) == "127.0.0.1:6022" and str(c.metrics.listen) == "127.0.0.1:9127"
    assert cfg(manhole={"authorized_keys": "/ak", "listen": "localhost"}).manhole.listen.port == 6022


def test_every_operations_mistake_is_reported_with_its_path():
    found = errors(
        shutdown_timeout=-1,
        log_format="xml",
        audit=["nobody"],
        admin={"users": ["ghost"], "extra": 1},
        manhole={"listen": "10.0.0.5:22", "bogus": True},
        metrics={"listen": "h:x"},
    )
    joined = "\n".join(found)
    for path in (
        "shutdown_timeout: ",
        "log_format: ",
        "audit[0]: names no [users.nobody]",
        "admin.users[0]: names no [users.ghost]",
        "admin.extra: unknown key",
        "manhole.bogus: unknown key",
        "manhole.listen: 10.0.0.5:22 is not a loopback address",
        "manhole.authorized_keys: is required",
        "metrics.listen: invalid port",
    ):
        assert path in joined, (path, found)


def test_remote_manhole_needs_allow_remote():
    c = cfg(manhole={"listen": "0.0.0.0:6022", "authorized_keys": "/ak", "allow_remote": True})
    assert c.manhole.allow_remote
    assert any("allow_remote" in e for e in errors(manhole={"listen": "0.0.0.0:6022", "authorized_keys": "/ak", "allow_remote": "yes"}))


def test_trust_auth_allows_admin_users_without_tables():
    c = configmod.from_dict({"auth_type": "trust", "databases": BASE["databases"], "admin": {"users": ["root"]}})
    assert c.admin_users == ("root",)


def test_flatten_masks_passwords():
    flat = configmod.flatten(cfg())
    assert str(flat["users.app.password"]) == "********"
    assert "pw" not in repr(flat) and "apw" not in repr(flat)
    assert flat["databases.appdb.nodes"][0].port == 5432


def test_diff_sees_changes_additions_removals_and_restart_keys():
    old = cfg()
    new = cfg(
        listen="127.0.0.1:7777",
        pool_size=50,
        databases={"appdb": {"nodes": ["db1:5432"], "pool_size": 7}, "other": {"nodes": ["db2:5432"]}},
        users={"app": {"password": "changed"}, "admin": {"password": "apw"}, "new": {"password": "x"}},
    )
    d = configmod.diff(old, new)
    assert d
    assert d.restart == ("listen",)
    assert "pool_size" in d.live and "databases.appdb.pool_size" in d.live and "listen" not in d.live
    assert d.databases_added == ("other",) and d.databases_changed == ("appdb",) and d.databases_removed == ()
    assert d.users_added == ("new",) and d.users_changed == ("app",) and d.users_removed == ()
    back = configmod.diff(new, old)
    assert back.databases_removed == ("other",) and back.users_removed == ("new",)


def test_same_plaintext_password_is_no_change_despite_fresh_scram_salts():
    a, b = cfg(), cfg()
    assert a.users["app"].credential.scram.salt != b.users["app"].credential.scram.salt
    assert not configmod.diff(a, b)


def test_manhole_and_metrics_need_a_restart():
    d = configmod.diff(cfg(), cfg(manhole={"authorized_keys": "/ak"}, metrics={}, log_format="json"))
    assert set(d.restart) == set(d.changed)
    assert {"manhole", "metrics", "log_format"} <= {k.split(".")[0] for k in d.restart}


def test_applicable_keeps_restart_keys_until_restart():
    old, new = cfg(), cfg(listen="127.0.0.1:7777", pool_mode="transaction", pool_size=3)
    effective = configmod.applicable(old, new)
    assert effective.listen == old.listen and effective.pool_mode == "session"
    assert effective.pool_size == 3


def test_example_config_documents_every_operations_key():
    text = (Path(__file__).resolve().parents[2] / "etc" / "pgbalance.toml").read_text()
    for key in ("shutdown_timeout", "log_format", "audit", "[admin]", "[manhole]", "authorized_keys", "host_key", "allow_remote", "[metrics]"):
        assert key in text, key
