"""The `pgbalance` admin database: SHOW/RELOAD/PAUSE/RESUME/KILL/SHUTDOWN answered as real result sets.

`run(proxy, sql)` turns command text into results (pure but for the actions it performs);
`AdminConsole` speaks the protocol for one logged-in admin session, simple and extended
query alike, so psql and drivers (psycopg, asyncpg...) can read the answers.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from twisted.logger import Logger

from pgtwist import config as configmod
from pgtwist.admin import actions, inspect
from pgtwist.frontend.login import LoginError
from pgtwist.wire import frontend
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.framing import pop_message

log = Logger()

DATABASE = configmod.ADMIN_DATABASE
_MAX_MESSAGE = 1 << 20
_COPY = frozenset((p.COPY_DATA, p.COPY_DONE, p.COPY_FAIL))
_OIDS = {str: m.OID_TEXT, int: m.OID_INT8, float: m.OID_FLOAT8, bool: m.OID_BOOL}
_Q8, _D8 = struct.Struct("!q"), struct.Struct("!d")
SYNTAX_ERROR = "42601"
CONFIG_FILE_ERROR = "F0000"

# What the console reports at login, so that drivers find the parameters they look for.
WELCOME_PARAMETERS = {
    "server_version": "16.0 (pgtwist admin console)",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "is_superuser": "off",
    "application_name": "",
}

HELP = (
    ("SHOW CLIENTS", "client connections"),
    ("SHOW SERVERS", "server connections"),
    ("SHOW POOLS", "pools per (database, user, node)"),
    ("SHOW NODES", "nodes, roles, health and lag"),
    ("SHOW STATS", "totals since start"),
    ("SHOW CONFIG", "effective settings"),
    ("SHOW PREPARED", "named prepared statements"),
    ("SHOW HELP", "this list"),
    ("RELOAD", "re-read the configuration file and apply it"),
    ("PAUSE [db]", "stop handing out server connections"),
    ("RESUME [db]", "undo PAUSE"),
    ("KILL client", "disconnect a client (FATAL 57P01)"),
    ("SHUTDOWN", "drain: let open transactions finish, then exit"),
)


@dataclass
class Result:
    """One statement's answer: rows (None for commands without a result set) and the command tag."""

    tag: str
    columns: tuple = ()
    rows: list = field(default_factory=list)
    notices: list = field(default_factory=list)

    @property
    def has_rows(self) -> bool:
        return bool(self.columns)


class CommandError(Exception):
    def __init__(self, code: str, message: str, detail: str | None = None):
        super().__init__(message)
        self.sqlstate = code
        self.message = message
        self.detail = detail


def _table(columns, rows: list[dict]) -> Result:
    names = [name for name, _ in columns]
    return Result("SHOW", tuple(columns), [[row.get(name) for name in names] for row in rows])


def _every_worker(proxy, what: str, columns) -> Result:
    """Under workers = N, every worker's rows and a worker column (pgtwist.service.workers); else this process's."""
    rows = getattr(inspect, what)(proxy)
    link = getattr(proxy, "worker", None)
    if link is None:
        return _table(columns, rows)
    from pgtwist.service.workers import WORKER_COLUMN

    rows, missing = link.every_worker(what, rows)
    result = _table(tuple(columns) + (WORKER_COLUMN,), rows)
    result.notices += [f"worker {i} did not answer: its rows are missing" for i in missing]
    return result


_SHOW = {
    "CLIENTS": lambda proxy: _every_worker(proxy, "clients", inspect.CLIENT_COLUMNS),
    "SERVERS": lambda proxy: _table(inspect.SERVER_COLUMNS, inspect.servers(proxy)),
    "POOLS": lambda proxy: _every_worker(proxy, "pools", inspect.POOL_COLUMNS),
    "NODES": lambda proxy: _every_worker(proxy, "nodes", inspect.NODE_COLUMNS),
    "STATS": lambda proxy: _table(inspect.KEY_VALUE_COLUMNS, inspect.stats(proxy)),
    "CONFIG": lambda proxy: _table(inspect.CONFIG_COLUMNS, inspect.config(proxy.config)),
    "PREPARED": lambda proxy: _table(inspect.PREPARED_COLUMNS, inspect.prepared(proxy)),
    "HELP": lambda proxy: _table((("command", str), ("does", str)), [{"command": c, "does": d} for c, d in HELP]),
}
_WORDS = re.compile(r"\S+")


def split_statements(sql: str) -> list[str]:
    """Admin commands have no quoted text: a plain split on ';' is enough."""
    return [s.strip() for s in sql.split(";")]


def describe(sql: str, proxy=None) -> tuple | None:
    """The columns *sql* would return, without running it (None: a command without rows)."""
    words = _WORDS.findall(sql.upper().strip().rstrip(";"))
    if len(words) == 2 and words[0] == "SHOW" and words[1] in _SHOW:
        if words[1] in ("CLIENTS", "POOLS", "NODES") and getattr(proxy, "worker", None) is not None:
            from pgtwist.service.workers import WORKER_COLUMN

            return describe(sql) + (WORKER_COLUMN,)
        return {
            "CLIENTS": inspect.CLIENT_COLUMNS,
            "SERVERS": inspect.SERVER_COLUMNS,
            "POOLS": inspect.POOL_COLUMNS,
            "NODES": inspect.NODE_COLUMNS,
            "STATS": inspect.KEY_VALUE_COLUMNS,
            "CONFIG": inspect.CONFIG_COLUMNS,
            "PREPARED": inspect.PREPARED_COLUMNS,
            "HELP": (("command", str), ("does", str)),
        }[words[1]]
    return None


def run(proxy, sql: str, session=None) -> Result:
    """Run one admin command; raises CommandError with the SQLSTATE to report."""
    sql = sql.strip().rstrip(";").strip()
    words = _WORDS.findall(sql)
    verb = words[0].upper() if words else ""
    args = words[1:]
    if verb == "SHOW":
        what = args[0].upper() if len(args) == 1 else ""
        view = _SHOW.get(what)
        if view is None:
            raise CommandError(SYNTAX_ERROR, f"unknown SHOW command: {sql}", "SHOW HELP lists the commands.")
        return view(proxy)
    if verb == "SET" or verb == "RESET":
        return Result(verb)  # drivers set things at connect time; nothing here depends on them
    if verb in ("PAUSE", "RESUME"):
        if len(args) > 1:
            raise CommandError(SYNTAX_ERROR, f"usage: {verb} [database]")
        try:
            (actions.pause if verb == "PAUSE" else actions.resume)(proxy, args[0] if args else None)
        except actions.ActionError as e:
            raise CommandError(sqlstate.INVALID_CATALOG_NAME, str(e)) from None
        result = Result(verb)
        link = getattr(proxy, "worker", None)  # (workers = N: every worker pauses, or resumes)
        if link is not None:
            result.notices += [f"worker {i} did not answer: not {verb.lower()}d there" for i in link.everywhere(verb.lower(), args[0] if args else "")]
        return result
    if verb == "KILL":
        if len(args) != 1:
            raise CommandError(SYNTAX_ERROR, "usage: KILL client_id (SHOW CLIENTS lists them)")
        if session is not None and args[0] == session.id:
            raise CommandError(sqlstate.FEATURE_NOT_SUPPORTED, "this is your own connection; disconnect instead")
        link = getattr(proxy, "worker", None)  # (workers = N: a client of another worker is killed there)
        if not actions.kill(proxy, args[0]) and (link is None or not link.kill_elsewhere(args[0])):
            raise CommandError(sqlstate.UNDEFINED_OBJECT, f'no client "{args[0]}"')
        return Result("KILL")
    if verb == "RELOAD" and not args:
        service = _service(proxy)
        outcome = service.reload()
        if not outcome.ok:
            raise CommandError(
                CONFIG_FILE_ERROR,
                f"configuration file {outcome.source} has {len(outcome.errors)} error(s); nothing changed",
                "\n".join(outcome.errors),
            )
        result = Result("RELOAD")
        if outcome.restart:
            result.notices.append("these settings need a restart to apply: " + ", ".join(outcome.restart))
        return result
    if verb == "SHUTDOWN" and not args:
        service = _service(proxy)
        # After this reply is written: the drain closes this session as one at rest.
        proxy.clock.callLater(0, service.shutdown, True)
        return Result("SHUTDOWN")
    raise CommandError(SYNTAX_ERROR, f"unknown admin command: {sql[:200]}", "SHOW HELP lists the commands.")


def _service(proxy):
    service = getattr(proxy, "service", None)
    if service is None:
        raise CommandError(sqlstate.FEATURE_NOT_SUPPORTED, "not available: this proxy runs without its service")
    return service


# -- encoding ----------------------------------------------------------------------------------


def _text(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    return str(value).encode()


def _binary(value, kind) -> bytes | None:
    if value is None:
        return None
    if kind is bool:
        return b"\x01" if value else b"\x00"
    if kind is int:
        return _Q8.pack(int(value))
    if kind is float:
        return _D8.pack(float(value))
    return str(value).encode()


def _coerce(value, kind):
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is str and isinstance(value, bool):
        return "true" if value else "false"
    try:
        return kind(value) if kind is not str else str(value)
    except (TypeError, ValueError):
        return None


def _format_of(formats: list[int], i: int) -> int:
    if not formats:
        return 0
    return formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)


def encode_description(columns, formats: list[int] = ()) -> bytes:
    return m.row_description(
        [(name, _OIDS.get(kind, m.OID_TEXT)) for name, kind in columns],
        [_format_of(list(formats), i) for i in range(len(columns))],
    )


def encode_rows(result: Result, formats: list[int] = ()) -> bytes:
    kinds = [kind for _, kind in result.columns]
    out = []
    for row in result.rows:
        values = []
        for i, (value, kind) in enumerate(zip(row, kinds)):
            value = _coerce(value, kind)
            values.append(_binary(value, kind) if _format_of(list(formats), i) == 1 else _text(value))
        out.append(m.data_row(values))
    return b"".join(out)


def encode_complete(result: Result) -> bytes:
    tag = f"{result.tag} {len(result.rows)}" if result.has_rows else result.tag
    notices = b"".join(m.notice_response(sqlstate.SUCCESSFUL_COMPLETION, n) for n in result.notices)
    return notices + m.command_complete(tag)


def encode_error(e: CommandError) -> bytes:
    return m.error_response("ERROR", e.sqlstate, e.message, e.detail)


# -- the protocol, for one session ------------------------------------------------------------


@dataclass
class _Portal:
    sql: str
    formats: list[int]
    result: Result | None = None


class AdminConsole:
    """One admin client after login. Built by the session when its dbname is `pgbalance`."""

    def __init__(self, session):
        proxy = session.proxy
        if session.user not in proxy.config.admin_users:
            raise LoginError(
                sqlstate.INSUFFICIENT_PRIVILEGE,
                f'permission denied for database "{DATABASE}"',
                f'User "{session.user}" is not listed in [admin] users.',
            )
        self.session = session
        self.proxy = proxy
        self.buffer = bytearray()
        self.statements: dict[str, str] = {}
        self.portals: dict[str, _Portal] = {}
        self.failed = False  # extended protocol: skip to Sync after an error
        self.closed = False
        log.info("client {client}: admin console for user {user}", client=session.id, user=session.user)

    def welcome(self, process_id: int, secret_key: bytes) -> bytes:
        params = dict(WELCOME_PARAMETERS, session_authorization=self.session.user)
        return (
            b"".join(m.parameter_status(k, v) for k, v in params.items())
            + m.backend_key_data(process_id, secret_key)
            + m.ready_for_query()
        )

    def got_data(self, data: bytes) -> None:
        """Client bytes; WireError propagates (the session answers it with FATAL 08P01)."""
        if self.closed:
            return
        self.buffer += data
        out: list[bytes] = []
        while (msg := pop_message(self.buffer, _MAX_MESSAGE)) is not None:
            msg_type, body = msg
            # What a node would refuse is refused here too, before any of it is looked at.
            frontend.check(msg_type, body)
            if msg_type in _COPY:
                continue  # outside COPY, PostgreSQL ignores these too
            if msg_type == p.TERMINATE:
                self._write(out)
                self.closed = True
                self.session.transport.loseConnection()
                return
            self._message(msg_type, body, out)
        self._write(out)

    def _write(self, out: list[bytes]) -> None:
        if out:
            self.session.transport.write(b"".join(out))
            out.clear()

    def _message(self, msg_type: int, body: bytes, out: list[bytes]) -> None:
        if msg_type == p.QUERY:
            self._simple(m.decode_query(body), out)
            return
        if msg_type == p.SYNC:
            self.failed = False
            self.portals.pop("", None)
            out.append(m.ready_for_query())
            return
        if msg_type == p.FLUSH or self.failed:
            return
        try:
            self._extended(msg_type, body, out)
        except CommandError as e:
            self.proxy.counters.error(e.sqlstate)
            out.append(encode_error(e))
            self.failed = True

    def _simple(self, sql: str, out: list[bytes]) -> None:
        statements = [s for s in split_statements(sql) if s]
        if not statements:
            out.append(m.empty_query_response())
        for statement in statements:
            try:
                result = run(self.proxy, statement, self.session)
            except CommandError as e:
                self.proxy.counters.error(e.sqlstate)
                out.append(encode_error(e))
                break
            if result.has_rows:
                out.append(encode_description(result.columns))
                out.append(encode_rows(result))
            out.append(encode_complete(result))
        out.append(m.ready_for_query())

    def _extended(self, msg_type: int, body: bytes, out: list[bytes]) -> None:
        if msg_type == p.PARSE:
            name, sql = m.decode_parse(body)
            if len([s for s in split_statements(sql) if s]) > 1:
                raise CommandError(SYNTAX_ERROR, "cannot insert multiple commands into a prepared statement")
            self.statements[name] = sql
            out.append(m.parse_complete())
        elif msg_type == p.BIND:
            portal, statement, params, formats = m.decode_bind(body)
            if statement not in self.statements:
                raise CommandError(sqlstate.INVALID_SQL_STATEMENT_NAME, f'prepared statement "{statement}" does not exist')
            if params:
                raise CommandError(SYNTAX_ERROR, "admin commands take no parameters")
            self.portals[portal] = _Portal(self.statements[statement], formats)
            out.append(m.bind_complete())
        elif msg_type == p.DESCRIBE:
            kind, name = m.decode_target(body, "Describe")
            if kind == "S":
                if name not in self.statements:
                    raise CommandError(sqlstate.INVALID_SQL_STATEMENT_NAME, f'prepared statement "{name}" does not exist')
                columns = describe(self.statements[name], self.proxy)
                out.append(m.parameter_description())
                out.append(encode_description(columns) if columns else m.no_data())
            else:
                portal = self._portal(name)
                columns = describe(portal.sql, self.proxy)
                if columns:
                    portal.result = run(self.proxy, portal.sql, self.session)  # SHOW only: no effects
                out.append(encode_description(columns, portal.formats) if columns else m.no_data())
        elif msg_type == p.EXECUTE:
            name, _max_rows = m.decode_execute(body)
            portal = self._portal(name)
            if not portal.sql.strip(" ;"):
                out.append(m.empty_query_response())
                return
            result = portal.result or run(self.proxy, portal.sql.strip().rstrip(";"), self.session)
            portal.result = None
            if result.has_rows:
                out.append(encode_rows(result, portal.formats))
            out.append(encode_complete(result))
        elif msg_type == p.CLOSE:
            kind, name = m.decode_target(body, "Close")
            (self.statements if kind == "S" else self.portals).pop(name, None)
            out.append(m.close_complete())
        else:
            raise CommandError(sqlstate.FEATURE_NOT_SUPPORTED, f"message type {chr(msg_type)!r} is not supported by the admin console")

    def _portal(self, name: str) -> _Portal:
        portal = self.portals.get(name)
        if portal is None:
            raise CommandError("34000", f'portal "{name}" does not exist')
        return portal
