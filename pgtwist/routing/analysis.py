"""One reading of a SQL text with PostgreSQL's own parser (pglast): whether it only reads (routing) and what it does to session state; one cache, one prefilter."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

from pglast.parser import ParseError, parse_sql_json

# We walk libpg_query's JSON tree rather than pglast's Python AST: building the AST objects
# costs ~5x more per statement (≈200 µs against ≈40 µs for a small SELECT), and every
# distinct SQL text a client sends goes through here once. Both questions (routing and session
# state) are answered from the one tree, and the answer is cached once, by text.

# Parsing costs ~2 µs per byte of SQL, all of it on the reactor thread: longer texts are
# routed by their first keyword only (a bulk INSERT must not stall every other client); they
# are still parsed when the prefilter says they may change session state, which must be known.
MAX_PARSE_LENGTH = 64 * 1024
# Only texts this short enter the cache, so it stays bounded (8192 x 4 KiB = 32 MiB at worst).
MAX_CACHED_LENGTH = 4 * 1024
_CACHE_SIZE = 8192


@dataclass(frozen=True)
class Classification:
    read_only: bool  # True only when PostgreSQL's parser says every statement only reads
    reason: str  # short, for logs/metrics/explain: "select", "insert", "writable CTE", "unparsable", ...
    tx: str | None = None  # transaction control: "begin", "begin_read_only", "commit", "set_transaction_read_only", ...
    hint: str | None = None  # "primary" | "replica" from a leading /* pgtwist:... */ comment
    functions: tuple[str, ...] = ()  # functions a read-only text calls, as written ("f" or "schema.f"), for the volatility check


# -- session effects: what they are -----------------------------------------------------------

# Cursor option bit of DECLARE ... WITH HOLD (CURSOR_OPT_HOLD in parsenodes.h).
_CURSOR_OPT_HOLD = 0x0020
_SESSION_LOCKS = frozenset(
    ("pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared")
)


# Statements that start with one of these may be DDL (or DO, which often is). A prefix test at
# each statement's start, not a substring test: "created_at" is in too many queries.
_DDL_WORDS = ("create", "alter", "drop", "do", "import")
# Top-level statements after which every prepared statement still means what it meant: all
# others (CREATE, ALTER, DROP, DO, IMPORT FOREIGN SCHEMA, SELECT INTO's CREATE TABLE AS...) count
# as DDL. Those that change only privileges, roles, comments, data or plans PostgreSQL re-makes
# itself are here; CALL too (what a procedure does inside, like a function's, is for PostgreSQL's
# errors and pgtwist's re-prepare on them).
_NOT_DDL = frozenset(
    (
        "SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "TransactionStmt",
        "VariableSetStmt", "VariableShowStmt", "ExplainStmt", "CopyStmt", "PrepareStmt", "ExecuteStmt",
        "DeallocateStmt", "DiscardStmt", "ListenStmt", "UnlistenStmt", "NotifyStmt", "LockStmt",
        "DeclareCursorStmt", "FetchStmt", "ClosePortalStmt", "CheckPointStmt", "VacuumStmt", "ClusterStmt",
        "ReindexStmt", "CallStmt", "LoadStmt", "ConstraintsSetStmt", "GrantStmt", "GrantRoleStmt",
        "CommentStmt", "SecLabelStmt", "TruncateStmt", "RefreshMatViewStmt", "AlterSystemStmt",
        "AlterDefaultPrivilegesStmt", "CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt", "DropRoleStmt",
        "CreatedbStmt", "DropdbStmt", "AlterDatabaseStmt", "AlterDatabaseSetStmt", "CreateTableSpaceStmt",
        "DropTableSpaceStmt", "ReassignOwnedStmt", "DropOwnedStmt", "AlterOwnerStmt",
    )
)


_DDL_WORD = re.compile(r"\b(?:create|alter|drop|do|import)\b")


def _starts_like_ddl(low: str) -> bool:
    """Whether a statement of the lowered text may start with a DDL word (cheap; over-approximated, never under).

    A ';' in a string may fool the split into a parse; a ';' in a comment could hide a
    statement's start from it, so text with a comment is judged by whole words instead.
    """
    if "--" in low or "/*" in low:
        return _DDL_WORD.search(low) is not None
    for part in low.split(";") if ";" in low else (low,):
        part = part.lstrip()
        if part.startswith(_DDL_WORDS):
            word = part.split(None, 1)[0] if part else ""
            if word in _DDL_WORDS or word.startswith("do$"):
                return True
    return False


class DdlStep(NamedTuple):
    """One DDL statement's part (or one object's, of a DROP) as far as temporary relations go.

    *op* is one of: CREATES a temporary relation *name* (CREATES_DROP: ON COMMIT DROP); ALTERS
    the relation *schema*.*name* ("" when unqualified; with *new*, an index it creates by that
    name); DROPS it; RENAMES it to *new*; SHARED, a change other sessions may see (anything
    else: a permanent relation, a function, a type, a DO block...); DISCARDS every temporary one.
    """

    op: str
    schema: str = ""
    name: str = ""
    new: str = ""


CREATES, CREATES_DROP, ALTERS, DROPS, RENAMES, SHARED, DISCARDS = (
    "creates", "creates_drop", "alters", "drops", "renames", "shared", "discards"
)
_SHARED_STEP = DdlStep(SHARED)
_DISCARD_STEP = DdlStep(DISCARDS)


@dataclass(frozen=True)
class SessionEffects:
    settings: frozenset[str] = frozenset()  # names a SET/RESET (not LOCAL) or set_config(..., false) changes
    all_settings: bool = False  # RESET ALL, DISCARD ALL, or set_config() with a computed name
    pin: str | None = None  # why the session cannot share its server connection any more
    deallocate: tuple[str, ...] = ()  # DEALLOCATE name
    deallocate_all: bool = False
    discard_all: bool = False
    statements: int = 1
    resets: tuple[str, ...] = ()  # RESET name / SET name TO DEFAULT (not LOCAL): back to the session default
    reset_all: bool = False  # RESET ALL or DISCARD ALL: every setting back to the session default
    assigned: frozenset[str] = frozenset()  # names given a value (SET name = v, set_config), not LOCAL
    # SET LOCAL synchronous_commit / set_config('synchronous_commit', v, true): the transaction's
    # commit may be asynchronous whatever the session's setting says (read-your-writes).
    local_commit_mode: bool = False
    ddl: bool = False  # may change what prepared statements mean (see _NOT_DDL); unparsable DDL-looking text too
    local_path: bool = False  # SET LOCAL search_path (or set_config(..., true) of it): a path for this transaction only
    # Databases no other session may be in for this to run (DROP DATABASE, ALTER DATABASE ...
    # RENAME TO or SET TABLESPACE, CREATE DATABASE ... TEMPLATE): pgtwist's idle connections
    # to them would make PostgreSQL refuse it (55006), where a direct client would succeed.
    frees: tuple[str, ...] = ()
    # What its DDL (and DISCARD TEMP/ALL) does as far as temporary relations go, statement by
    # statement in text order: whether other sessions can see it is the session's to judge, by
    # the temporary relations it made before (temporaries.Temporaries.after).
    ddl_steps: tuple[DdlStep, ...] = ()

    def to_restore(self, startup: dict[str, str]) -> set[str]:
        """Startup settings these statements return to the server's defaults, which the client's
        own session would have returned to their startup values instead. In a multi-statement
        text the order is unknown: a name it also assigns is left as the server ends with it."""
        if not startup or not (self.reset_all or self.resets):
            return set()
        names = set(startup) if self.reset_all else {n for n in self.resets if n in startup}
        if self.statements > 1:
            names -= self.assigned
        return names

    @property
    def changes_state(self) -> bool:
        return bool(
            self.settings
            or self.all_settings
            or self.pin
            or self.deallocate
            or self.deallocate_all
            or self.discard_all
            or self.ddl
            or self.local_path
            or bool(self.frees)
            or bool(self.ddl_steps)
        )


NO_EFFECTS = SessionEffects()
_UNPARSABLE_DDL = SessionEffects(ddl=True, ddl_steps=(_SHARED_STEP,))


@dataclass(frozen=True)
class Analysis:
    """What one parse of a text says: its routing classification (before any volatility check) and its session effects."""

    classification: Classification
    effects: SessionEffects = NO_EFFECTS
    # DEALLOCATE "7": a name made of digits, which the cache's key (integers as 0 or 1) loses.
    spelt_by_digits: bool = False


# -- the prefilter -------------------------------------------------------------------------------

# Only text containing one of these words can change session state; the rest skips the parser
# for that question. (Plain substring tests on the lowered text: a case-insensitive regex
# alternation costs ten times as much.)
_MAYBE = ("set", "discard", "deallocate", "listen", "temp", "hold", "prepare", "advisory", "role", "authorization", "load")
# ... but one plain SELECT/INSERT/UPDATE/DELETE statement can change it only by calling
# set_config() or an advisory lock, or by SELECT INTO TEMP ("u&": an identifier spelt with
# escapes could name any of them). "set" is in every UPDATE: it must not send them to the parser.
_DML_WORDS = frozenset(("select", "insert", "update", "delete"))
# One transaction-control word alone: its classification needs no parse.
_TX_WORDS = {"begin": "begin", "start transaction": "begin", "commit": "commit", "end": "commit", "rollback": "rollback", "abort": "rollback"}


def _prefilter(low: str) -> tuple[bool, Analysis | None]:
    """The one keyword test, on the lowered text (digits may have been taken out: no test here
    looks at them): whether it may change session state (if not, its effects are none), and for
    the commonest statements the whole analysis, when that needs no parse.

    A plain statement is one whose text starts with its keyword (no leading comment: a hint may
    be in it) and holds no ';' but at its end."""
    text = low.strip()
    if len(text) <= _TX_LONGEST:
        tx = _TX_WORDS.get(text.rstrip("; \t\r\n"))
        if tx is not None:
            return False, _TX_ANALYSES[tx]
    # (Tests written out, not looped over: this runs for every text not in the cache.)
    word = text[:6]
    if word in _DML_WORDS and text[6:7].isspace():
        semi = text.find(";")
        if semi < 0 or semi == len(text) - 1 or not text[semi:].strip("; \t\r\n"):
            if "set_config" in text or "advisory" in text or "temp" in text or "u&" in text:
                return True, None
            if word == "select" and "into" in text:
                return True, None  # (SELECT ... INTO t makes a table: DDL, as CREATE TABLE AS is)
            # (A SELECT's classification needs the parse: its functions, FOR UPDATE, INTO, or a
            # syntax error, which sends it to the primary. INSERT, UPDATE and DELETE go there
            # whatever they hold; an unparsable one is only called "insert", not "unparsable".)
            return False, _DML_ANALYSES.get(word)
    for kw in _MAYBE:
        if kw in text:
            return True, None
    if text.startswith("explain") and ("create" in text or "into" in text):
        return True, None  # (EXPLAIN ANALYZE CREATE TABLE ... AS, or of SELECT ... INTO: DDL, _executed)
    select = text.find("select")
    if select >= 0 and text.count("into", select) > text.count("insert into", select) + text.count("merge into", select):
        # Maybe SELECT ... INTO after a WITH or a comment. An INTO of INSERT or MERGE makes no
        # table: a WITH ... INSERT INTO ... SELECT, or a batch of INSERTs, is judged without a
        # parse, as before (a long one would be parsed on every Query, a varied one never cached).
        return True, None
    return _starts_like_ddl(text), None


_TX_ANALYSES = {tx: Analysis(Classification(True, "transaction control", tx=tx)) for tx in ("begin", "commit", "rollback")}
_DML_ANALYSES = {w: Analysis(Classification(False, w)) for w in ("insert", "update", "delete")}
_QUICK_FIRST = "iIuUdD"
_TX_LONGEST = 24  # ("START TRANSACTION;" with some blanks around)


# -- routing classification ----------------------------------------------------------------------

# Functions that write, take locks or touch state that lives on one server: a replica either
# refuses them or would answer for the wrong server. Checked by bare name whatever the schema
# (a user function shadowing one of these goes to the primary too: the safe direction).
_PRIMARY_FUNCTIONS = frozenset(
    (
        # sequences; currval/lastval read session state that only the nextval's server has
        "nextval", "setval", "currval", "lastval",
        "set_config", "pg_notify",
        # assign a transaction id
        "txid_current", "pg_current_xact_id",
        # the primary's WAL position: raise "recovery is in progress" on a replica
        "pg_current_wal_lsn", "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn",
        "pg_switch_wal", "pg_create_restore_point", "pg_logical_emit_message",
        "pg_create_physical_replication_slot", "pg_create_logical_replication_slot",
        "pg_drop_replication_slot", "pg_copy_physical_replication_slot", "pg_copy_logical_replication_slot",
        "pg_promote", "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf",
        # large objects: writers, and the descriptor calls that must follow lo_open's server
        "lo_create", "lo_creat", "lo_import", "lo_export", "lo_unlink", "lo_put", "lo_from_bytea",
        "lo_open", "lo_close", "lowrite", "loread", "lo_truncate", "lo_truncate64",
        "lo_lseek", "lo_lseek64", "lo_tell", "lo_tell64",
    )
)
# Advisory locks live in one server's lock table (session locks outlive the statement).
_PRIMARY_PREFIXES = ("pg_advisory_", "pg_try_advisory_")

# Built-ins that pg_proc marks volatile but that only read: an is_volatile() backed by pg_proc
# would otherwise send every SELECT random() to the primary.
_VOLATILE_READERS = frozenset(
    (
        "random", "random_normal", "clock_timestamp", "timeofday", "gen_random_uuid", "uuidv4", "uuidv7",
        "pg_sleep", "pg_sleep_for", "pg_sleep_until",
        "pg_is_in_recovery", "pg_last_wal_receive_lsn", "pg_last_wal_replay_lsn", "pg_last_xact_replay_timestamp",
        "pg_is_wal_replay_paused", "pg_get_wal_replay_pause_state",
        "txid_current_if_assigned", "pg_current_xact_id_if_assigned",
    )
)

_DML = {"InsertStmt": "insert", "UpdateStmt": "update", "DeleteStmt": "delete", "MergeStmt": "merge"}
_LOCKING = {
    "LCS_FORUPDATE": "SELECT FOR UPDATE",
    "LCS_FORNOKEYUPDATE": "SELECT FOR NO KEY UPDATE",
    "LCS_FORSHARE": "SELECT FOR SHARE",
    "LCS_FORKEYSHARE": "SELECT FOR KEY SHARE",
}
_TX_KINDS = {
    "TRANS_STMT_BEGIN": "begin",
    "TRANS_STMT_START": "begin",
    "TRANS_STMT_COMMIT": "commit",
    "TRANS_STMT_ROLLBACK": "rollback",
    "TRANS_STMT_SAVEPOINT": "savepoint",
    "TRANS_STMT_RELEASE": "release",
    "TRANS_STMT_ROLLBACK_TO": "rollback_to",
    "TRANS_STMT_PREPARE": "prepare_transaction",
    "TRANS_STMT_COMMIT_PREPARED": "commit_prepared",
    "TRANS_STMT_ROLLBACK_PREPARED": "rollback_prepared",
}
_TWO_PHASE = frozenset(("prepare_transaction", "commit_prepared", "rollback_prepared"))
# Statements that change no data and run on a hot standby as they are.
_HARMLESS = {
    "VariableShowStmt": "SHOW",
    "FetchStmt": "FETCH",
    "ClosePortalStmt": "CLOSE",
    "DiscardStmt": "DISCARD",
    "DeallocateStmt": "DEALLOCATE",
}
# Everything else is not read only; these just get a readable reason.
_OTHER = {
    "LockStmt": "LOCK",
    "DoStmt": "DO",
    "CallStmt": "CALL",
    "ListenStmt": "LISTEN",
    "UnlistenStmt": "UNLISTEN",
    "NotifyStmt": "NOTIFY",
    "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE",
    "CreateStmt": "CREATE TABLE",
    "CreateTableAsStmt": "CREATE TABLE AS",
    "IndexStmt": "CREATE INDEX",
    "AlterTableStmt": "ALTER TABLE",
    "DropStmt": "DROP",
    "TruncateStmt": "TRUNCATE",
    "GrantStmt": "GRANT",
    "VacuumStmt": "VACUUM",
    "CheckPointStmt": "CHECKPOINT",
    "LoadStmt": "LOAD",
}
# First keywords of texts too long to parse that surely write (anything else: "too long").
_WRITE_KEYWORDS = frozenset(
    ("insert", "update", "delete", "merge", "create", "alter", "drop", "truncate", "grant", "revoke", "copy",
     "lock", "do", "call", "vacuum", "analyze", "cluster", "reindex", "comment", "refresh", "security")
)

_HINT = re.compile(r"\s*pgtwist\s*:\s*(primary|replica)\b", re.IGNORECASE)
_SPACE = re.compile(r"\s*")
_WORD = re.compile(r"[A-Za-z_]+")
_TRUE_WORDS = frozenset(("on", "true", "yes", "1", "t", "y"))


def _leading(sql: str) -> tuple[str | None, int]:
    """The pgtwist hint in the leading comments (the first one wins) and where the first token starts."""
    hint = None
    pos = 0
    n = len(sql)
    while True:
        pos = _SPACE.match(sql, pos).end()
        if sql.startswith("/*", pos):
            end = sql.find("*/", pos + 2)
            body_end = n if end < 0 else end
            m = _HINT.match(sql, pos + 2, body_end)
            pos = n if end < 0 else end + 2
        elif sql.startswith("--", pos):
            end = sql.find("\n", pos)
            body_end = n if end < 0 else end
            m = _HINT.match(sql, pos + 2, body_end)
            pos = body_end
        else:
            return hint, pos
        if m and hint is None:
            hint = m.group(1).lower()


def _node(wrapper: dict) -> tuple[str, dict]:
    """Unwrap libpg_query's {"TypeName": {fields}} node form."""
    (kind, body), = wrapper.items()
    return kind, body


def _truthy(arg) -> bool:
    """A boolean option value as PostgreSQL reads it: a missing value means true."""
    if arg is None:
        return True
    kind, body = _node(arg)
    if kind == "A_Const":
        if "ival" in body:
            return bool(body["ival"].get("ival", 0))
        if "boolval" in body:
            return bool(body["boolval"].get("boolval", False))
        if "sval" in body:
            return body["sval"].get("sval", "").lower() in _TRUE_WORDS
        return False
    if kind == "Integer":
        return bool(body.get("ival", 0))
    if kind == "Boolean":
        return bool(body.get("boolval", False))
    if kind == "String":
        return body.get("sval", "").lower() in _TRUE_WORDS
    return False


def _read_only_option(options) -> bool | None:
    """transaction_read_only among TransactionStmt/SET TRANSACTION options: True, False, or None if absent."""
    value = None
    for opt in options or ():
        kind, body = _node(opt)
        if kind == "DefElem" and body.get("defname") == "transaction_read_only":
            value = _truthy(body.get("arg"))
    return value


@dataclass
class _Verdict:
    read_only: bool
    reason: str
    tx: str | None = None
    functions: tuple[str, ...] = ()


def _scan_query(tree) -> _Verdict:
    """Walk a query's whole tree (subqueries, CTEs, FROM functions) for anything that makes it write."""
    dml_cte = into = False
    locking: str | None = None
    writer: str | None = None
    functions: list[str] = []
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(reversed(x))  # left to right, so the first function named is the first written
            continue
        if not isinstance(x, dict):
            continue
        children = []
        for key, value in x.items():
            if key == "FuncCall":
                names = [n["String"].get("sval", "") for n in value.get("funcname", ()) if "String" in n]
                bare = names[-1] if names else ""
                if writer is None and (bare in _PRIMARY_FUNCTIONS or bare.startswith(_PRIMARY_PREFIXES)):
                    writer = bare
                functions.append(".".join(names))
            elif key == "LockingClause":
                locking = locking or _LOCKING.get(value.get("strength"), "SELECT FOR UPDATE")
            elif key == "CommonTableExpr":
                query = value.get("ctequery") or {}
                if any(k in _DML for k in query):
                    dml_cte = True
            elif key == "intoClause":
                into = True
            if isinstance(value, (dict, list)):
                children.append(value)
        stack.extend(reversed(children))
    if dml_cte:
        return _Verdict(False, "writable CTE")
    if into:
        return _Verdict(False, "SELECT INTO")
    if locking:
        return _Verdict(False, locking)
    if writer:
        return _Verdict(False, f"function {writer}")
    # Order kept for stable reasons; duplicates dropped.
    return _Verdict(True, "select", functions=tuple(dict.fromkeys(functions)))


def _statement(kind: str, body: dict) -> _Verdict:
    if kind == "SelectStmt":
        return _scan_query(body)
    if kind in _DML:
        return _Verdict(False, _DML[kind])
    if kind == "ExplainStmt":
        if not _explain_analyze(body):
            return _Verdict(True, "explain")  # plans only: runs nothing, a replica can plan a write
        inner = _statement(*_node(body["query"]))
        if inner.read_only:
            return _Verdict(True, "explain analyze", functions=inner.functions)
        return _Verdict(False, "EXPLAIN ANALYZE of a write")
    if kind == "TransactionStmt":
        tx = _TX_KINDS.get(body.get("kind"), "transaction")
        if tx == "begin" and _read_only_option(body.get("options")):
            tx = "begin_read_only"
        if tx in _TWO_PHASE:
            return _Verdict(False, "two-phase commit", tx=tx)
        return _Verdict(True, "transaction control", tx=tx)
    if kind == "VariableSetStmt":
        name = (body.get("name") or "").lower()
        vkind = body.get("kind", "VAR_SET_VALUE")
        reason = "RESET" if vkind in ("VAR_RESET", "VAR_RESET_ALL") else "SET"
        tx = None
        if name in ("transaction", "session characteristics"):
            if _read_only_option(body.get("args")):
                tx = "set_transaction_read_only"
        elif name in ("transaction_read_only", "default_transaction_read_only") and vkind == "VAR_SET_VALUE":
            args = body.get("args") or ()
            if len(args) == 1 and _truthy(args[0]):
                tx = "set_transaction_read_only"
        return _Verdict(True, reason, tx=tx)
    if kind in _HARMLESS:
        return _Verdict(True, _HARMLESS[kind])
    if kind == "DeclareCursorStmt":
        inner = _statement(*_node(body["query"]))
        return _Verdict(True, "DECLARE CURSOR", functions=inner.functions) if inner.read_only else inner
    if kind == "CopyStmt":
        if body.get("is_from"):
            return _Verdict(False, "COPY FROM")
        if "query" in body:
            inner = _statement(*_node(body["query"]))
            return _Verdict(True, "COPY TO", functions=inner.functions) if inner.read_only else inner
        return _Verdict(True, "COPY TO")
    return _Verdict(False, _OTHER.get(kind, kind))


def _routing(sql: str, stmts: list, hint: str | None) -> Classification:
    if not stmts:
        return Classification(True, "empty", hint=hint)  # only comments or semicolons
    verdicts = [_statement(*_node(s["stmt"])) for s in stmts]
    txs = [v.tx for v in verdicts if v.tx is not None]
    tx = _combined_tx(txs)
    writes = [v for v in verdicts if not v.read_only]
    if writes:
        reason = writes[0].reason if len(verdicts) == 1 else "multi-statement with a write"
        return Classification(False, reason, tx=tx, hint=hint)
    main = next((v for v in verdicts if v.reason not in ("transaction control", "SET", "RESET")), verdicts[0])
    functions = tuple(dict.fromkeys(f for v in verdicts for f in v.functions))
    return Classification(True, main.reason, tx=tx, hint=hint, functions=functions)


def _combined_tx(txs: list[str]) -> str | None:
    """One tx for a whole string: a BEGIN in it wins (that is what the string opens), else the last one."""
    if not txs:
        return None
    for i, tx in enumerate(txs):
        if tx in ("begin", "begin_read_only"):
            # BEGIN; SET TRANSACTION READ ONLY; ... opens a read-only transaction too.
            if tx == "begin" and "set_transaction_read_only" in txs[i + 1 :]:
                return "begin_read_only"
            return tx
    return txs[-1]


# -- session effects -----------------------------------------------------------------------------


def _back_to_login_role(kind: str, node: dict) -> bool:
    """RESET ROLE, SET ROLE NONE, SET role TO DEFAULT and the same of SESSION AUTHORIZATION: back to
    the role the connection logged in as, which every pooled connection of the user has (a
    connection a pinned session changed is reset or closed when it goes back to the pool): no
    state to keep, so no pin (an application's cleanup would otherwise pin every session)."""
    if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
        return True
    args = node.get("args") or ()
    if kind == "VAR_SET_VALUE" and node.get("name") == "role" and len(args) == 1:
        value = (args[0].get("A_Const") or {}).get("sval") or {}
        return value.get("sval") == "none"
    return False


def _temp(rel) -> bool:
    """A relation being made temporary: CREATE TEMP ..., or CREATE ... pg_temp.name (which is one as much)."""
    return isinstance(rel, dict) and (rel.get("relpersistence") == "t" or rel.get("schemaname") == TEMP_SCHEMA)


TEMP_SCHEMA = "pg_temp"
# Object kinds that are relations (which a session's temporary schema may hold), by DROP's and
# ALTER ... RENAME's names for them; and the renames of a relation's parts, which change it alone.
_RELATION_KINDS = frozenset(("OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_SEQUENCE", "OBJECT_INDEX"))
_RELATION_PARTS = frozenset(("OBJECT_COLUMN", "OBJECT_TABCONSTRAINT"))


def _ddl_steps(kind: str, body: dict) -> tuple[DdlStep, ...]:
    """What one top-level DDL statement does to temporary relations (DdlStep): SHARED for all it
    cannot tell is on them alone. Only relations count: a temporary function (pg_temp.f) or a
    view made temporary by the temporary table it reads (PostgreSQL's NOTICE) is SHARED."""
    if kind == "CreateStmt":
        return (_creates(body.get("relation"), body.get("oncommit")),)
    if kind == "CreateTableAsStmt":
        into = body.get("into") or {}
        return (_creates(into.get("rel"), into.get("onCommit")),)
    if kind == "ViewStmt":
        return (_creates(body.get("view"), None),)
    if kind == "CreateSeqStmt":
        return (_creates(body.get("sequence"), None),)
    if kind == "AlterTableStmt":
        return (_on(ALTERS, body.get("relation")),)
    if kind == "AlterSeqStmt":
        return (_on(ALTERS, body.get("sequence")),)
    if kind == "IndexStmt":
        # (An index lives in its table's schema: one on a temporary table is temporary, by its name too.)
        return (_on(ALTERS, body.get("relation"), body.get("idxname") or ""),)
    if kind == "RenameStmt":
        what = body.get("renameType")
        if what in _RELATION_KINDS:
            return (_on(RENAMES, body.get("relation"), body.get("newname") or ""),)
        if what in _RELATION_PARTS:
            return (_on(ALTERS, body.get("relation")),)
        return (_SHARED_STEP,)
    if kind == "DropStmt" and body.get("removeType") in _RELATION_KINDS:
        steps = []
        for obj in body.get("objects") or ():
            parts = [item.get("String", {}).get("sval", "") for item in obj.get("List", {}).get("items", ())]
            if not parts:
                return (_SHARED_STEP,)
            # (catalog.schema.name, schema.name or name.)
            steps.append(DdlStep(DROPS, parts[-2] if len(parts) > 1 else "", parts[-1]))
        return tuple(steps) or (_SHARED_STEP,)
    return (_SHARED_STEP,)


def _creates(rel, on_commit) -> DdlStep:
    """CREATE of *rel*: temporary (TEMP, or in pg_temp; PostgreSQL refuses TEMP in any other schema), or SHARED."""
    if not _temp(rel) or rel.get("schemaname", TEMP_SCHEMA) != TEMP_SCHEMA:
        return _SHARED_STEP
    return DdlStep(CREATES_DROP if on_commit == "ONCOMMIT_DROP" else CREATES, name=rel.get("relname", ""))


def _on(op: str, rel, new: str = "") -> DdlStep:
    if not isinstance(rel, dict) or not rel.get("relname"):
        return _SHARED_STEP
    return DdlStep(op, rel.get("schemaname", ""), rel["relname"], new)


def _const(arg) -> dict | None:
    """The body of an A_Const node, or None for anything else."""
    if isinstance(arg, dict) and len(arg) == 1 and "A_Const" in arg:
        return arg["A_Const"]
    return None


class _Collector:
    """Session effects gathered over a whole tree, nested statements included."""

    def __init__(self):
        self.settings: set[str] = set()
        self.all_settings = False
        self.pin: str | None = None
        self.deallocate: list[str] = []
        self.resets: list[str] = []
        self.deallocate_all = False
        self.discard_all = False
        self.reset_all = False
        self.assigned: set[str] = set()
        self.local_commit_mode = False
        self.local_path = False
        self.frees: list[str] = []

    def walk(self, tree) -> None:
        stack = [tree]
        while stack:
            x = stack.pop()
            if isinstance(x, list):
                stack.extend(reversed(x))  # in text order: the first pin named is the one kept
                continue
            if not isinstance(x, dict):
                continue
            children = []
            for key, value in x.items():
                visit = _VISITS.get(key)
                if visit is not None and isinstance(value, dict):
                    visit(self, value)
                if isinstance(value, (dict, list)):
                    children.append(value)
            stack.extend(reversed(children))

    def _pin(self, why: str) -> None:
        if self.pin is None:
            self.pin = why

    def variable_set(self, node: dict) -> None:
        kind = node.get("kind", "VAR_SET_VALUE")
        if kind == "VAR_RESET_ALL":
            self.all_settings = self.reset_all = True
            return
        name = (node.get("name") or "").lower()
        is_local = bool(node.get("is_local"))
        if name in ("role", "session_authorization"):
            if not is_local and not _back_to_login_role(kind, node):
                self._pin(f"SET {name.upper()}")
            return
        # (SET SESSION CHARACTERISTICS, named "session characteristics" by the parser, does not
        # match here: it changes default_transaction_* for the session, and is noted as a setting.)
        if name.startswith("transaction") or name == "session_characteristics":
            return
        if is_local and name == "synchronous_commit":
            self.local_commit_mode = True
        if is_local and name == "search_path":
            self.local_path = True
        if not is_local and name:
            self.settings.add(name)
            if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
                self.resets.append(name)
            else:
                self.assigned.add(name)

    def func_call(self, node: dict) -> None:
        names = node.get("funcname") or ()
        fname = names[-1].get("String", {}).get("sval", "").lower() if names else ""
        if fname in _SESSION_LOCKS:
            self._pin(f"session advisory lock ({fname})")
        elif fname == "set_config":
            args = node.get("args") or ()
            local = args[2] if len(args) > 2 else None
            local_const = _const(local)
            is_local = local_const is not None and local_const.get("boolval", {}).get("boolval") is True
            first = _const(args[0]) if args else None
            named = first is not None and "sval" in first
            name = first["sval"].get("sval", "").lower() if named else None
            if is_local or local is not None and local_const is None:
                # (A computed is_local may be true: for the commit's mode, assume it is.)
                if not named or name == "synchronous_commit":
                    self.local_commit_mode = True
            if is_local:
                if not named or name == "search_path":
                    self.local_path = True
                return
            if named:
                self.settings.add(name)
                self.assigned.add(name)
            else:
                self.all_settings = True

    def listen(self, node: dict) -> None:
        self._pin("LISTEN")

    def create_table(self, node: dict) -> None:
        if _temp(node.get("relation")):
            self._pin("temporary table")

    def create_sequence(self, node: dict) -> None:
        if _temp(node.get("sequence")):
            self._pin("temporary sequence")

    def create_view(self, node: dict) -> None:
        if _temp(node.get("view")):
            self._pin("temporary view")

    def into(self, node: dict) -> None:
        if _temp(node.get("rel")):
            self._pin("temporary table")

    def declare_cursor(self, node: dict) -> None:
        if (node.get("options") or 0) & _CURSOR_OPT_HOLD:
            self._pin("cursor WITH HOLD")

    def prepare(self, node: dict) -> None:
        self._pin("SQL PREPARE")

    def load(self, node: dict) -> None:
        self._pin("LOAD")

    def deallocate_stmt(self, node: dict) -> None:
        if node.get("name") is None or node.get("isall"):
            self.deallocate_all = True
        else:
            self.deallocate.append(node["name"])

    def discard(self, node: dict) -> None:
        if node.get("target") == "DISCARD_ALL":
            self.discard_all = True
            self.all_settings = self.reset_all = True

    def drop_database(self, node: dict) -> None:
        self.frees.append(node.get("dbname", ""))

    def rename(self, node: dict) -> None:
        if node.get("renameType") == "OBJECT_DATABASE":
            self.frees.append(node.get("subname", ""))

    def create_database(self, node: dict) -> None:
        for option in node.get("options") or ():
            definition = option.get("DefElem", {})
            if definition.get("defname") == "template":
                self.frees.append((definition.get("arg") or {}).get("String", {}).get("sval", ""))

    def alter_database(self, node: dict) -> None:
        if any(option.get("DefElem", {}).get("defname") == "tablespace" for option in node.get("options") or ()):
            self.frees.append(node.get("dbname", ""))

    def effects(self, stmts: list) -> SessionEffects:
        return SessionEffects(
            settings=frozenset(self.settings),
            all_settings=self.all_settings,
            pin=self.pin,
            deallocate=tuple(self.deallocate),
            deallocate_all=self.deallocate_all,
            discard_all=self.discard_all,
            statements=len(stmts),
            resets=tuple(self.resets),
            reset_all=self.reset_all,
            assigned=frozenset(self.assigned),
            local_commit_mode=self.local_commit_mode,
            ddl=any(_is_ddl(*_executed(s["stmt"])) for s in stmts),
            local_path=self.local_path,
            frees=tuple(name for name in self.frees if name),
            ddl_steps=_steps(stmts),
        )


def _explain_analyze(body: dict) -> bool:
    """Whether an EXPLAIN's options say ANALYZE: the statement is run, not only planned."""
    analyze = False
    for opt in body.get("options") or ():
        okind, obody = _node(opt)
        if okind == "DefElem" and obody.get("defname") == "analyze":
            analyze = _truthy(obody.get("arg"))
    return analyze


def _executed(stmt: dict) -> tuple[str, dict]:
    """A top-level statement as it runs: EXPLAIN ANALYZE runs the statement it explains (an
    EXPLAIN ANALYZE CREATE TABLE ... AS makes the table), a plain EXPLAIN nothing."""
    kind, body = _node(stmt)
    if kind == "ExplainStmt" and "query" in body and _explain_analyze(body):
        return _node(body["query"])
    return kind, body


def _is_ddl(kind: str, body: dict) -> bool:
    """Whether one top-level statement is DDL: not in _NOT_DDL, or a SELECT ... INTO, which
    makes a table as CREATE TABLE AS does (other sessions read it at once, from replicas too)."""
    return kind not in _NOT_DDL or (kind == "SelectStmt" and bool(body.get("intoClause")))


def _steps(stmts: list) -> tuple[DdlStep, ...]:
    """Every top-level statement's DdlSteps, in text order (SessionEffects.ddl_steps)."""
    steps: list[DdlStep] = []
    for s in stmts:
        kind, body = _executed(s["stmt"])
        if kind == "SelectStmt" and body.get("intoClause"):
            into = body["intoClause"]
            steps.append(_creates(into.get("rel"), into.get("onCommit")))
        elif kind not in _NOT_DDL:
            steps.extend(_ddl_steps(kind, body))
        elif kind == "DiscardStmt" and body.get("target") in ("DISCARD_TEMP", "DISCARD_ALL"):
            steps.append(_DISCARD_STEP)
    return tuple(steps)


# Node kinds (and the two IntoClause fields, which the tree holds unwrapped) -> what they do.
_VISITS = {
    "VariableSetStmt": _Collector.variable_set,
    "FuncCall": _Collector.func_call,
    "ListenStmt": _Collector.listen,
    "CreateStmt": _Collector.create_table,
    "CreateSeqStmt": _Collector.create_sequence,
    "ViewStmt": _Collector.create_view,
    "intoClause": _Collector.into,  # SELECT ... INTO
    "into": _Collector.into,  # CREATE TABLE ... AS
    "DeclareCursorStmt": _Collector.declare_cursor,
    "PrepareStmt": _Collector.prepare,
    "LoadStmt": _Collector.load,
    "DeallocateStmt": _Collector.deallocate_stmt,
    "DiscardStmt": _Collector.discard,
    "DropdbStmt": _Collector.drop_database,
    "RenameStmt": _Collector.rename,
    "CreatedbStmt": _Collector.create_database,
    "AlterDatabaseStmt": _Collector.alter_database,
}


# -- the one parse -------------------------------------------------------------------------------


def _analyze(sql: str) -> Analysis:
    """Parse *sql* once and read both answers from the tree (session effects only where the
    prefilter says there may be some: elsewhere they are none, parsed or not)."""
    may_change = _prefilter(sql.lower())[0]
    hint, start = _leading(sql)
    if len(sql) > MAX_PARSE_LENGTH:
        m = _WORD.match(sql, start)
        word = m.group(0).lower() if m else ""
        routing = Classification(False, word if word in _WRITE_KEYWORDS else "too long to classify", hint=hint)
        if not may_change:
            return Analysis(routing)
        try:
            # (Only for the session effects, which must be known whatever the text's length.)
            stmts = json.loads(parse_sql_json(sql)).get("stmts") or []
        except (ParseError, RecursionError):
            return Analysis(routing, _UNPARSABLE_DDL if _starts_like_ddl(sql.lower()) else NO_EFFECTS)
        return Analysis(routing, _effects(stmts))
    try:
        stmts = json.loads(parse_sql_json(sql)).get("stmts") or []
    except ParseError:
        # The server refuses it too, most likely; but pglast may lag the server's grammar, and
        # a DDL it cannot read may still run: count it.
        effects = _UNPARSABLE_DDL if may_change and _starts_like_ddl(sql.lower()) else NO_EFFECTS
        return Analysis(Classification(False, "unparsable", hint=hint), effects)
    except RecursionError:
        # json.loads recurses per nesting level: 1 + 1 + ... with thousands of terms is too deep.
        effects = _UNPARSABLE_DDL if may_change and _starts_like_ddl(sql.lower()) else NO_EFFECTS
        return Analysis(Classification(False, "too complex to classify", hint=hint), effects)
    effects = _effects(stmts) if may_change else NO_EFFECTS
    routing = _routing(sql, stmts, hint)
    if effects.pin and routing.read_only:
        # A read that pins the session (SQL PREPARE of a SELECT, DECLARE ... WITH HOLD, LISTEN,
        # LOAD) keeps it on that server connection for good: on a replica every later write of
        # the session would fail (25006), and LISTEN is refused there. It goes to the primary, as
        # a direct connection's would. (A /* pgtwist:replica */ hint still wins: route().)
        routing = replace(routing, read_only=False, reason=f"pins the session ({effects.pin})")
    return Analysis(routing, effects, _spelt_by_digits(effects))


def _spelt_by_digits(effects: SessionEffects) -> bool:
    """Whether a name among *effects* may be one the cache's key changes (DEALLOCATE "7", CREATE TEMP TABLE "t 1")."""
    if effects.deallocate or effects.frees:
        return True
    # (A quoted name's quotes bound it as _INTEGER's look-arounds ask: searched alone, it matches where it did in the text.)
    return any(_INTEGER.search(step.name) or _INTEGER.search(step.new) for step in effects.ddl_steps)


def _effects(stmts: list) -> SessionEffects:
    c = _Collector()
    c.walk(stmts)
    return c.effects(stmts)


# The one cache: analyses by text, bounded, oldest entry out first (a hot text dropped is
# parsed once more; an LRU's reordering on every hit would cost each lookup more than that).
# A text is found by its own spelling first, so a text without integer literals (bind
# parameters: $1) costs one dict lookup; a text with them, by its key below.
_cache: dict[str, Analysis] = {}
_hits = _misses = 0


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


def _remember(key: str, found: Analysis) -> None:
    if len(_cache) >= _CACHE_SIZE:
        del _cache[next(iter(_cache))]
    _cache[key] = found


# Integer literals change a classification only by being zero or not (EXPLAIN (ANALYZE 0),
# SET transaction_read_only = 1), and session effects not at all: texts differing in nothing
# else share one parse and one cache entry, so queries with inlined values (pgbench -S, ORMs
# without bind parameters) are parsed once. Digits in words, parameters ($1), numbers with a
# point or an exponent, and escapes stay. (The look-behind follows the first digit, so that the
# pattern starts with \d and the regex engine skims to each digit: 1.6x as fast as putting it first.)
_INTEGER = re.compile(r"\d(?<![\w$.\\]\d)\d*(?![\w.])")


def _zero_or_one(match) -> str:
    return "1" if match.group().strip("0") else "0"


def analyze(sql: str) -> Analysis:
    """Both answers for *sql* (one or more statements): from the prefilter, the cache, or one parse."""
    global _hits, _misses
    if len(sql) > MAX_CACHED_LENGTH:
        return _analyze(sql)
    found = _cache.get(sql)
    if found is not None:
        _hits += 1
        return found
    # Only INSERT, UPDATE, DELETE and the shortest texts can be judged without the parse: a
    # glance at the first character keeps the prefilter off every SELECT's way to the cache.
    if sql[:1] in _QUICK_FIRST or len(sql) <= _TX_LONGEST:
        quick = _prefilter(sql.lower())[1]
        if quick is not None:
            if len(sql) <= _TX_LONGEST:
                _remember(sql, quick)  # (BEGIN, COMMIT: few spellings, found by the first lookup next time)
            return quick
    key = _INTEGER.sub(_zero_or_one, sql)
    found = _cache.get(key)
    if found is None:
        _misses += 1
        found = _analyze(key)
        _remember(key, found)
    else:
        _hits += 1
    if found.spelt_by_digits and key != sql:
        # A quoted name made of digits (DEALLOCATE "7") is the one effect a number spells.
        found = Analysis(found.classification, _analyze(sql).effects)
    return found


def classify(
    sql: str,
    read_only_functions: frozenset[str] = frozenset(),
    is_volatile: Callable[[str], bool] | None = None,
) -> Classification:
    """Whether *sql* only reads.

    *is_volatile(bare_name)* says whether a function is volatile (from pg_proc); such calls make
    the text a write unless the bare or schema-qualified name is in *read_only_functions*. Only
    the parse is cached (by text): the volatility answer may change when the monitor reloads it.
    """
    base = analyze(sql).classification
    if not base.read_only or is_volatile is None or not base.functions:
        return base
    for name in base.functions:
        schema, _, bare = name.rpartition(".")
        if bare in read_only_functions or name in read_only_functions:
            continue
        if bare in _VOLATILE_READERS and schema in ("", "pg_catalog"):  # not a user's look-alike
            continue
        if is_volatile(bare):
            return replace(base, read_only=False, reason=f"volatile function {name}")
    return base


def session_effects(sql: str) -> SessionEffects:
    """What *sql* (one or more statements) does to session state; unparsable text does nothing (the server will refuse it)."""
    may_change, _ = _prefilter(sql.lower())
    if not may_change:
        return NO_EFFECTS  # (not cached: queries with inlined values would only churn the cache)
    return analyze(sql).effects


def query_effects(body: bytes) -> SessionEffects:
    """session_effects() of a Query (or Parse) text with its NUL, decoding only when it may matter.

    This runs for every simple Query and Parse on the hot path, so the prefilter works on the
    text with every digit made a 0, and remembers the texts in which it found nothing: no test
    of the prefilter looks at digits, so texts that differ only in their numbers' values (the
    commonest kind) are judged once. (Made 0s rather than taken out: a translation with no
    deletions is CPython's fast path, a fifth of the instructions; a deletion first builds a
    256-entry table for every call.)
    """
    key = body.translate(_ZERO_DIGITS)
    if key in _NO_KEYWORD:
        return NO_EFFECTS
    # A latin-1 decoding maps each byte to one character, and the ASCII keywords occur in it
    # exactly where they occur in the UTF-8 bytes (`word in str` is several times cheaper than
    # `word in bytes`, which first tries to read the word as an integer).
    may_change, _ = _prefilter(key[:-1].decode("latin-1").lower())  # (without the NUL)
    if may_change:
        return analyze(body[:-1].decode("utf-8", "replace")).effects
    if len(_NO_KEYWORD) >= _NO_KEYWORD_LIMIT:
        _NO_KEYWORD.clear()  # (texts with ever new literals: start over rather than grow)
    _NO_KEYWORD.add(key)
    return NO_EFFECTS


_ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_NO_KEYWORD: set[bytes] = set()  # texts (digits made 0s) in which the prefilter found no session change
_NO_KEYWORD_LIMIT = 4096


def cache_info() -> CacheInfo:
    """Statistics of the one parse cache, as functools gives them."""
    return CacheInfo(_hits, _misses, _CACHE_SIZE, len(_cache))


def cache_clear() -> None:
    global _hits, _misses
    _cache.clear()
    _hits = _misses = 0
    _NO_KEYWORD.clear()
