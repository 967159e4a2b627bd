"""The SSH manhole: factory and portal construction, host key creation, key checking, REPL namespace."""

import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch import manhole_ssh
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys
from twisted.cred.credentials import ISSHPrivateKey, SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.testing import MemoryReactorClock

from pgtwist.admin import ManholeError, manhole
from pgtwist.config import ManholeConfig, parse_address
from pgtwist.service.lifecycle import PgBalanceService

from tests.harness.admin_support import client, make_config


def new_key() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def manhole_config(tmp_path, authorized: list[keys.Key] | None = None, **kw) -> ManholeConfig:
    ak = tmp_path / "authorized_keys"
    if authorized is not None:
        ak.write_bytes(b"".join(k.public().toString("openssh") + b" test\n" for k in authorized))
    return ManholeConfig(parse_address("127.0.0.1:6022"), str(ak), str(tmp_path / "host_key"), **kw)


def credentials(key: keys.Key, signed: bool = True) -> SSHPrivateKey:
    data = b"session-id-and-request"
    return SSHPrivateKey(b"admin", b"ssh-ed25519", key.public().blob(), data, key.sign(data) if signed else None)


def login(factory, creds):
    results = []
    factory.portal.login(creds, None, IConchUser).addBoth(results.append)
    (result,) = results
    return result


@pytest.fixture
def service():
    return PgBalanceService(make_config(), MemoryReactorClock())


def test_factory_has_its_own_host_keys(tmp_path, service):
    listed = new_key()
    factory = manhole.make_factory(service, manhole_config(tmp_path, [listed]))
    (tmp_path / "other").mkdir()
    other = manhole.make_factory(service, manhole_config(tmp_path / "other", [listed]))
    assert isinstance(factory, manhole_ssh.ConchFactory)
    assert "publicKeys" in vars(factory) and "privateKeys" in vars(factory)
    assert manhole_ssh.ConchFactory.publicKeys == {} and manhole_ssh.ConchFactory.privateKeys == {}  # untouched
    assert set(factory.privateKeys) == {b"ssh-ed25519"}
    assert factory.publicKeys[b"ssh-ed25519"] == factory.privateKeys[b"ssh-ed25519"].public()
    assert factory.publicKeys is not other.publicKeys


def test_host_key_is_created_0600_and_kept(tmp_path, service):
    config = manhole_config(tmp_path, [new_key()])
    first = manhole.make_factory(service, config).privateKeys[b"ssh-ed25519"]
    assert os.stat(config.host_key).st_mode & 0o777 == 0o600
    again = manhole.make_factory(service, config).privateKeys[b"ssh-ed25519"]
    assert first == again


def test_missing_authorized_keys_refuses_to_start(tmp_path, service):
    with pytest.raises(ManholeError, match="authorized_keys"):
        manhole.make_factory(service, manhole_config(tmp_path, None))


def test_unusable_host_key_is_a_manhole_error(tmp_path, service):
    config = manhole_config(tmp_path, [new_key()])
    open(config.host_key, "w").write("not a key")
    with pytest.raises(ManholeError, match="host_key"):
        manhole.make_factory(service, config)


def test_only_listed_keys_get_in(tmp_path, service):
    listed, unlisted = new_key(), new_key()
    factory = manhole.make_factory(service, manhole_config(tmp_path, [listed]))
    interface, avatar, logout = login(factory, credentials(listed))
    assert interface is IConchUser and avatar is not None
    refused = login(factory, credentials(unlisted))
    assert refused.check(UnauthorizedLogin)
    refused.trap(UnauthorizedLogin)


def test_authorized_keys_are_read_at_each_login(tmp_path, service):
    first, second = new_key(), new_key()
    config = manhole_config(tmp_path, [first])
    factory = manhole.make_factory(service, config)
    manhole_config(tmp_path, [second])  # the file is rewritten
    assert login(factory, credentials(second))[0] is IConchUser
    login(factory, credentials(first)).trap(UnauthorizedLogin)


def test_no_password_auth_is_offered(tmp_path, service):
    factory = manhole.make_factory(service, manhole_config(tmp_path, [new_key()]))
    assert factory.portal.listCredentialsInterfaces() == [ISSHPrivateKey]


def test_namespace_helpers_return_plain_data(service):
    names = manhole.namespace(service)
    assert names["service"] is service and names["proxy"] is service.proxy
    assert names["clients"]() == []
    client(service.proxy)
    assert len(names["clients"]()) == 1
    assert len(names["servers"]()) == 0  # (no node behind this proxy: the client is waiting)
    assert names["pools"]()[0]["database"] == "appdb"
    assert names["nodes"]()[0]["node"] == "db1:5432"
    assert names["stats"]()["clients"] == 1
    assert names["config"]()["users.app.password"] == "********"
    assert names["pause"]("appdb") == 1 and names["resume"]() == 1
    assert names["kill"]("c404") is False
    assert names["explain"]("SELECT 1")["node"] == "db1:5432"
    result = names["reload"]()
    assert result["ok"] is False and result["errors"]  # (this config did not come from a file)


def test_service_with_manhole_listens_where_configured(tmp_path, monkeypatch):
    from pgtwist.service import lifecycle as servicemod

    monkeypatch.setattr(servicemod, "raise_nofile_limit", lambda: 1024)
    (tmp_path / "authorized_keys").write_bytes(new_key().public().toString("openssh") + b"\n")
    config = make_config(manhole={"listen": "127.0.0.1:7022", "authorized_keys": str(tmp_path / "authorized_keys"), "host_key": str(tmp_path / "hk")})
    reactor = MemoryReactorClock()
    svc = PgBalanceService(config, reactor)
    svc.privilegedStartService()
    svc.startService()
    listening = {(port, interface): factory for port, factory, _, interface in reactor.tcpServers}
    assert isinstance(listening[(7022, "127.0.0.1")], manhole_ssh.ConchFactory)
    results = []
    svc.stopService().addBoth(results.append)
    assert results == [None]


def test_service_without_authorized_keys_file_fails_at_construction(tmp_path):
    config = make_config(manhole={"authorized_keys": str(tmp_path / "none")})
    with pytest.raises(ManholeError):
        PgBalanceService(config, MemoryReactorClock())
