"""A user whose secret is an md5 hash cannot log in under auth_type = "scram-sha-256" (as with
PostgreSQL and PgBouncer): --check and start-up warn, naming the user, instead of leaving it to be
found as 28P01 at every login. health_user and auth_user, which only log in to nodes, are left out."""

import io

import pytest
from twisted.internet.testing import MemoryReactorClock

from pgtwist.auth import ScramVerifier, md5_hash
from pgtwist.config import from_dict, load
from pgtwist.service import tap
from pgtwist.tools import cli

SCRAM_TEXT = ScramVerifier.from_password("pw", b"0123456789abcdef", 4096).to_text()
SINGLE = {"appdb": {"nodes": ["db1:5432"]}}
CLUSTER = {"appdb": {"nodes": ["db1:5432", "db2:5432"]}}


def test_md5_user_under_scram_is_a_warning_naming_the_user_and_the_fix():
    c = from_dict({"databases": SINGLE, "users": {"old": {"password": md5_hash("old", "x")}, "app": {"password": SCRAM_TEXT}}})
    assert c.warnings == (
        'users.old.password: is an md5 hash, which auth_type = "scram-sha-256" cannot check a client\'s password '
        "against: no client could log in as 'old'; give a plaintext password or a SCRAM-SHA-256 verifier "
        '(`pgtwist passwd old`), or set auth_type = "md5"',
    )
    assert c.users["old"].credential.kind == "md5"  # still loaded: a warning, not a refusal


@pytest.mark.parametrize("auth_type", ["md5", "trust"])
def test_no_warning_where_md5_can_log_in(auth_type):
    c = from_dict({"auth_type": auth_type, "databases": SINGLE, "users": {"old": {"password": md5_hash("old", "x")}}})
    assert c.warnings == ()


def test_health_user_and_auth_user_only_log_in_to_nodes():
    c = from_dict(
        {
            "databases": CLUSTER,
            "health_user": "mon",
            "auth_user": "lookup",
            "users": {"mon": {"password": md5_hash("mon", "x")}, "lookup": {"password": md5_hash("lookup", "y")}},
        }
    )
    assert c.warnings == ()


def test_auth_file_line_is_named(tmp_path):
    (tmp_path / "userlist.txt").write_text(f'"app" "{SCRAM_TEXT}"\n"old" "{md5_hash("old", "x")}"\n')
    path = tmp_path / "pgbalance.toml"
    path.write_text('auth_file = "userlist.txt"\n[databases.appdb]\nnodes = ["db1:5432"]\n')
    (warning,) = load(path).warnings
    assert warning.startswith(f"auth_file ({tmp_path / 'userlist.txt'}:2): is an md5 hash")


def test_warnings_are_not_settings():
    # (Not in SHOW CONFIG, never a reload "change".)
    from pgtwist.config import diff, flatten

    a = from_dict({"databases": SINGLE, "users": {"old": {"password": md5_hash("old", "x")}}})
    b = from_dict({"auth_type": "scram-sha-256", "databases": SINGLE, "users": {"old": {"password": md5_hash("old", "x")}}, "pool_size": 20})
    assert "warnings" not in flatten(a) and not diff(a, b)


def write_config(tmp_path):
    path = tmp_path / "pgbalance.toml"
    path.write_text(f'[databases.appdb]\nnodes = ["db1:5432"]\n[users.old]\npassword = "{md5_hash("old", "x")}"\n')
    return path


def test_pgtwist_check_passes_with_the_warning_on_stderr(tmp_path):
    path = write_config(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(path), out, err) == 0
    assert out.getvalue() == f"{path}: OK\n"
    assert err.getvalue().startswith(f"{path}: warning: users.old.password: is an md5 hash")


def test_twistd_check_prints_it_too(tmp_path, capsys):
    path = write_config(tmp_path)
    options = tap.Options()
    options.parseOptions(["--config", str(path), "--check"])
    with pytest.raises(SystemExit) as e:
        tap.makeService(options, reactor=MemoryReactorClock())
    assert e.value.code == 0
    got = capsys.readouterr()
    assert "OK" in got.out and "warning: users.old.password: is an md5 hash" in got.err
