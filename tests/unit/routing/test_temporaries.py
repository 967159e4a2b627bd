"""temporaries: DDL is judged statement by statement: on the relations the session made temporary
(which no other session sees) or not. analysis reads each DDL statement's DdlSteps from
PostgreSQL's own parse tree; Temporaries.after judges them against the session's own account."""

from __future__ import annotations

import pytest

from pgtwist.routing import analysis
from pgtwist.routing.analysis import NO_EFFECTS, SHARED, DdlStep, query_effects, session_effects
from pgtwist.routing.temporaries import NONE, Temporaries


def judge(sql: str, made: tuple[str, ...] = ()) -> tuple[bool, Temporaries]:
    """Whether *sql*, sent by a session that made *made* temporary, is DDL on temporary relations
    alone, and what the session's temporary relations are then. As a simple Query and as a Parse
    (query_effects, with its NUL), which must agree."""
    effects = session_effects(sql)
    assert query_effects(sql.encode() + b"\x00") == effects
    return Temporaries(frozenset(made)).after(effects.ddl_steps)


def temporary(sql: str, made: tuple[str, ...] = ()) -> bool:
    return judge(sql, made)[0]


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TEMP TABLE t (a int)",
        "CREATE TEMPORARY TABLE t (a int)",
        "create local temporary table t (a int primary key)",
        "CREATE TEMP TABLE IF NOT EXISTS t (a int)",
        "CREATE TABLE pg_temp.t (a int)",  # (no TEMP: the schema makes it one)
        'CREATE TABLE "pg_temp"."T" (a int)',
        "CREATE TEMP TABLE t (a int) ON COMMIT DROP",
        "CREATE TEMP TABLE t (a int) ON COMMIT DELETE ROWS",
        "CREATE TEMP TABLE t AS SELECT * FROM public.users",
        "CREATE TEMP TABLE t (LIKE public.users INCLUDING ALL)",
        "CREATE TEMP VIEW v AS SELECT 1 AS a",
        "CREATE OR REPLACE TEMP VIEW v AS SELECT 1 AS a",
        "CREATE TEMP SEQUENCE s",
        "CREATE TEMP TABLE a (x int); CREATE TEMP TABLE b (x int)",
        "CREATE TEMP TABLE t (a int); ALTER TABLE t ADD COLUMN b int; CREATE INDEX ON t (a); DROP TABLE t",
        "CREATE TEMP TABLE t (a int); INSERT INTO t VALUES (1); SELECT * FROM t",
        "/* orm */ CREATE TEMP TABLE t (a int)",
    ],
)
def test_statements_that_make_temporary_relations_show_nobody_anything(sql):
    assert temporary(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE t ADD COLUMN b int",
        "ALTER TABLE IF EXISTS ONLY t ALTER COLUMN a TYPE text",
        "alter table T add b int",  # (unquoted: folded, as PostgreSQL does)
        "ALTER TABLE pg_temp.t ADD COLUMN b int",
        "ALTER TABLE pg_temp.other ADD COLUMN b int",  # (qualified: temporary whatever the session's account)
        "CREATE INDEX ON t (a)",
        "CREATE UNIQUE INDEX t_a ON t (a)",
        "CREATE INDEX CONCURRENTLY t_a ON pg_temp.t (a)",
        "DROP TABLE t",
        "DROP TABLE IF EXISTS t CASCADE",
        "DROP TABLE pg_temp.gone",
        "ALTER TABLE t RENAME TO u",
        "ALTER TABLE t RENAME COLUMN a TO b",
        "ALTER TABLE t RENAME CONSTRAINT c TO d",
        "ALTER SEQUENCE s RESTART",
        "DROP SEQUENCE s",
        "DROP VIEW v",
        "ALTER TABLE t RENAME TO u; ALTER TABLE u ADD b int",  # (the new name is as temporary)
        "ALTER TABLE t ADD b int; TRUNCATE t; UPDATE t SET b = 1",
    ],
)
def test_ddl_on_the_sessions_temporary_relations_shows_nobody_anything(sql):
    assert temporary(sql, made=("t", "s", "v"))


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE p (a int)",
        "CREATE UNLOGGED TABLE p (a int)",
        "CREATE TABLE IF NOT EXISTS public.p (a int)",
        "ALTER TABLE p ADD COLUMN b int",
        "ALTER TABLE public.t ADD COLUMN b int",  # (another schema's t, however the session's is named)
        'ALTER TABLE "T" ADD COLUMN b int',  # (quoted: not the session's t)
        "ALTER TABLE app.t ADD COLUMN b int",
        "ALTER TABLE pg_temp_3.t ADD COLUMN b int",  # (another session's temporary schema, maybe)
        "CREATE INDEX ON p (a)",
        "CREATE INDEX i ON public.t (a)",
        "DROP TABLE t, p",
        "DROP TABLE IF EXISTS other",  # (not made here: a permanent one, if any, is the one dropped)
        "DROP INDEX some_index",
        "DROP FUNCTION f()",
        "DROP TYPE e",
        "DROP SCHEMA pg_temp_3 CASCADE",
        "ALTER TABLE t SET SCHEMA public",
        "ALTER TABLE p RENAME TO t",
        "CREATE VIEW v2 AS SELECT * FROM t",  # (temporary by PostgreSQL's NOTICE: counted as seen)
        "CREATE MATERIALIZED VIEW m AS SELECT 1",
        "CREATE TABLE p AS SELECT * FROM t",
        "CREATE SEQUENCE s2",
        "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE TYPE e AS ENUM ('a')",
        "CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
        "CREATE TEMP TABLE public.x (a int)",  # (PostgreSQL refuses it: counted as seen)
        "DO $$ BEGIN CREATE TEMP TABLE x (a int); END $$",
        "ALTER TABLE t FROBNICATE",  # (unparsable, but DDL-looking)
        "CREATE TEMP TABLE x (a int); CREATE TABLE y (a int)",
        "ALTER TABLE t ADD b int; ALTER TABLE p ADD b int",
        "DROP TABLE t; ALTER TABLE t ADD b int",  # (the second t is another: the session's is gone)
        "DISCARD TEMP; ALTER TABLE t ADD b int",
        "ALTER TABLE t RENAME TO u; ALTER TABLE t ADD b int",
        "IMPORT FOREIGN SCHEMA s FROM SERVER x INTO public",
    ],
)
def test_any_other_ddl_shows_every_session_in_a_session_with_temporary_relations(sql):
    assert session_effects(sql).ddl
    assert not temporary(sql, made=("t", "s", "v"))


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM t",
        "INSERT INTO t VALUES (1)",
        "TRUNCATE t",
        "COMMENT ON TABLE t IS 'x'",
        "DISCARD TEMP",
        "DISCARD ALL",
    ],
)
def test_what_is_no_ddl_is_judged_no_temporary_ddl(sql):
    # (The session asks only about DDL; a DISCARD has steps, but none of DDL.)
    assert not session_effects(sql).ddl
    assert not temporary(sql, made=("t",))


def test_the_account_follows_creates_renames_drops_and_discards():
    _, made = judge('CREATE TEMP TABLE a (x int); CREATE TEMP VIEW "V" AS SELECT 1; CREATE TABLE pg_temp.b (x int)')
    assert made.names == {"a", "V", "b"}
    _, made = made.after(session_effects("ALTER TABLE a RENAME TO a2; DROP VIEW \"V\"").ddl_steps)
    assert made.names == {"a2", "b"}
    _, made = made.after(session_effects("CREATE INDEX b_x ON b (x)").ddl_steps)
    assert made.names == {"a2", "b", "b_x"}
    assert made.after(session_effects("DROP INDEX b_x").ddl_steps)[0]
    assert made.after(session_effects("DISCARD TEMP").ddl_steps)[1] == NONE
    assert made.after(session_effects("DISCARD ALL").ddl_steps)[1] == NONE
    assert made.after(session_effects("DROP TABLE public.b").ddl_steps)[1] == made  # (not the session's b)


def test_on_commit_drop_relations_leave_the_account_when_the_transaction_ends():
    temporary, made = judge("CREATE TEMP TABLE t (a int) ON COMMIT DROP", made=("kept",))
    assert temporary and made.names == {"t", "kept"} and made.at_commit == {"t"}
    assert made.after(session_effects("ALTER TABLE t ADD b int").ddl_steps)[0]  # (before the commit)
    _, renamed = made.after(session_effects("ALTER TABLE t RENAME TO u").ddl_steps)
    assert renamed.at_commit == {"u"} and renamed.ended() == Temporaries(frozenset({"kept"}))
    ended = made.ended()
    assert ended == Temporaries(frozenset({"kept"}))
    assert not ended.after(session_effects("ALTER TABLE t ADD b int").ddl_steps)[0]
    # Made again without ON COMMIT DROP: it stays.
    _, again = made.after(session_effects("CREATE TEMP TABLE IF NOT EXISTS t (a int)").ddl_steps)
    assert again.ended().names == {"t", "kept"}


def test_an_unchanged_account_is_the_same_object():
    made = Temporaries(frozenset({"t"}))
    assert made.after(session_effects("ALTER TABLE t ADD b int").ddl_steps)[1] is made
    assert NONE.ended() is NONE


def test_names_made_of_digits_survive_the_cache_key():
    # The cache's key takes integers apart ("t 1" and "t 2" share one): the names are read again.
    analysis.cache_clear()
    first = session_effects('CREATE TEMP TABLE "t 1" (a varchar(10))')
    second = session_effects('CREATE TEMP TABLE "t 2" (a varchar(20))')
    assert [s.name for s in first.ddl_steps] == ["t 1"] and [s.name for s in second.ddl_steps] == ["t 2"]
    assert query_effects(b'ALTER TABLE "t 3" RENAME TO "t 4"\x00').ddl_steps == (DdlStep("renames", "", "t 3", "t 4"),)


def test_statements_without_ddl_have_no_steps_and_stay_off_the_parser():
    analysis.cache_clear()
    assert query_effects(b"SELECT abalance FROM pgbench_accounts WHERE aid = 7\x00") is NO_EFFECTS
    assert query_effects(b"UPDATE t SET a = 1 WHERE id = 7\x00") is NO_EFFECTS
    assert analysis.cache_info().misses == 0


def test_unparsable_ddl_is_seen_by_everyone():
    assert session_effects("ALTER TABLE t FROBNICATE").ddl_steps == (DdlStep(SHARED),)
