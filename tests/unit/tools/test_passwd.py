"""pgtwist-passwd: a password in (terminal or stdin, argv only when asked), a SCRAM verifier out."""

import configparser
import io
import subprocess
import sys
from pathlib import Path

from pgtwist.auth import ScramVerifier
from pgtwist.auth.userlist import parse_userlist
from pgtwist.config import from_dict
from pgtwist.tools import passwd

ROOT = Path(__file__).resolve().parents[3]


class Tty(io.StringIO):
    def isatty(self):
        return True


def run(argv, stdin_text="", tty=False):
    stdin = Tty(stdin_text) if tty else io.StringIO(stdin_text)
    out, err = io.StringIO(), io.StringIO()
    code = passwd.main(argv, stdin=stdin, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_stdin_first_line_becomes_a_verifier_usable_in_the_config():
    code, out, err = run(["--iterations", "64"], "s3cret pass\nignored\n")
    assert code == 0 and err == ""
    text = out.strip()
    verifier = ScramVerifier.parse(text)
    assert verifier.iterations == 64 and verifier.verify_password("s3cret pass")
    assert not verifier.verify_password("s3cret pass\n") and "s3cret" not in out
    c = from_dict({"databases": {"a": {"nodes": ["h:1"]}}, "users": {"app": {"password": text}}})
    assert c.users["app"].credential.scram == verifier


def test_default_iterations_are_postgresqls_and_salts_are_fresh():
    a, b = run([], "pw\n")[1].strip(), run([], "pw\n")[1].strip()
    assert a.startswith("SCRAM-SHA-256$4096:") and a != b


def test_crlf_and_no_newline():
    assert ScramVerifier.parse(run(["--iterations", "8"], "pw\r\n")[1].strip()).verify_password("pw")
    assert ScramVerifier.parse(run(["--iterations", "8"], "pw")[1].strip()).verify_password("pw")


def test_user_argument_prints_an_auth_file_line():
    code, out, _ = run(["--iterations", "8", 'we"ird'], "pw\n")
    [entry] = parse_userlist(out)
    assert code == 0 and entry.user == 'we"ird' and ScramVerifier.parse(entry.secret).verify_password("pw")


def test_terminal_asks_twice_without_echo(monkeypatch):
    answers = iter(["tty pw", "tty pw"])
    prompts = []
    monkeypatch.setattr(passwd.getpass, "getpass", lambda prompt, stream=None: prompts.append(prompt) or next(answers))
    code, out, _ = run(["--iterations", "8"], tty=True)
    assert code == 0 and prompts == ["Password: ", "Again: "]
    assert ScramVerifier.parse(out.strip()).verify_password("tty pw")


def test_terminal_answers_that_differ(monkeypatch):
    answers = iter(["one", "two"])
    monkeypatch.setattr(passwd.getpass, "getpass", lambda prompt, stream=None: next(answers))
    assert run([], tty=True) == (1, "", "pgtwist-passwd: the passwords differ\n")


def test_password_on_the_command_line_only_when_asked_and_with_a_warning():
    code, out, err = run(["--iterations", "8", "--password", "argv pw"], "not this\n")
    assert code == 0 and "warning" in err and "visible" in err
    assert ScramVerifier.parse(out.strip()).verify_password("argv pw")


def test_empty_password_and_bad_iterations_are_refused():
    assert run([], "\n") == (1, "", "pgtwist-passwd: empty password (PostgreSQL refuses those too)\n")
    assert run(["--iterations", "0"], "pw\n")[0] == 2


def test_module_runs_as_a_command():
    result = subprocess.run(
        [sys.executable, "-m", "pgtwist.tools.passwd", "--iterations", "16"],
        input="from stdin\n", capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert ScramVerifier.parse(result.stdout.strip()).verify_password("from stdin")


def test_console_script_is_declared():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    assert "pgtwist-passwd = pgtwist.tools.passwd:main" in scripts
    assert "pgtwist = pgtwist.tools.cli:main" in scripts  # `pgtwist passwd` too
