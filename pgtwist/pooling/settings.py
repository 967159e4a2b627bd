"""Session settings that follow a client: startup parameters, and the SQL that applies or reads them back."""

from __future__ import annotations


from pgtwist.frontend.login import LoginError
from pgtwist.wire import sqlstate

# Startup parameters that are not session settings.
_NOT_SETTINGS = frozenset(("user", "database", "replication", "options"))
# Reported by the server but not the client's to set: never replayed on another connection.
SERVER_OWNED = frozenset(
    ("server_version", "server_encoding", "integer_datetimes", "is_superuser", "session_authorization", "in_hot_standby")
)


def quote_literal(value: str) -> str:
    """An E'' literal safe whatever standard_conforming_strings says (client values never reach SQL raw)."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_name(name: str) -> str:
    """A setting name as RESET takes it: each dotted part a quoted identifier."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def parse_options(options: str) -> dict[str, str]:
    """The 'options' startup parameter: '-c name=value' and '--name=value', backslash-escaped spaces."""
    words, word, escaped = [], [], False
    for ch in options:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
    if word:
        words.append("".join(word))
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            setting, i = words[i + 1], i + 2
        elif w.startswith("--"):
            setting, i = w[2:], i + 1
        elif w.startswith("-c"):
            setting, i = w[2:], i + 1
        else:
            raise LoginError(sqlstate.FEATURE_NOT_SUPPORTED, f'unsupported startup option "{w}"', "pgtwist accepts only -c name=value")
        name, eq, value = setting.partition("=")
        if not eq or not name:
            raise LoginError(sqlstate.PROTOCOL_VIOLATION, f'invalid option "{setting}": expected name=value')
        out[name.replace("-", "_").lower()] = value
    return out


def client_settings(parameters: dict[str, str]) -> dict[str, str]:
    """Session settings a client asked for at startup, as name -> value."""
    settings = {k.lower(): v for k, v in parameters.items() if k not in _NOT_SETTINGS}
    if parameters.get("options"):
        settings.update(parse_options(parameters["options"]))
    return settings


def sync_sql(wanted: dict[str, str], applied: dict[str, str], reported: dict[str, str]) -> list[str] | None:
    """The statements that turn a server session holding *applied* (beyond its defaults) into one
    holding *wanted* (one at a time: they run as a batch of extended-protocol statements).

    set_config() takes a value as a startup packet would (a list for search_path, not one
    quoted name); names and values are quoted as data, never spliced in as SQL.
    """
    resets = [f"RESET {quote_name(name)}" for name in applied if name not in wanted]
    reported_lower = {k.lower(): v for k, v in reported.items()}
    calls = [
        f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"
        for name, value in wanted.items()
        if applied.get(name, reported_lower.get(name)) != value
    ]
    if calls:
        resets.append("SELECT " + ", ".join(calls))
    return resets or None


def readback_sql(names: list[str]) -> str:
    """One row with the current value of each setting, in order (NULL for an unknown custom one)."""
    return "SELECT " + ", ".join(f"pg_catalog.current_setting({quote_literal(n)}, true)" for n in names)
