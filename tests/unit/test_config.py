"""Config: TOML -> frozen objects; every error reported with its key path, all at once."""

import dataclasses

import pytest

from pgtwist.auth import ScramVerifier, md5_hash
from pgtwist.config import Address, ConfigError, from_dict, load, parse_address

SCRAM_TEXT = ScramVerifier.from_password("pw", b"0123456789abcdef", 4096).to_text()
MD5_TEXT = md5_hash("app", "pw")

# SCRAM and md5 forms avoid a PBKDF2 run per test (a plaintext password derives a verifier).
MINIMAL = {
    "databases": {"appdb": {"nodes": ["db1:5432"]}},
    "users": {"app": {"password": MD5_TEXT}},
}


def errors_of(raw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        from_dict(raw, "test.toml")
    assert str(e.value).startswith(f"test.toml: {len(e.value.errors)} error(s):")
    return e.value.errors


def with_(**top):
    return {**MINIMAL, **top}


# -- defaults and good documents -----------------------------------------------------------


def test_defaults():
    c = from_dict(MINIMAL)
    assert c.listen == Address("127.0.0.1", 6432)
    assert c.pool_mode == "session"
    assert c.pool_size == 20
    assert c.max_client_conn == 10000
    assert c.auth_type == "scram-sha-256"
    assert c.server_reset_query == "DISCARD ALL"
    assert c.server_connect_timeout == 5.0
    assert c.client_login_timeout == 60.0
    assert c.query_wait_timeout == 120.0
    assert c.max_message_size == 256 * 1024 * 1024
    assert c.source == "<memory>"
    db = c.databases["appdb"]
    assert db.name == db.dbname == "appdb"
    assert db.nodes == (Address("db1", 5432),)
    assert db.pool_size == 20
    assert c.users["app"].credential.kind == "md5"


def test_config_is_frozen():
    c = from_dict(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.pool_size = 3
    with pytest.raises(TypeError):
        c.databases["x"] = None
    with pytest.raises(TypeError):
        c.users["x"] = None


def test_every_key_set():
    raw = {
        "listen": "[::1]:7000",
        "pool_mode": "session",
        "pool_size": 5,
        "max_client_conn": 50,
        "auth_type": "md5",
        "server_reset_query": "",
        "server_connect_timeout": 1,
        "client_login_timeout": 2.5,
        "query_wait_timeout": 0,
        "max_message_size": 1024,
        "databases": {
            "appdb": {"dbname": "postgres", "nodes": ["10.0.0.1", "[fe80::1]:5433"], "pool_size": 7},
            "other": {"nodes": ["h:1"]},
        },
        "users": {"app": {"password": MD5_TEXT}, "admin": {"password": SCRAM_TEXT}},
    }
    c = from_dict(raw, "x.toml")
    assert c.listen == Address("::1", 7000) and str(c.listen) == "[::1]:7000"
    assert (c.pool_size, c.max_client_conn, c.auth_type, c.server_reset_query) == (5, 50, "md5", "")
    assert isinstance(c.server_connect_timeout, float) and c.server_connect_timeout == 1.0
    assert c.query_wait_timeout == 0.0
    assert c.databases["appdb"].dbname == "postgres"
    assert c.databases["appdb"].nodes == (Address("10.0.0.1", 5432), Address("fe80::1", 5433))
    assert c.databases["appdb"].pool_size == 7
    assert c.databases["other"].pool_size == 5  # the global pool_size
    assert c.users["admin"].credential.kind == "scram"
    assert c.source == "x.toml"


def test_trust_needs_no_users():
    c = from_dict({"auth_type": "trust", "databases": MINIMAL["databases"]})
    assert dict(c.users) == {}


def test_plaintext_password_gives_every_form():
    c = from_dict(with_(users={"app": {"password": "secret"}}))
    cred = c.users["app"].credential
    assert cred.kind == "plain" and cred.md5_hash == md5_hash("app", "secret") and cred.scram is not None


def test_user_repr_hides_the_credential():
    c = from_dict(with_(users={"app": {"password": "hunter2"}}))
    assert "hunter2" not in repr(c) and "hunter2" not in repr(c.users["app"])


# -- errors -------------------------------------------------------------------------------


def test_unknown_keys_reported_with_paths():
    errs = errors_of(
        {
            "lisen": "x",
            "databases": {"appdb": {"nodes": ["h"], "nodez": 1}},
            "users": {"app": {"password": MD5_TEXT, "pasword": "x"}},
        }
    )
    assert errs == ["lisen: unknown key", "databases.appdb.nodez: unknown key", "users.app.pasword: unknown key"]


def test_several_mistakes_all_listed():
    errs = errors_of(
        {
            "listen": "host:notaport",
            "pool_mode": "statement",
            "auth_type": "password",
            "pool_size": 0,
            "max_client_conn": "many",
            "client_login_timeout": -1,
            "max_message_size": 10,
            "server_reset_query": 42,
            "databases": {
                "a": {"nodes": []},
                "b": {"nodes": ["h:99999", "ok:1"], "dbname": "", "pool_size": 1.5},
                "c": "not a table",
            },
            "users": {"u": {}, "v": {"password": "md5nothex"}, "w": 3},
        }
    )
    paths = [e.split(":", 1)[0] for e in errs]
    assert paths == [
        "listen",
        "pool_mode",
        "auth_type",
        "pool_size",
        "max_client_conn",
        "client_login_timeout",
        "max_message_size",
        "server_reset_query",
        "databases.a.nodes",
        "databases.b.dbname",
        "databases.b.nodes[0]",
        "databases.b.pool_size",
        "databases.c",
        "users.u.password",
        "users.v.password",
        "users.w",
        "users",  # no user is usable, so auth_type = "scram-sha-256" has nobody to check
    ], errs
    text = "\n".join(errs)
    assert "'statement'" in text and "'password'" in text
    assert "port out of range" in text


def test_databases_required():
    assert errors_of({"auth_type": "trust"}) == ["databases: at least one [databases.NAME] table is required"]
    assert errors_of({"auth_type": "trust", "databases": {}})[0].startswith("databases:")
    assert errors_of({"auth_type": "trust", "databases": ["x"]})[0].startswith("databases:")


@pytest.mark.parametrize("nodes", [None, [], "h:1"])
def test_nodes_must_be_a_non_empty_list(nodes):
    db = {} if nodes is None else {"nodes": nodes}
    errs = errors_of(with_(databases={"appdb": db}))
    assert errs == ["databases.appdb.nodes: must be a non-empty list of 'host:port'"]


def test_node_entry_not_a_string():
    errs = errors_of(with_(databases={"appdb": {"nodes": [5432]}}))
    assert errs[0].startswith("databases.appdb.nodes[0]: ")


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256"])
def test_password_auth_needs_users(auth_type):
    errs = errors_of({"auth_type": auth_type, "databases": MINIMAL["databases"]})
    assert errs == [f"users: auth_type = '{auth_type}' needs at least one [users.NAME] with a password"]


def test_users_must_be_a_table():
    errs = errors_of({"auth_type": "trust", "databases": MINIMAL["databases"], "users": ["app"]})
    assert errs == ["users: must be a table of [users.NAME]"]


@pytest.mark.parametrize("password", [None, "", 1234])
def test_password_required(password):
    user = {} if password is None else {"password": password}
    errs = errors_of(with_(users={"app": user}))
    assert errs[0] == "users.app.password: is required (plaintext, md5 hash or SCRAM-SHA-256 verifier)"


@pytest.mark.parametrize(
    "secret",
    [
        "md5" + "A" * 32,  # uppercase hex: not what PostgreSQL stores
        "md5" + "0" * 31,
        "md5" + "f" * 33,
        "md5-my-Secret-Passphrase",
        "SCRAM-SHA-256$4096:c2FsdA==$notbase64!!:alsonot",
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-256$abc:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        SCRAM_TEXT[:-4] + "x=y=",
    ],
)
def test_malformed_hash_reported_without_the_secret(secret):
    errs = errors_of(with_(auth_type="trust", users={"app": {"password": secret}}))
    assert len(errs) == 1 and errs[0].startswith("users.app.password: ")
    text = errs[0]
    assert secret not in text
    # Not even a telling piece of it.
    body = secret.split("$")[-1] if secret.startswith("SCRAM") else secret[3:]
    assert body not in text


@pytest.mark.parametrize("key", ["pool_size", "max_client_conn", "max_message_size"])
@pytest.mark.parametrize("value", [True, 1.0, "10", None, -5])
def test_integer_keys(key, value):
    errs = errors_of(with_(**{key: value}))
    assert len(errs) == 1 and errs[0].startswith(f"{key}: must be ")


@pytest.mark.parametrize("key", ["server_connect_timeout", "client_login_timeout", "query_wait_timeout"])
@pytest.mark.parametrize("value", [-0.5, "5", True, float("nan"), float("inf")])
def test_timeout_keys(key, value):
    errs = errors_of(with_(**{key: value}))
    assert len(errs) == 1 and errs[0].startswith(f"{key}: must be ")


def test_pool_size_bounds():
    assert errors_of(with_(pool_size=100_001))[0] == "pool_size: must be between 1 and 100000, not 100001"
    assert from_dict(with_(pool_size=100_000)).pool_size == 100_000


def test_max_message_size_bounds():
    assert errors_of(with_(max_message_size=0x40000000))[0].startswith("max_message_size: must be between 1024 and")
    assert from_dict(with_(max_message_size=0x3FFFFFFF)).max_message_size == 0x3FFFFFFF


def test_bad_listen_reported():
    assert errors_of(with_(listen="[::1]:0")) == ["listen: port out of range in '[::1]:0'"]
    assert errors_of(with_(listen=6432))[0].startswith("listen: ")


def test_unhashable_choice_value_is_an_error_not_a_crash():
    errs = errors_of(with_(pool_mode=["session"], auth_type={"x": 1}))
    assert [e.split(":")[0] for e in errs] == ["pool_mode", "auth_type"]


def test_on_server_loss():
    assert from_dict(MINIMAL).on_server_loss == "keep_session"
    assert from_dict(with_(on_server_loss="close_client")).on_server_loss == "close_client"
    assert errors_of(with_(on_server_loss="close")) == [
        "on_server_loss: must be one of 'keep_session', 'close_client', not 'close'"
    ]
    assert errors_of(with_(on_server_loss=True))[0].startswith("on_server_loss: must be one of")


def test_on_server_loss_is_reloadable():
    from pgtwist.config import diff

    change = diff(from_dict(MINIMAL), from_dict(with_(on_server_loss="close_client")))
    assert change.changed == ("on_server_loss",) and change.restart == ()


# -- parse_address ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("db1:6000", Address("db1", 6000)),
        ("db1", Address("db1", 5432)),
        ("10.1.2.3:1", Address("10.1.2.3", 1)),
        ("[::1]:5432", Address("::1", 5432)),
        ("[::1]", Address("::1", 5432)),
        ("::1", Address("::1", 5432)),
        ("fe80::1", Address("fe80::1", 5432)),
        ("h:65535", Address("h", 65535)),
        ("postgres-0.postgres.default.svc.cluster.local:5432", Address("postgres-0.postgres.default.svc.cluster.local", 5432)),
        ("db_1.example.:5432", Address("db_1.example.", 5432)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


def test_parse_address_default_port():
    assert parse_address("h", 6432) == Address("h", 6432)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":5432",
        "[]:5432",
        "h:abc",
        "h:0",
        "h:65536",
        "h:-1",
        "h:",
        "h: 5432",
        "h:+5432",
        "h:5_432",
        "h:٥٤٣٢",  # non-ASCII digits
        "[::1]junk",
        "[::1]5432",
        "[::1",
        "[::1]:",
        None,
        5432,
        "db host:5432",  # hosts that cannot be hosts: caught at --check, not as a node down forever
        "db..example:5432",
        "-db:5432",
        "db-:5432",
        "http://db:5432",
        "db/1",
        "a" * 64 + ".example",
        "127.0.0.1.5432",  # a mistyped IPv4 address, not a name (an all-digit last label)
        "10.0.0.256",
    ],
)
def test_parse_address_refuses(text):
    with pytest.raises(ValueError):
        parse_address(text)


def test_a_host_that_cannot_be_a_host_names_its_key():
    raw = {"databases": {"appdb": {"nodes": ["db1:5432", "db 2:5432"]}}, "users": {"app": {"password": "x"}}}
    assert "databases.appdb.nodes[1]: 'db 2' cannot be a host name or IP address" in errors_of(raw)
    assert "listen: 'local host' cannot be a host name or IP address" in errors_of(dict(raw, listen="local host:6432"))


def test_address_str():
    assert str(Address("h", 1)) == "h:1"
    assert str(Address("::1", 1)) == "[::1]:1"


# -- load() ----------------------------------------------------------------------------------


def test_load_good_file(tmp_path):
    path = tmp_path / "pg.toml"
    path.write_text(
        'auth_type = "md5"\n'
        "[databases.appdb]\n"
        'nodes = ["db1:5432"]\n'
        "[users.app]\n"
        f'password = "{MD5_TEXT}"\n'
    )
    c = load(path)
    assert c.auth_type == "md5" and c.source == str(path)
    assert load(str(path)).databases.keys() == {"appdb"}


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as e:
        load(path)
    assert e.value.errors == ["cannot read: No such file or directory"]
    assert str(e.value).startswith(str(path))


def test_load_directory(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(tmp_path)
    assert e.value.errors[0].startswith("cannot read: ")


def test_load_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('listen = "127.0.0.1:6432\n[databases\n')
    with pytest.raises(ConfigError) as e:
        load(path)
    assert len(e.value.errors) == 1 and e.value.errors[0].startswith("invalid TOML: ")


def test_load_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('server_reset_query = "DISCARD ALL -- caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert e.value.errors[0].startswith("invalid TOML: ")


def test_load_reports_validation_errors_with_file_name(tmp_path):
    path = tmp_path / "pg.toml"
    path.write_text('pool_size = 0\nfoo = 1\n[databases.x]\nnodes = ["h:0"]\n')
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: 4 error(s):\n  ")
    assert [x.split(":")[0] for x in e.value.errors] == ["foo", "pool_size", "databases.x.nodes[0]", "users"]


def test_shipped_example_config_is_valid():
    import pathlib

    example = pathlib.Path(__file__).resolve().parents[2] / "etc" / "pgbalance.toml"
    if not example.exists():
        pytest.skip("no etc/pgbalance.toml")
    c = load(example)
    assert c.databases


def test_every_key_is_documented_in_the_example_file():
    import re
    from pathlib import Path

    from pgtwist import config as configmod

    text = (Path(__file__).resolve().parents[2] / "etc" / "pgbalance.toml").read_text()
    undocumented = [
        key
        for key in sorted(configmod._TOP_KEYS)
        if not re.search(rf"^#?\s*(\[{key}[.\]]|{key}\s*=)", text, re.M)
    ]
    assert undocumented == []


def test_connection_log_lines_default_on_as_in_pgbouncer_and_can_be_turned_off():
    c = from_dict(MINIMAL)
    assert c.log_connections is True and c.log_disconnections is True
    c = from_dict(with_(log_connections=False, log_disconnections=False))
    assert c.log_connections is False and c.log_disconnections is False
    assert errors_of(with_(log_connections="no", log_disconnections=0)) == [
        "log_connections: must be true or false, not 'no'",
        "log_disconnections: must be true or false, not 0",
    ]


def test_pool_mode_user_over_database_over_global():
    raw = {
        "pool_mode": "session",
        "databases": {"tx": {"nodes": ["h:1"], "pool_mode": "transaction"}, "plain": {"nodes": ["h:1"]}},
        "users": {"a": {"password": "p", "pool_mode": "session"}, "b": {"password": "p"}},
    }
    config = from_dict(raw)
    assert config.pool_mode_for("tx", "a") == "session"
    assert config.pool_mode_for("tx", "b") == "transaction"
    assert config.pool_mode_for("plain", "b") == "session"
    assert config.pool_mode_for("plain", "looked-up") == "session"
    raw["users"]["b"]["pool_mode"] = "statement"
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    assert any(line.startswith("users.b.pool_mode: must be one of") for line in e.value.errors)


def test_connection_limits_global_and_per_table():
    raw = {
        "max_db_connections": 10,
        "max_user_connections": 4,
        "reserve_pool_size": 2,
        "reserve_pool_timeout": 1.5,
        "databases": {"a": {"nodes": ["h:1"], "max_db_connections": 3, "reserve_pool_size": 0}, "b": {"nodes": ["h:1"]}},
        "users": {"u": {"password": "p", "max_user_connections": 1}, "v": {"password": "p"}},
    }
    config = from_dict(raw)
    assert (config.databases["a"].max_db_connections, config.databases["a"].reserve_pool_size) == (3, 0)
    assert (config.databases["b"].max_db_connections, config.databases["b"].reserve_pool_size) == (10, 2)
    assert (config.users["u"].max_user_connections, config.users["v"].max_user_connections) == (1, 4)
    assert (config.max_user_connections, config.reserve_pool_timeout) == (4, 1.5)
    raw["databases"]["a"]["max_db_connections"] = -1
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    assert any(line.startswith("databases.a.max_db_connections: must be") for line in e.value.errors)
