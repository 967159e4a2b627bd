"""sqlinspect: what SQL does to session state, and the hot-path prefilter that must never miss it."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgtwist.routing import sqlinspect
from pgtwist.routing.sqlinspect import NO_EFFECTS, inspect, inspect_query


def body(sql: str) -> bytes:
    return sql.encode() + b"\x00"


@pytest.mark.parametrize(
    "sql, check",
    [
        ("SET search_path TO app", lambda e: e.settings == {"search_path"} and not e.pin),
        ("SET LOCAL search_path TO app", lambda e: e.local_path and not e.settings and not e.pin),
        ("SET LOCAL statement_timeout = 5", lambda e: not e.changes_state),
        ("SELECT set_config('search_path', 'x', true)", lambda e: e.local_path and not e.settings),
        ("RESET statement_timeout", lambda e: e.resets == ("statement_timeout",)),
        ("RESET ALL", lambda e: e.all_settings and e.reset_all),
        ("DISCARD ALL", lambda e: e.discard_all and e.reset_all),
        ("SELECT set_config('application_name', 'x', false)", lambda e: e.settings == {"application_name"}),
        ("SELECT set_config('application_name', 'x', true)", lambda e: not e.changes_state),
        ("SELECT set_config(name, 'x', false) FROM t", lambda e: e.all_settings and not e.reset_all),
        ("SELECT pg_advisory_lock(42)", lambda e: e.pin and "advisory" in e.pin),
        ("SELECT pg_advisory_xact_lock(42)", lambda e: not e.pin),
        ("CREATE TEMP TABLE t (a int)", lambda e: e.pin == "temporary table"),
        ("LISTEN chan", lambda e: e.pin == "LISTEN"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", lambda e: e.pin == "cursor WITH HOLD"),
        ("PREPARE p1 AS SELECT 1", lambda e: e.pin == "SQL PREPARE"),
        ("DEALLOCATE p1", lambda e: e.deallocate == ("p1",)),
        ("DEALLOCATE ALL", lambda e: e.deallocate_all),
        ("SET ROLE other", lambda e: e.pin == "SET ROLE"),
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 1", lambda e: e is NO_EFFECTS),
        ("this is not SQL; set", lambda e: e is NO_EFFECTS),
        # A transaction's own commit mode (read-your-writes), not a session setting.
        ("SET LOCAL synchronous_commit = off", lambda e: e.local_commit_mode and not e.changes_state),
        ("SET synchronous_commit = off", lambda e: not e.local_commit_mode and e.settings == {"synchronous_commit"}),
        ("SELECT set_config('synchronous_commit', 'off', true)", lambda e: e.local_commit_mode and not e.changes_state),
        ("SELECT set_config($1, $2, true)", lambda e: e.local_commit_mode),
        ("SELECT set_config('synchronous_commit', 'off', $1)", lambda e: e.local_commit_mode),
        ("SELECT set_config('work_mem', '1MB', true)", lambda e: not e.local_commit_mode),
        ("SET LOCAL work_mem = '1MB'", lambda e: not e.local_commit_mode),
    ],
)
def test_effects(sql, check):
    assert check(inspect(sql))
    assert inspect_query(body(sql)) == inspect(sql)


def test_texts_that_differ_only_in_numbers_are_judged_once(monkeypatch):
    parsed = []
    real = sqlinspect._inspect_parsed
    monkeypatch.setattr(sqlinspect, "_inspect_parsed", lambda sql: parsed.append(sql) or real(sql))
    sqlinspect._NO_KEYWORD.clear()
    for aid in (1, 22, 333):
        assert inspect_query(body(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}")) is NO_EFFECTS
    assert len(sqlinspect._NO_KEYWORD) == 1 and parsed == []
    # ... but a number never hides a keyword, nor does the remembered verdict of another text.
    assert inspect_query(body("SELECT pg_advisory_lock(7)")).pin
    assert inspect_query(body("DEALLOCATE p7")).deallocate == ("p7",)
    assert inspect_query(body("DEALLOCATE p8")).deallocate == ("p8",)


def test_the_memory_of_plain_texts_is_bounded(monkeypatch):
    monkeypatch.setattr(sqlinspect, "_NO_KEYWORD_LIMIT", 3)
    sqlinspect._NO_KEYWORD.clear()
    for word in ("a", "b", "c", "d", "e"):
        inspect_query(body(f"SELECT '{word}'"))
        assert len(sqlinspect._NO_KEYWORD) <= 3


_FRAGMENTS = st.sampled_from(
    ["SELECT ", "set", "SeT", "s", "et", "_config(", "'a', 'b', false)", "1", "23", " ", "pg_advisory_lock(", ")",
     "TEMP", "temporary", "LISTEN x", "DISCARD ALL", "RESET ALL", "dea", "llocate", "é", "\u2603", ";", "\n"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=8).map("".join))
def test_the_prefilter_never_misses_what_the_parser_sees(sql):
    sqlinspect._NO_KEYWORD.clear()
    assert inspect_query(body(sql)) == inspect(sql)
    assert inspect_query(body(sql)) == inspect(sql)  # (and again, from what it remembered)


STARTUP = {"application_name": "app1", "search_path": "a,public"}


@pytest.mark.parametrize(
    "sql, restored",
    [
        ("RESET ALL", {"application_name", "search_path"}),
        ("DISCARD ALL", {"application_name", "search_path"}),
        ("RESET search_path", {"search_path"}),
        ("SET application_name TO DEFAULT", {"application_name"}),
        ("RESET work_mem", set()),  # not a startup setting: the server's default is the client's too
        ("SET search_path = b", set()),
        ("RESET ALL; SET application_name = 'y'", {"search_path"}),  # what the text sets again stays
        ("SET application_name = 'y'; RESET ALL", {"search_path"}),  # (order unknown: left as the server ends)
        ("RESET search_path; SELECT 1", {"search_path"}),
    ],
)
def test_what_a_statement_sends_back_to_the_server_defaults(sql, restored):
    assert inspect(sql).to_restore(STARTUP) == restored
    assert inspect(sql).to_restore({}) == set()


# -- DDL: what may change the meaning of prepared statements ------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE t ADD COLUMN y int",
        "alter table t alter column x type text",
        "DROP TABLE t",
        "DROP TYPE e",
        "CREATE TYPE e AS ENUM ('foo')",
        "CREATE TABLE t2 (x int)",
        "CREATE OR REPLACE VIEW v AS SELECT 1 AS a",
        "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE DOMAIN d AS int",
        "ALTER DOMAIN d SET NOT NULL",
        "CREATE TABLE t3 AS SELECT 1 AS a",
        "DO $$ BEGIN EXECUTE 'ALTER TABLE t ADD c int'; END $$",
        "SELECT 1; DROP TABLE t",
        "/* migration */ -- step 1\n ALTER TABLE t RENAME TO u",
        "ALTER TABLE t FROBNICATE ALL THE THINGS",  # unparsable, but looks like DDL: counted
        "IMPORT FOREIGN SCHEMA s FROM SERVER x INTO public",
    ],
)
def test_ddl_is_seen(sql):
    assert inspect(sql).ddl and inspect(sql).changes_state
    assert inspect_query(body(sql)).ddl


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT created_at, dropped, altered FROM t WHERE doc = 'create table x'",
        "UPDATE t SET created_at = now()",
        "INSERT INTO t SELECT 1",
        "GRANT SELECT ON t TO app",
        "TRUNCATE t",
        "CALL p()",
        "VACUUM t",
        "COMMENT ON TABLE t IS 'x'",
        "LOCK TABLE t",
        "this is not SQL",
        "double trouble",
    ],
)
def test_not_ddl(sql):
    assert not inspect(sql).ddl
    assert not inspect_query(body(sql)).ddl
