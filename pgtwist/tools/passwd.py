"""`python -m pgtwist.tools.passwd` / `pgtwist-passwd`: a password in, a SCRAM-SHA-256 verifier for the config out."""

from __future__ import annotations

import argparse
import getpass
import sys

from pgtwist.auth import ScramVerifier
from pgtwist.auth.credentials import DEFAULT_ITERATIONS, MAX_VERIFIER_ITERATIONS

DESCRIPTION = (
    "Print the SCRAM-SHA-256 verifier of a password, as PostgreSQL stores it in pg_authid, for "
    "`password =` in [users.NAME] or a line of auth_file. The password is read from the terminal "
    "(asked twice) or, when stdin is not a terminal, from its first line."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgtwist-passwd", description=DESCRIPTION)
    parser.add_argument(
        "user",
        nargs="?",
        help='print an auth_file line ("user" "verifier") instead of the bare verifier',
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=DEFAULT_ITERATIONS,
        help=f"PBKDF2 rounds (default {DEFAULT_ITERATIONS}, PostgreSQL's scram_iterations default)",
    )
    parser.add_argument(
        "--password",
        help="the password itself (visible to other users in ps and kept in shell history: avoid)",
    )
    return parser


def _quote(value: str) -> str:
    # auth_file quoting, as PgBouncer reads it: a double quote inside is written twice.
    return '"' + value.replace('"', '""') + '"'


def read_password(stdin, stderr) -> str:
    """From a terminal: asked twice, without echo. Otherwise: stdin's first line, without its line end."""
    if stdin.isatty():
        first = getpass.getpass("Password: ", stream=stderr)
        again = getpass.getpass("Again: ", stream=stderr)
        if first != again:
            raise ValueError("the passwords differ")
        return first
    line = stdin.readline()
    line = line[:-1] if line.endswith("\n") else line
    return line[:-1] if line.endswith("\r") else line  # (a file written on Windows)


def main(argv: list[str] | None = None, stdin=None, stdout=None, stderr=None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = _parser().parse_args(argv)
    if not 1 <= args.iterations <= MAX_VERIFIER_ITERATIONS:
        stderr.write(f"pgtwist-passwd: --iterations must be between 1 and {MAX_VERIFIER_ITERATIONS}\n")
        return 2
    if args.password is not None:
        stderr.write("pgtwist-passwd: warning: a password given with --password is visible in the process list and shell history\n")
        password = args.password
    else:
        try:
            password = read_password(stdin, stderr)
        except (ValueError, EOFError, KeyboardInterrupt) as e:
            stderr.write(f"pgtwist-passwd: {e or 'no password read'}\n")
            return 1
    if not password:
        stderr.write("pgtwist-passwd: empty password (PostgreSQL refuses those too)\n")
        return 1
    verifier = ScramVerifier.from_password(password, iterations=args.iterations).to_text()
    stdout.write((f"{_quote(args.user)} {_quote(verifier)}" if args.user else verifier) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
