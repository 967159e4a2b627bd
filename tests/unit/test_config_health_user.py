"""The health monitor's login: a database with several nodes needs a health user whose secret
answers the nodes on its own (the monitor starts before any client logs in); config and --check refuse others."""

import pytest
from twisted.internet.testing import MemoryReactorClock

from pgtwist.auth import ScramVerifier, md5_hash
from pgtwist.config import ConfigError, from_dict
from pgtwist.service import tap

SCRAM_TEXT = ScramVerifier.from_password("pw", b"0123456789abcdef", 4096).to_text()
CLUSTER = {"appdb": {"nodes": ["db1:5432", "db2:5432"]}}
SINGLE = {"appdb": {"nodes": ["db1:5432"]}}
FIX = (
    "set health_user to a user whose password is plaintext (or an md5 hash, for nodes that use md5), "
    "e.g. a role with pg_monitor whose secret is kept in auth_file"
)


def errors_of(raw):
    with pytest.raises(ConfigError) as e:
        from_dict(raw, "test.toml")
    return e.value.errors


def test_first_user_with_a_verifier_cannot_probe_a_cluster():
    errs = errors_of({"databases": CLUSTER, "users": {"app": {"password": SCRAM_TEXT}}})
    assert errs == [
        "health_user: databases.appdb.nodes lists several nodes, so the health monitor logs in to each of them "
        "from start-up, before any client has logged in, which user 'app' (health_user is not set: the first user) "
        f"cannot do: its secret (users.app.password) is a SCRAM verifier, which cannot answer a node's challenge; {FIX}"
    ]


def test_named_health_user_with_a_verifier_is_refused_too():
    errs = errors_of(
        {"databases": CLUSTER, "health_user": "mon", "users": {"app": {"password": md5_hash("app", "x")}, "mon": {"password": SCRAM_TEXT}}}
    )
    assert len(errs) == 1 and "which user 'mon' cannot do: its secret (users.mon.password) is a SCRAM verifier" in errs[0]


@pytest.mark.parametrize("secret", ["plain secret", md5_hash("mon", "x")])
def test_plaintext_or_md5_health_user_is_fine(secret):
    c = from_dict({"databases": CLUSTER, "health_user": "mon", "users": {"app": {"password": SCRAM_TEXT}, "mon": {"password": secret}}})
    assert c.health_user == "mon" and c.users["app"].credential.kind == "scram"


def test_verifiers_are_fine_without_a_cluster():
    # One node: no monitor; server logins reuse the ClientKey each client proves.
    c = from_dict({"databases": SINGLE, "users": {"app": {"password": SCRAM_TEXT}}})
    assert c.users["app"].credential.kind == "scram"


def test_cluster_with_nobody_to_probe_as():
    assert errors_of({"auth_type": "trust", "databases": CLUSTER}) == [
        "health_user: databases.appdb.nodes lists several nodes, so the health monitor logs in to each of them, "
        f"and there is no user to log in as: {FIX}"
    ]


def test_unknown_health_user():
    assert errors_of({"databases": CLUSTER, "health_user": "ghost", "users": {"app": {"password": "pw"}}}) == [
        "health_user: names no [users.ghost] table (nor a line of auth_file)"
    ]


def test_health_user_in_auth_file_with_a_verifier_names_the_line(tmp_path):
    (tmp_path / "userlist.txt").write_text(f'"app" "plain"\n"mon" "{SCRAM_TEXT}"\n')
    path = tmp_path / "pgbalance.toml"
    path.write_text('auth_file = "userlist.txt"\nhealth_user = "mon"\n[databases.appdb]\nnodes = ["a:1", "b:2"]\n')
    from pgtwist.config import load

    with pytest.raises(ConfigError) as e:
        load(path)
    assert f"its secret (auth_file ({tmp_path / 'userlist.txt'}:2)) is a SCRAM verifier" in e.value.errors[0]


def test_check_refuses_a_cluster_the_monitor_cannot_log_in_to(tmp_path, capsys):
    path = tmp_path / "pgbalance.toml"
    path.write_text(
        'auth_type = "scram-sha-256"\n[databases.appdb]\nnodes = ["db1:5432", "db2:5432"]\n'
        f'[users.app]\npassword = "{SCRAM_TEXT}"\n'
    )
    options = tap.Options()
    options.parseOptions(["--config", str(path), "--check"])
    with pytest.raises(SystemExit) as e:
        tap.makeService(options, reactor=MemoryReactorClock())
    assert e.value.code == 78
    out = capsys.readouterr()
    assert "OK" not in out.out
    assert "health_user: databases.appdb.nodes lists several nodes" in out.err and "SCRAM verifier" in out.err


# -- what etc/ ships must pass --check ------------------------------------------------------------

ETC = __import__("pathlib").Path(__file__).resolve().parents[2] / "etc"


def test_kubernetes_manifests_ship_a_config_that_checks(tmp_path):
    from pgtwist.config import load

    # The kustomize base generates the ConfigMap and the Secret from these two files
    # (tests/shipping/test_kubernetes.py renders and checks every overlay).
    base = ETC / "kubernetes" / "base"
    toml = (base / "pgbalance.toml").read_text()
    userlist = (base / "userlist.txt").read_text()
    deployment = (base / "deployment.yaml").read_text()
    assert 'auth_file = "/etc/pgtwist-users/userlist.txt"' in toml
    assert "mountPath: /etc/pgtwist-users" in deployment and "secretName: pgtwist-users" in deployment
    (tmp_path / "userlist.txt").write_text(userlist)
    (tmp_path / "pgbalance.toml").write_text(toml.replace("/etc/pgtwist-users/userlist.txt", "userlist.txt"))
    c = load(tmp_path / "pgbalance.toml")
    assert len(c.databases["appdb"].nodes) == 2
    assert c.users[c.health_user].credential.kind == "plain"
    assert c.users["app"].credential.kind == "scram" and c.admin_users == ("admin",)


def test_example_config_checks():
    from pgtwist.config import load

    assert load(ETC / "pgbalance.toml").users["app"].credential.kind == "plain"


def test_a_user_in_error_is_not_blamed_twice():
    errs = errors_of({"databases": CLUSTER, "users": {"app": {"password": "md5nothex"}, "b": {"password": SCRAM_TEXT}}})
    assert len(errs) == 1 and errs[0].startswith("users.app.password:")
