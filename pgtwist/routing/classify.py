"""Whether a SQL string only reads (so a replica may run it), read with PostgreSQL's own parser (pglast)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

from pglast.parser import ParseError, parse_sql_json

# We walk libpg_query's JSON tree rather than pglast's Python AST: building the AST objects
# costs ~5x more per statement (≈200 µs against ≈40 µs for a small SELECT), and every
# distinct SQL text a client sends goes through here once.

# Parsing costs ~2 µs per byte of SQL, all of it on the reactor thread: longer texts are
# judged by their first keyword only (a bulk INSERT must not stall every other client).
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
        analyze = False
        for opt in body.get("options") or ():
            okind, obody = _node(opt)
            if okind == "DefElem" and obody.get("defname") == "analyze":
                analyze = _truthy(obody.get("arg"))
        if not analyze:
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


def _analyze(sql: str) -> Classification:
    """Everything that depends on the text alone (volatility is the caller's, checked in classify)."""
    hint, start = _leading(sql)
    if len(sql) > MAX_PARSE_LENGTH:
        m = _WORD.match(sql, start)
        word = m.group(0).lower() if m else ""
        return Classification(False, word if word in _WRITE_KEYWORDS else "too long to classify", hint=hint)
    try:
        tree = json.loads(parse_sql_json(sql))
    except ParseError:
        return Classification(False, "unparsable", hint=hint)
    except RecursionError:
        # json.loads recurses per nesting level: 1 + 1 + ... with thousands of terms is too deep.
        return Classification(False, "too complex to classify", hint=hint)
    stmts = tree.get("stmts") or []
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


_analyze_cached = lru_cache(maxsize=_CACHE_SIZE)(_analyze)

# Integer literals change a classification only by being zero or not (EXPLAIN (ANALYZE 0),
# SET transaction_read_only = 1): texts differing in nothing else share one parse and one cache
# entry, so queries with inlined values (pgbench -S, ORMs without bind parameters) are parsed
# once. Digits in words, parameters ($1), numbers with a point or an exponent, and escapes stay.
_INTEGER = re.compile(r"(?<![\w$.\\])\d+(?![\w.])")


def _zero_or_one(match) -> str:
    return "1" if match.group().strip("0") else "0"


def classify(
    sql: str,
    read_only_functions: frozenset[str] = frozenset(),
    is_volatile: Callable[[str], bool] | None = None,
) -> Classification:
    """Classify *sql* (one or more statements).

    *is_volatile(bare_name)* says whether a function is volatile (from pg_proc); such calls make
    the text a write unless the bare or schema-qualified name is in *read_only_functions*. Only
    the parse is cached (by text): the volatility answer may change when the caller reloads it.
    """
    base = _analyze_cached(_INTEGER.sub(_zero_or_one, sql)) if len(sql) <= MAX_CACHED_LENGTH else _analyze(sql)
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


def classify_cache_info():
    """functools cache statistics of the parse cache (hits, misses, maxsize, currsize)."""
    return _analyze_cached.cache_info()


def classify_cache_clear() -> None:
    _analyze_cached.cache_clear()
