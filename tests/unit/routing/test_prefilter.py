"""The session-effect prefilter never skips a statement the parser finds an effect in (and skips UPDATE ... SET)."""

from __future__ import annotations

import pytest

from pgtwist.routing import analysis
from pgtwist.routing.analysis import NO_EFFECTS, query_effects

EFFECTFUL = [
    "SET search_path = a",
    "set statement_timeout = 5",
    "RESET ALL",
    "reset search_path",
    "DISCARD ALL",
    "DEALLOCATE s1",
    "DEALLOCATE ALL",
    "LISTEN ch",
    "PREPARE p AS SELECT 1",
    "LOAD 'auto_explain'",
    "SET ROLE other",
    "SET SESSION AUTHORIZATION other",
    "SELECT set_config('search_path', 'a', false)",
    "UPDATE t SET x = set_config('a.b', 'c', false)",
    "SELECT * INTO TEMP t2 FROM t",
    "CREATE TEMP TABLE tt (x int)",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "SELECT pg_advisory_lock(1)",
    "CREATE TABLE t3 (x int)",
    "ALTER TABLE t ADD COLUMN y int",
    "DROP TABLE t",
]
WRAPPERS = [
    "{}",
    "  {}",
    "\n{}",
    "SELECT 1; {}",
    "BEGIN;{}",
    "UPDATE t SET x = 1; {}",
    "SELECT 'a;b'; {}",
    "/* a; b */ {}",
    "SELECT 1; -- a;b\n{}",
    "SELECT 1; /* x; */{}",
]


@pytest.mark.parametrize("statement", EFFECTFUL)
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_statement_with_an_effect_is_never_skipped(statement, wrapper):
    text = wrapper.format(statement)
    assert analysis._analyze(text).effects != NO_EFFECTS, text  # (the parser does see one)
    assert query_effects(text.encode() + b"\0") != NO_EFFECTS, text


@pytest.mark.parametrize(
    "text",
    [
        "UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 5678;",
        "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = excluded.a",
        "SELECT settings FROM t",
        "BEGIN;",
        "END;",
    ],
)
def test_writes_with_set_do_not_reach_the_parser(text, monkeypatch):
    def parse(sql):
        raise AssertionError(f"parsed {sql!r}")

    monkeypatch.setattr(analysis, "_analyze", parse)
    analysis.cache_clear()
    assert query_effects(text.encode() + b"\0") == NO_EFFECTS
