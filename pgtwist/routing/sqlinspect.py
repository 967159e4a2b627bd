"""What a SQL string does to session state, read with PostgreSQL's own parser (pglast): settings, pins, deallocations, DDL."""

from __future__ import annotations

import re

from dataclasses import dataclass
from functools import lru_cache

from pglast import ast, parse_sql
from pglast.enums import DiscardMode, VariableSetKind
from pglast.parser import ParseError
from pglast.visitors import Visitor

# Cursor option bit of DECLARE ... WITH HOLD (CURSOR_OPT_HOLD in parsenodes.h).
_CURSOR_OPT_HOLD = 0x0020
_SESSION_LOCKS = frozenset(
    ("pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared")
)
# Only text containing one of these words can change session state; the rest skips the parser.
# (Plain substring tests on the lowered text: a case-insensitive regex alternation costs ten
# times as much, and this runs for every query that is not in the cache.)
_MAYBE = ("set", "discard", "deallocate", "listen", "temp", "hold", "prepare", "advisory", "role", "authorization", "load")


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


# Where a statement's session effect shows: words that start a statement (SET, RESET, DISCARD...;
# "set" anywhere would send every UPDATE ... SET to the parser), and words that matter wherever
# they are (set_config() in any expression, SELECT INTO TEMP, WITH HOLD, advisory locks).
_LEADING = ("set", "reset", "discard", "deallocate", "listen", "prepare", "load")
_ANYWHERE = ("set_config", "temp", "hold", "advisory")


def _may_change_state(low: str) -> bool:
    """Whether the lowered text may have a session effect (or be DDL): over-approximated, never under.

    Every statement starts the text or follows a ';', so a statement-leading word is found at
    the start of a ';'-split part. A ';' inside a comment could hide a start from that split:
    text with comments is judged by substrings, as everything once was.
    """
    for word in _ANYWHERE:
        if word in low:
            return True
    if "--" in low or "/*" in low:
        for word in _MAYBE:
            if word in low:
                return True
        return _starts_like_ddl(low)
    for part in low.split(";") if ";" in low else (low,):
        if part.lstrip().startswith(_LEADING):
            return True
    return _starts_like_ddl(low)


def _maybe_changes_state(sql: str) -> bool:
    return _may_change_state(sql.lower())


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
        )


NO_EFFECTS = SessionEffects()


def _persistence_temp(rel) -> bool:
    return rel is not None and getattr(rel, "relpersistence", "p") == "t"


class _Collector(Visitor):
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

    def _pin(self, why: str) -> None:
        if self.pin is None:
            self.pin = why

    def visit_VariableSetStmt(self, ancestors, node):
        if node.kind == VariableSetKind.VAR_RESET_ALL:
            self.all_settings = self.reset_all = True
            return
        name = (node.name or "").lower()
        if name in ("role", "session_authorization"):
            if not node.is_local:
                self._pin(f"SET {name.upper()}")
            return
        if name.startswith("transaction") or name == "session_characteristics":
            return
        if node.is_local and name == "synchronous_commit":
            self.local_commit_mode = True
        if node.is_local and name == "search_path":
            self.local_path = True
        if not node.is_local and name:
            self.settings.add(name)
            if node.kind in (VariableSetKind.VAR_RESET, VariableSetKind.VAR_SET_DEFAULT):
                self.resets.append(name)
            else:
                self.assigned.add(name)

    def visit_FuncCall(self, ancestors, node):
        fname = node.funcname[-1].sval.lower() if node.funcname else ""
        if fname in _SESSION_LOCKS:
            self._pin(f"session advisory lock ({fname})")
        elif fname == "set_config":
            args = node.args or ()
            local = args[2] if len(args) > 2 else None
            is_local = isinstance(local, ast.A_Const) and getattr(local.val, "boolval", None) is True
            first = args[0] if args else None
            if is_local or local is not None and not isinstance(local, ast.A_Const):
                # (A computed is_local may be true: for the commit's mode, assume it is.)
                named = isinstance(first, ast.A_Const) and isinstance(first.val, ast.String)
                if not named or first.val.sval.lower() == "synchronous_commit":
                    self.local_commit_mode = True
            if is_local:
                named = isinstance(first, ast.A_Const) and isinstance(first.val, ast.String)
                if not named or first.val.sval.lower() == "search_path":
                    self.local_path = True
                return
            if isinstance(first, ast.A_Const) and isinstance(first.val, ast.String):
                self.settings.add(first.val.sval.lower())
                self.assigned.add(first.val.sval.lower())
            else:
                self.all_settings = True

    def visit_ListenStmt(self, ancestors, node):
        self._pin("LISTEN")

    def visit_CreateStmt(self, ancestors, node):
        if _persistence_temp(node.relation):
            self._pin("temporary table")

    def visit_CreateSeqStmt(self, ancestors, node):
        if _persistence_temp(node.sequence):
            self._pin("temporary sequence")

    def visit_ViewStmt(self, ancestors, node):
        if _persistence_temp(node.view):
            self._pin("temporary view")

    def visit_IntoClause(self, ancestors, node):
        if _persistence_temp(node.rel):
            self._pin("temporary table")

    def visit_DeclareCursorStmt(self, ancestors, node):
        if (node.options or 0) & _CURSOR_OPT_HOLD:
            self._pin("cursor WITH HOLD")

    def visit_PrepareStmt(self, ancestors, node):
        self._pin("SQL PREPARE")

    def visit_LoadStmt(self, ancestors, node):
        self._pin("LOAD")

    def visit_DeallocateStmt(self, ancestors, node):
        if node.name is None or getattr(node, "isall", False):
            self.deallocate_all = True
        else:
            self.deallocate.append(node.name)

    def visit_DiscardStmt(self, ancestors, node):
        if node.target == DiscardMode.DISCARD_ALL:
            self.discard_all = True
            self.all_settings = self.reset_all = True


def inspect(sql: str) -> SessionEffects:
    """Session-state effects of *sql* (one or more statements); unparsable text has none (the server will refuse it)."""
    if not _maybe_changes_state(sql):
        return NO_EFFECTS  # (not cached: queries with inlined values would only churn the cache)
    return _inspect_parsed(sql)


def inspect_query(body: bytes) -> SessionEffects:
    """inspect() of a Query message body (the text and its NUL), decoding only when it may matter.

    This runs for every simple Query and Parse on the hot path, so the keyword prefilter works
    on the text with its digits taken out, and remembers the texts in which it found nothing:
    no keyword holds a digit, so a keyword in the text is a keyword in the text without digits,
    and queries that differ only in their numbers (the commonest kind) are judged once.
    """
    key = body.translate(None, _DIGITS)
    if key in _NO_KEYWORD:
        return NO_EFFECTS
    # A latin-1 decoding maps each byte to one character, and the ASCII keywords occur in it
    # exactly where they occur in the UTF-8 bytes (`word in str` is several times cheaper than
    # `word in bytes`, which first tries to read the word as an integer).
    low = key.decode("latin-1").lower()
    if _may_change_state(low):
        return _inspect_parsed(body[:-1].decode("utf-8", "replace"))
    if len(_NO_KEYWORD) >= _NO_KEYWORD_LIMIT:
        _NO_KEYWORD.clear()  # (texts with ever new literals: start over rather than grow)
    _NO_KEYWORD.add(key)
    return NO_EFFECTS


_DIGITS = b"0123456789"
_NO_KEYWORD: set[bytes] = set()  # digit-free Query texts known to hold none of the keywords
_NO_KEYWORD_LIMIT = 4096


@lru_cache(maxsize=8192)
def _inspect_parsed(sql: str) -> SessionEffects:
    try:
        tree = parse_sql(sql)
    except ParseError:
        # The server refuses it too, most likely; but pglast may lag the server's grammar, and
        # a DDL it cannot read may still run: count it.
        return _UNPARSABLE_DDL if _starts_like_ddl(sql.lower()) else NO_EFFECTS
    c = _Collector()
    c(tree)
    return SessionEffects(
        settings=frozenset(c.settings),
        all_settings=c.all_settings,
        pin=c.pin,
        deallocate=tuple(c.deallocate),
        deallocate_all=c.deallocate_all,
        discard_all=c.discard_all,
        statements=len(tree),
        resets=tuple(c.resets),
        reset_all=c.reset_all,
        assigned=frozenset(c.assigned),
        local_commit_mode=c.local_commit_mode,
        ddl=any(type(raw.stmt).__name__ not in _NOT_DDL for raw in tree),
        local_path=c.local_path,
    )


_UNPARSABLE_DDL = SessionEffects(ddl=True)
