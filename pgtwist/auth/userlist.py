"""auth_file: PgBouncer's userlist.txt format ("user" "secret" per line), parsed without I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["UserlistEntry", "UserlistError", "parse_userlist"]

# PgBouncer's MAX_USERNAME / MAX_PASSWORD are in this range; a line past them is not a userlist.
MAX_USER_BYTES = 128
MAX_SECRET_BYTES = 2048


class UserlistError(ValueError):
    """A line PgBouncer would call a "broken auth file"; str() names the line, never a secret."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class UserlistEntry:
    user: str
    secret: str = field(repr=False)
    line: int


def _quoted(text: str, start: int, line: int, what: str) -> tuple[str, int]:
    """The quoted string opening at text[start] ('"'), with "" read as one quote; and the index after it."""
    out = []
    i = start + 1
    while True:
        end = text.find('"', i)
        if end < 0:
            raise UserlistError(line, f"the {what} has no closing double quote")
        out.append(text[i:end])
        if text.startswith('"', end + 1):  # "" inside quotes is a literal quote, as in PgBouncer
            out.append('"')
            i = end + 2
            continue
        return "".join(out), end + 1


def parse_userlist(text: str) -> list[UserlistEntry]:
    """Parse an auth_file's text into entries, in file order; raise UserlistError on a broken line.

    As PgBouncer reads it: blank lines and lines starting with ';' are skipped; every other line
    is `"user" "secret"` (whitespace between them), anything after the secret is ignored; a
    double quote inside a value is written twice. Unlike PgBouncer, which stops reading at the
    first broken line and keeps the users before it, a broken line is an error here: a userlist
    read in half would lock out whoever comes after it without a word.
    """
    entries: list[UserlistEntry] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if not line.startswith('"'):
            raise UserlistError(number, 'expected "user" "secret" (double-quoted), or a comment starting with ";"')
        user, i = _quoted(line, 0, number, "user name")
        rest = line[i:]
        stripped = rest.lstrip()
        if not stripped.startswith('"'):
            what = "nothing" if not stripped else "something else"
            raise UserlistError(number, f"expected the secret in double quotes after the user name, found {what}")
        secret, _ = _quoted(stripped, 0, number, "secret")
        if len(stripped) == len(rest):
            raise UserlistError(number, "user name and secret must be separated by whitespace")
        if not user:
            raise UserlistError(number, "empty user name")
        if len(user.encode()) > MAX_USER_BYTES:
            raise UserlistError(number, f"user name longer than {MAX_USER_BYTES} bytes")
        if len(secret.encode()) > MAX_SECRET_BYTES:
            raise UserlistError(number, f"secret longer than {MAX_SECRET_BYTES} bytes")
        entries.append(UserlistEntry(user, secret, number))
    return entries
