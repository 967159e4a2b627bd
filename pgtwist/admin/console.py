"""The `pgbalance` admin database: SHOW/RELOAD/PAUSE/RESUME/KILL/SHUTDOWN answered as real result sets.

`run(proxy, sql)` turns command text into results (pure but for the actions it performs);
`AdminConsole` speaks the protocol for one logged-in admin session, simple and extended
query alike, so psql and drivers (psycopg, asyncpg...) can read the answers.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.python import failure
from twisted.logger import Logger

from pgtwist import config as configmod
from pgtwist.admin import actions, bouncer, columns, inspect, totals
from pgtwist.frontend.login import LoginError
from pgtwist.wire import frontend
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import PgError
from pgtwist.wire.framing import pop_message

log = Logger()

DATABASE = configmod.ADMIN_DATABASE
DATABASES = configmod.ADMIN_DATABASES  # "pgbalance" and PgBouncer's "pgbouncer"
_MAX_MESSAGE = 1 << 20
_COPY = frozenset((p.COPY_DATA, p.COPY_DONE, p.COPY_FAIL))
_OIDS = {str: m.OID_TEXT, int: m.OID_INT8, float: m.OID_FLOAT8, bool: m.OID_BOOL} | {k: k.oid for k in columns.KINDS}
_Q8, _D8 = struct.Struct("!q"), struct.Struct("!d")
SYNTAX_ERROR = sqlstate.SYNTAX_ERROR
CONFIG_FILE_ERROR = sqlstate.CONFIG_FILE_ERROR

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
    ("SHOW VERSION", "pgtwist's version"),
    ("SHOW LISTS", "counts of databases, users, pools, clients, servers"),
    ("SHOW DATABASES", "configured databases (PgBouncer's columns)"),
    ("SHOW USERS", "configured users"),
    ("SHOW CLIENTS", "client connections"),
    ("SHOW SERVERS", "server connections"),
    ("SHOW POOLS", "pools per (database, user)"),
    ("SHOW NODE_POOLS", "pools per (database, user, node)"),
    ("SHOW NODES", "nodes, roles, health and lag"),
    ("SHOW STATS", "per database: totals since start and averages (bytes, microseconds)"),
    ("SHOW STATS_TOTALS", "the totals of SHOW STATS"),
    ("SHOW STATS_AVERAGES", "the averages of SHOW STATS"),
    ("SHOW TOTALS", "pgtwist-wide totals since start"),
    ("SHOW CONFIG", "effective settings"),
    ("SHOW MEM", "live objects and peak memory"),
    ("SHOW FDS", "open sockets"),
    ("SHOW PREPARED", "named prepared statements"),
    ("SHOW HELP", "this list"),
    ("RELOAD", "re-read the configuration file and apply it"),
    ("PAUSE [db]", "wait for open transactions to end, then stop handing out server connections"),
    ("RESUME [db]", "undo PAUSE"),
    ("RECONNECT [db]", "close server connections once their clients are done with them"),
    ("DISABLE db / ENABLE db", "refuse / accept new clients of db"),
    ("KILL db", "disconnect every client and server connection of db"),
    ("KILL client", "disconnect a client (FATAL 57P01)"),
    ("WAIT_CLOSE [db]", "wait until RECONNECT'ed server connections are closed"),
    ("SET key = value", "change a setting a reload can change, until the next reload"),
    ("SHUTDOWN", "drain: let open transactions finish, then exit"),
)


@dataclass
class Result:
    """One statement's answer: rows (None for commands without a result set) and the command tag."""

    tag: str
    columns: tuple = ()
    rows: list = field(default_factory=list)
    notices: list = field(default_factory=list)
    # PAUSE, WAIT_CLOSE, and under workers = N what the other workers are asked: the answer is sent
    # when this fires (the session reads nothing more till then); a CommandError it fails with is
    # the answer instead.
    wait: object = None

    @property
    def has_rows(self) -> bool:
        return bool(self.columns)


class CommandError(PgError):
    """An admin command refused: an ERROR, and the console session goes on."""


def _table(columns, rows: list[dict]) -> Result:
    names = [name for name, _ in columns]
    return Result("SHOW", tuple(columns), [[row.get(name) for name in names] for row in rows])


_HELP_COLUMNS = (("command", str), ("does", str))
# SHOW name -> (columns, view(proxy) -> rows)
_SHOW = {
    "VERSION": (bouncer.VERSION_COLUMNS, bouncer.version),
    "LISTS": (bouncer.LISTS_COLUMNS, bouncer.lists),
    "DATABASES": (bouncer.DATABASES_COLUMNS, bouncer.databases),
    "USERS": (bouncer.USERS_COLUMNS, bouncer.users),
    "CLIENTS": (bouncer.CLIENTS_COLUMNS, bouncer.clients),
    "SERVERS": (bouncer.SERVERS_COLUMNS, bouncer.servers),
    "POOLS": (bouncer.POOLS_COLUMNS, bouncer.pools),
    "NODE_POOLS": (inspect.POOL_COLUMNS, inspect.pools),
    "NODES": (inspect.NODE_COLUMNS, inspect.nodes),
    "STATS": (bouncer.STATS_COLUMNS, bouncer.stats),
    "STATS_TOTALS": (bouncer.STATS_TOTALS_COLUMNS, bouncer.stats_totals),
    "STATS_AVERAGES": (bouncer.STATS_AVERAGES_COLUMNS, bouncer.stats_averages),
    "TOTALS": (inspect.KEY_VALUE_COLUMNS, inspect.stats),
    "CONFIG": (bouncer.CONFIG_COLUMNS, bouncer.config),
    "MEM": (bouncer.MEM_COLUMNS, bouncer.mem),
    "FDS": (bouncer.FDS_COLUMNS, bouncer.fds),
    "PREPARED": (inspect.PREPARED_COLUMNS, inspect.prepared),
    "HELP": (_HELP_COLUMNS, lambda proxy: [{"command": c, "does": d} for c, d in HELP]),
}
# SHOW views that list every worker's rows under workers = N: name -> the view a worker serves.
# (PgBouncer's views of counts add the workers' rows up instead: admin.totals.MERGED.)
# MEM, FDS and PREPARED are each process's own (its memory, its sockets, its connections' statements).
PER_WORKER = {
    "CLIENTS": "bouncer.clients", "SERVERS": "bouncer.servers", "NODE_POOLS": "inspect.pools", "NODES": "inspect.nodes",
    "MEM": "bouncer.mem", "FDS": "bouncer.fds", "PREPARED": "inspect.prepared",
}  # fmt: skip
_WORDS = re.compile(r"\S+")


def split_statements(sql: str) -> list[str]:
    """Admin commands have no quoted text: a plain split on ';' is enough."""
    return [s.strip() for s in sql.split(";")]


def describe(sql: str, proxy=None) -> tuple | None:
    """The columns *sql* would return, without running it (None: a command without rows)."""
    words = _WORDS.findall(sql.upper().strip().rstrip(";"))
    if len(words) == 2 and words[0] == "SHOW" and words[1] in _SHOW:
        columns = _SHOW[words[1]][0]
        if words[1] in PER_WORKER and getattr(proxy, "worker", None) is not None:
            from pgtwist.service.peers import WORKER_COLUMN

            columns = tuple(columns) + (WORKER_COLUMN,)
        return columns
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
        columns, rows = view
        link = getattr(proxy, "worker", None)
        if link is not None and what in totals.MERGED:
            # workers = N: one row per key, every worker's counts added up (admin.totals).
            served, merge = totals.MERGED[what]
            return _gathered(columns, link.every_worker(served, rows(proxy)), merge, "its counts are missing")
        if what not in PER_WORKER or link is None:
            return _table(columns, rows(proxy))
        # workers = N: every worker's rows, with a worker column (pgtwist.service.peers).
        from pgtwist.service.peers import WORKER_COLUMN

        return _gathered(tuple(columns) + (WORKER_COLUMN,), link.every_worker(PER_WORKER[what], rows(proxy)), list, "its rows are missing")
    if verb == "SET":
        return _set(proxy, sql)
    if verb == "RESET":
        return Result(verb)  # drivers reset things at connect time; nothing here depends on them
    database = args[0] if args else None
    # A waiting PAUSE stops looking once the operator who asked has gone (the pause itself stays).
    watcher = (lambda: session.state != "closed") if session is not None else None
    try:
        if verb in ("PAUSE", "RESUME", "RECONNECT", "WAIT_CLOSE") and len(args) > 1:
            raise CommandError(SYNTAX_ERROR, f"usage: {verb} [database]")
        if verb in ("DISABLE", "ENABLE") and len(args) != 1:
            raise CommandError(SYNTAX_ERROR, f"usage: {verb} database")
        link = getattr(proxy, "worker", None)  # (workers = N: every worker pauses, or resumes)
        if verb == "PAUSE":
            paused = actions.pause_and_wait(proxy, database, watcher)
            if link is None:
                return Result(verb, wait=paused)
            return _paused_everywhere(Result(verb), link, database, paused)
        if verb == "RESUME":
            actions.resume(proxy, database)
            return _everywhere(Result(verb), link, "resume", database, notice="not resumed there")
        if verb == "RECONNECT":
            actions.reconnect(proxy, database)
            return _everywhere(Result(verb), link, "reconnect", database)
        if verb == "WAIT_CLOSE":
            return Result(verb, wait=actions.wait_close(proxy, database, watcher))
        if verb == "DISABLE":
            actions.disable(proxy, database)
            return _everywhere(Result(verb), link, "disable", database)
        if verb == "ENABLE":
            actions.enable(proxy, database)
            return _everywhere(Result(verb), link, "enable", database)
        if verb == "KILL" and len(args) == 1 and args[0] in proxy.config.databases:
            actions.kill_database(proxy, args[0])  # PgBouncer: KILL db; a client id is not a database name
            return _everywhere(Result(verb), link, "kill_database", args[0])
    except actions.ActionError as e:
        raise CommandError(sqlstate.INVALID_CATALOG_NAME, str(e)) from None
    if verb in ("KILL", "KILL_CLIENT"):
        if len(args) != 1:
            raise CommandError(SYNTAX_ERROR, "usage: KILL database | KILL client_id (SHOW CLIENTS lists them)")
        if session is not None and args[0] == session.id:
            raise CommandError(sqlstate.FEATURE_NOT_SUPPORTED, "this is your own connection; disconnect instead")
        unknown = CommandError(sqlstate.UNDEFINED_OBJECT, f'no database or client "{args[0]}"')
        if actions.kill(proxy, args[0]):
            return Result("KILL")
        link = getattr(proxy, "worker", None)  # (workers = N: a client of another worker is killed there)
        if link is None:
            raise unknown

        def killed(there: bool | None) -> None:
            if there is None:
                worker = args[0].partition(".")[0][1:]
                raise CommandError(sqlstate.SYSTEM_ERROR, f"worker {worker} did not answer: client {args[0]} not killed", "Try again.")
            if not there:
                raise unknown

        return Result("KILL", wait=link.kill_elsewhere(args[0]).addCallback(killed))
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


_SET = re.compile(r"SET\s+(?:SESSION\s+|LOCAL\s+)?([A-Za-z_][A-Za-z_0-9.]*)\s*(?:=|\s+TO\s+)\s*(.*)$", re.IGNORECASE | re.DOTALL)


def _everywhere(result: Result, link, action: str, *parts: str | None, notice: str = "not done there") -> Result:
    """workers = N: a command done on this worker is done on the others too (each pgtwist worker
    has its own pools and clients; the operator asked the one pgtwist); the answer waits for them
    (Result.wait), and a notice names any that did not answer."""
    if link is not None:

        def told(missing: list[int]) -> None:
            result.notices += [f"worker {i} did not answer: {notice}" for i in missing]

        result.wait = link.everywhere(action, *(x or "" for x in parts)).addCallback(told)
    return result


def _paused_everywhere(result: Result, link, database: str | None, paused) -> Result:
    """workers = N: PAUSE is told to every worker, then answered once it is complete on each that
    took it (no server connection of the database left there) and here (*paused*), as
    PgBouncer's PAUSE answers once it is complete."""

    def told(missing: list[int]):
        result.notices += [f"worker {i} did not answer: not paused there" for i in missing]
        answered = [i for i in link.others() if i not in missing]
        return link.paused_everywhere(database or "", answered).addCallback(complete)

    def complete(unsaid: list[int]) -> None:
        result.notices += [f"worker {i} did not say its pause was complete" for i in unsaid]

    everywhere = link.everywhere("pause", database or "").addCallback(told)
    result.wait = defer.gatherResults([paused, everywhere], consumeErrors=True)
    return result


def _gathered(columns, asked, merge, notice: str) -> Result:
    """workers = N: a SHOW answered once the other workers' rows are in (*asked*: WorkerLink.every_worker);
    *merge* makes the rows shown of every worker's (admin.totals adds counts up)."""
    result = Result("SHOW", tuple(columns))

    def fill(answer) -> None:
        every, missing = answer
        result.rows = _table(columns, merge(every)).rows
        result.notices += [f"worker {i} did not answer: {notice}" for i in missing]

    result.wait = asked.addCallback(fill)
    return result


def _set(proxy, sql: str) -> Result:
    """SET key = value: a reloadable pgtwist setting (until the next RELOAD); anything else a driver
    sets at connect time (client_encoding, extra_float_digits...) is accepted and changes nothing."""
    match = _SET.match(sql)
    if match is None:
        return Result("SET")
    key, value = match.group(1).lower(), match.group(2).strip()
    config = proxy.config
    if not any(f == key for f in configmod.flatten(config)):
        return Result("SET")
    try:
        actions.set_setting(proxy, key, value, getattr(proxy, "service", None))
    except KeyError:
        why = "it needs a restart" if configmod.needs_restart(key) else "SET changes only top-level settings a reload applies; edit the file and RELOAD"
        raise CommandError(sqlstate.CANT_CHANGE_RUNTIME_PARAM, f'parameter "{key}" cannot be changed now: {why}') from None
    except actions.ActionError as e:
        raise CommandError(sqlstate.INVALID_PARAMETER_VALUE, str(e)) from None
    return _everywhere(Result("SET"), getattr(proxy, "worker", None), "set", key, value)


def _service(proxy):
    service = proxy.service
    if service is None:
        raise CommandError(sqlstate.FEATURE_NOT_SUPPORTED, "not available: this proxy runs without its service")
    return service


# -- encoding ----------------------------------------------------------------------------------


def _text(value, kind=None) -> bytes | None:
    if value is None:
        return None
    if kind is columns.Bytea:
        return columns.Bytea.text(value)
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
    if kind in columns.KINDS:
        return kind.binary(value)
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
            values.append(_binary(value, kind) if _format_of(list(formats), i) == 1 else _text(value, kind))
        out.append(m.data_row(values))
    return b"".join(out)


def encode_complete(result: Result) -> bytes:
    tag = f"{result.tag} {len(result.rows)}" if result.has_rows else result.tag
    notices = b"".join(m.notice_response(sqlstate.SUCCESSFUL_COMPLETION, n) for n in result.notices)
    return notices + m.command_complete(tag)


def encode_error(e: CommandError) -> bytes:
    return e.encode()


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
        self.pending = None  # a PAUSE / WAIT_CLOSE being waited for: later messages wait in the buffer
        self.settled = None  # (then, outcome) of a held command whose wait fired: answered by got_data
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
        try:
            if self.settled is not None:
                then, outcome = self.settled
                self.settled = None
                then(out, self._error_of(outcome))
            while self.pending is None and not self.closed and (msg := pop_message(self.buffer, _MAX_MESSAGE)) is not None:
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
        finally:
            # (Before the FATAL of a message that fails: the answers to those before it, as PostgreSQL gives them.)
            self._write(out)

    def connection_lost(self) -> None:
        """The admin left: what a held command waits for is called off (the other workers'
        requests are hung up on, so they stop waiting too); what it did stays done."""
        self.closed = True
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()

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
            self._error(e, out)
            self.failed = True

    def _error(self, e: CommandError, out: list[bytes]) -> None:
        self.proxy.counters.error(e.sqlstate)
        out.append(encode_error(e))

    def _hold(self, wait, then, out: list[bytes]) -> tuple[bool, CommandError | None]:
        """A command's answer that waits for *wait* (Result.wait). Returns (True, error) when it
        has fired already (error: the CommandError it failed with, or None): the caller answers
        at once, in line, as for any command. Else (False, None): what the client sends
        meanwhile waits, and *then(out, error)* answers once it fires, from got_data (through the
        session, so that what the client sent meanwhile is refused as any bytes of it would be).
        Either way no answer overtakes another: the in-line one joins *out*, and *out* is written
        (got_data) before a later one can be."""
        inline: list = []
        waiting = False

        def done(outcome):
            if not waiting:
                inline.append(outcome)  # (fired inside addBoth: fired already)
                return None
            self.pending = None
            if self.closed or self.session.state == "closed":
                return None
            self.settled = (then, outcome)
            self.session.got_data(b"")
            return None

        wait.addBoth(done)
        if inline:
            return True, self._error_of(inline[0])
        waiting = True
        self.pending = wait
        return False, None

    def _error_of(self, outcome) -> CommandError | None:
        """The CommandError a held command's wait failed with (a bug's failure becomes one, logged), or None."""
        if not isinstance(outcome, failure.Failure):
            return None
        if outcome.check(CommandError):
            return outcome.value
        log.failure("admin console: a command's wait failed", outcome)
        return CommandError(sqlstate.INTERNAL_ERROR, "the command failed; the proxy log has the details")

    def _simple(self, sql: str, out: list[bytes]) -> None:
        statements = [s for s in split_statements(sql) if s]
        if not statements:
            out.append(m.empty_query_response())
        self._statements(statements, out)

    def _statements(self, statements: list[str], out: list[bytes]) -> None:
        while statements:
            statement = statements.pop(0)
            try:
                result = run(self.proxy, statement, self.session)
            except CommandError as e:
                self._error(e, out)
                break
            if result.wait is not None:
                def then(out, error, result=result):
                    if error is not None:
                        self._error(error, out)
                        out.append(m.ready_for_query())  # (the statements after an error are not run)
                        return
                    self._answer(result, out)
                    self._statements(statements, out)

                fired, error = self._hold(result.wait, then, out)
                if not fired:
                    return
                if error is not None:
                    self._error(error, out)
                    break
            self._answer(result, out)
        out.append(m.ready_for_query())

    def _answer(self, result: Result, out: list[bytes]) -> None:
        """A simple Query's answer to one statement: its RowDescription, then as Execute's."""
        if result.has_rows:
            out.append(encode_description(result.columns))
        self._executed(result, (), out)

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
            if result.wait is not None:
                def then(out, error):
                    if error is not None:
                        self._error(error, out)
                        self.failed = True
                        return
                    self._executed(result, portal.formats, out)

                fired, error = self._hold(result.wait, then, out)
                if not fired:
                    return
                if error is not None:
                    raise error  # (_message answers it and skips to Sync)
            self._executed(result, portal.formats, out)
        elif msg_type == p.CLOSE:
            kind, name = m.decode_target(body, "Close")
            (self.statements if kind == "S" else self.portals).pop(name, None)
            out.append(m.close_complete())
        else:
            raise CommandError(sqlstate.FEATURE_NOT_SUPPORTED, f"message type {chr(msg_type)!r} is not supported by the admin console")

    @staticmethod
    def _executed(result: Result, formats, out: list[bytes]) -> None:
        """Execute's answer: the rows (described at Describe), then CommandComplete."""
        if result.has_rows:
            out.append(encode_rows(result, formats))
        out.append(encode_complete(result))

    def _portal(self, name: str) -> _Portal:
        portal = self.portals.get(name)
        if portal is None:
            raise CommandError(sqlstate.INVALID_CURSOR_NAME, f'portal "{name}" does not exist')
        return portal
