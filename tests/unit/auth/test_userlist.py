"""auth_file: PgBouncer's userlist.txt parser, and how the config merges the file with [users]."""

import pytest

from pgtwist.auth import ScramVerifier, md5_hash
from pgtwist.auth.userlist import UserlistError, parse_userlist
from pgtwist.config import ConfigError, load

SCRAM_TEXT = ScramVerifier.from_password("pw", b"0123456789abcdef", 4096).to_text()
MD5_TEXT = md5_hash("app", "pw")


def pairs(text):
    return [(e.user, e.secret, e.line) for e in parse_userlist(text)]


# -- the parser --------------------------------------------------------------------------------


def test_pgbouncer_userlist_read_as_is():
    text = (
        '; generated from pg_shadow\n'
        '"app" "SCRAM-SHA-256$4096:c2FsdA==$a:b"\n'
        '\n'
        '   "legacy" "md5abc"   \n'
        '\t; indented comment\n'
        '"plain"\t"secret with spaces"\n'
    )
    assert pairs(text) == [
        ("app", "SCRAM-SHA-256$4096:c2FsdA==$a:b", 2),
        ("legacy", "md5abc", 4),
        ("plain", "secret with spaces", 6),
    ]


def test_doubled_quote_inside_quotes_is_a_literal_quote():
    assert pairs('"we""ird" "pa""ss""word"""\n') == [('we"ird', 'pa"ss"word"', 1)]
    assert pairs('"""" """"""') == [('"', '""', 1)]


def test_what_follows_the_secret_is_ignored_as_in_pgbouncer():
    # PgBouncer's older userlists had a third field; it skips to the end of the line.
    assert pairs('"app" "pw" "ignored" trailing\n"b" "x"') == [("app", "pw", 1), ("b", "x", 2)]


def test_crlf_and_no_final_newline():
    assert pairs('"a" "1"\r\n"b" "2"') == [("a", "1", 1), ("b", "2", 2)]


def test_semicolon_inside_a_value_is_not_a_comment():
    assert pairs('"a;b" ";pw"') == [("a;b", ";pw", 1)]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("app pw\n", 1, "double-quoted"),
        ('"ok" "1"\n# hash comment\n', 2, "double-quoted"),
        ('"app" "pw\n', 1, "secret has no closing"),
        ('"app pw\n', 1, "user name has no closing"),
        ('"app"\n"pw"\n', 1, "found nothing"),
        ('"app" pw\n', 1, "found something else"),
        ('"app""pw"\n', 1, "found nothing"),  # "" is a quote: the user name runs on
        ('"app"x"pw"\n', 1, "found something else"),
        ('"" "pw"\n', 1, "empty user name"),
        ('"' + "u" * 129 + '" "pw"\n', 1, "longer than 128"),
        ('"u" "' + "p" * 2049 + '"\n', 1, "longer than 2048"),
    ],
)
def test_broken_lines_name_the_line_and_never_the_secret(text, line, fragment):
    with pytest.raises(UserlistError) as e:
        parse_userlist(text)
    assert e.value.line == line and fragment in str(e.value)
    assert "pw" not in e.value.message


def test_empty_file_is_no_users():
    assert pairs("") == [] and pairs("; nothing\n\n") == []


# -- merged into the config ----------------------------------------------------------------------


def write(tmp_path, config, userlist=None, name="userlist.txt"):
    if userlist is not None:
        (tmp_path / name).write_text(userlist)
    path = tmp_path / "pgbalance.toml"
    path.write_text(config)
    return path


NEED = "users: auth_type = 'scram-sha-256' needs at least one [users.NAME] with a password"
BASE = '[databases.appdb]\nnodes = ["db1:5432"]\n'


def errors(path):
    with pytest.raises(ConfigError) as e:
        load(path)
    return e.value.errors


def test_users_from_the_file_relative_to_the_config(tmp_path):
    (tmp_path / "secrets").mkdir()
    path = write(tmp_path, 'auth_file = "secrets/userlist.txt"\n' + BASE, f'"app" "{SCRAM_TEXT}"\n"old" "{md5_hash("old", "x")}"\n', "secrets/userlist.txt")
    c = load(path)
    assert c.auth_file == str(tmp_path / "secrets" / "userlist.txt")
    assert c.users["app"].credential.kind == "scram" and c.users["old"].credential.kind == "md5"
    assert c.users["app"].route == "auto"


def test_users_table_without_password_gives_settings_to_a_file_user(tmp_path):
    path = write(tmp_path, 'auth_file = "userlist.txt"\n' + BASE + '[users.app]\nroute = "replica"\n', f'"app" "{SCRAM_TEXT}"\n')
    c = load(path)
    assert c.users["app"].route == "replica" and c.users["app"].credential.scram == ScramVerifier.parse(SCRAM_TEXT)


def test_secret_in_both_places_is_an_error(tmp_path):
    path = write(tmp_path, 'auth_file = "userlist.txt"\n' + BASE + f'[users.app]\npassword = "{MD5_TEXT}"\n', f'; x\n"app" "{SCRAM_TEXT}"\n')
    assert errors(path) == [
        f"users.app.password: user 'app' also has a secret in auth_file ({tmp_path / 'userlist.txt'}:2); give it in one place",
        NEED,  # (no user was left; as for any [users] table in error)
    ]


def test_users_table_without_password_anywhere(tmp_path):
    path = write(tmp_path, 'auth_file = "userlist.txt"\n' + BASE + '[users.app]\nroute = "replica"\n', '"other" "md5' + "0" * 32 + '"\n')
    assert errors(path) == ["users.app.password: is required here or in auth_file (plaintext, md5 hash or SCRAM-SHA-256 verifier)"]


def test_file_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "userlist.txt"
    assert errors(write(tmp_path, 'auth_file = "userlist.txt"\n' + BASE, '"a" "md5' + "0" * 32 + '"\nbroken\n')) == [
        f'auth_file: {f}:2: expected "user" "secret" (double-quoted), or a comment starting with ";"'
    ]
    assert errors(write(tmp_path, 'auth_file = "userlist.txt"\n' + BASE, '"a" "md5' + "0" * 32 + '"\n"a" "x"\n')) == [
        f"auth_file: {f}:2: user 'a' again (first on line 1)"
    ]
    assert errors(write(tmp_path, 'auth_file = "userlist.txt"\n' + BASE, '"a" ""\n')) == [f"auth_file: {f}:1: user 'a' has an empty secret"]
    # A malformed verifier: where it was written, and not the secret itself.
    errs = errors(write(tmp_path, 'auth_file = "userlist.txt"\n' + BASE, '\n"a" "SCRAM-SHA-256$4096:zz$secretstuff"\n'))
    assert len(errs) == 2 and errs[1] == NEED and errs[0].startswith(f"auth_file ({f}:2): password for user 'a'") and "secretstuff" not in errs[0]
    f.write_bytes(b'"a" "x"\n"b" "\xff"\n')
    assert errors(tmp_path / "pgbalance.toml") == [f"auth_file: {f}:2: not UTF-8"]


def test_missing_or_mistyped_auth_file(tmp_path):
    assert errors(write(tmp_path, 'auth_file = "nope.txt"\n' + BASE)) == [
        f"auth_file: cannot read {tmp_path / 'nope.txt'}: No such file or directory",
    ]
    assert errors(write(tmp_path, "auth_file = 3\n" + BASE + f'[users.a]\npassword = "{MD5_TEXT}"\n')) == [
        "auth_file: must be a file path (relative to the config file)"
    ]


def test_admin_users_and_health_user_may_come_from_the_file(tmp_path):
    config = 'auth_file = "userlist.txt"\nhealth_user = "mon"\n' + BASE + '[admin]\nusers = ["root"]\n'
    c = load(write(tmp_path, config, f'"root" "{SCRAM_TEXT}"\n"mon" "{md5_hash("mon", "x")}"\n'))
    assert c.admin_users == ("root",) and c.health_user == "mon"


def test_byte_order_mark_is_not_a_broken_line(tmp_path):
    (tmp_path / "userlist.txt").write_bytes(b'\xef\xbb\xbf"app" "' + MD5_TEXT.encode() + b'"\r\n')
    path = write(tmp_path, 'auth_file = "userlist.txt"\n' + BASE)
    assert load(path).users["app"].credential.md5_hash == MD5_TEXT
