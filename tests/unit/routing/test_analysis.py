"""analysis: one parse of a SQL text answers routing (read only? tx control? hints? volatile
functions?) and session state (settings, pins, deallocations, DDL); one cache, one prefilter."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgtwist.routing import analysis
from pgtwist.routing.analysis import NO_EFFECTS, Classification, classify
from pgtwist.routing.analysis import query_effects as inspect_query
from pgtwist.routing.analysis import session_effects as inspect

# == routing classification =======================================================================

READS = [
    ("SELECT 1", "select"),
    ("select a, b from t where id = 42", "select"),
    ("VALUES (1), (2)", "select"),
    ("TABLE t", "select"),
    ("SELECT * FROM a JOIN b USING (id) UNION ALL SELECT * FROM c", "select"),
    ("WITH x AS (SELECT 1) SELECT * FROM x", "select"),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r", "select"),
    ("SELECT now(), count(*) FROM t", "select"),
    ("SELECT my_func(1)", "select"),  # unknown functions read, unless the caller says volatile
    ("SELECT random()", "select"),
    ("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()", "select"),
    ("SELECT lo_get(1234)", "select"),
    ("SELECT 'insert into t values (1)'", "select"),  # a write inside a literal is just text
    ("SELECT 1 AS \"for update\"", "select"),
    ("SHOW search_path", "SHOW"),
    ("EXPLAIN SELECT 1", "explain"),
    ("EXPLAIN INSERT INTO t VALUES (1)", "explain"),  # only plans: a hot standby can do it
    ("EXPLAIN (ANALYZE false) DELETE FROM t", "explain"),
    ("EXPLAIN (ANALYZE off, COSTS on) UPDATE t SET a = 1", "explain"),
    ("EXPLAIN ANALYZE SELECT * FROM t", "explain analyze"),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT 1", "explain analyze"),
    ("SET search_path = a, b", "SET"),
    ("RESET ALL", "RESET"),
    ("DECLARE c CURSOR FOR SELECT * FROM t", "DECLARE CURSOR"),
    ("FETCH 10 FROM c", "FETCH"),
    ("CLOSE c", "CLOSE"),
    ("COPY t TO STDOUT", "COPY TO"),
    ("COPY (SELECT * FROM t) TO STDOUT WITH (FORMAT csv)", "COPY TO"),
    ("DISCARD ALL", "DISCARD"),
    ("  ;  ", "empty"),
    ("/* just a comment */", "empty"),
    ("SELECT 1; SELECT 2", "select"),
]

WRITES = [
    ("INSERT INTO t VALUES (1)", "insert"),
    ("UPDATE t SET a = 1", "update"),
    ("DELETE FROM t", "delete"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "merge"),
    ("WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x", "writable CTE"),
    ("WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT count(*) FROM x", "writable CTE"),
    ("WITH x AS (DELETE FROM t RETURNING *) SELECT 1", "writable CTE"),
    ("WITH x AS (MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE RETURNING *) SELECT 1", "writable CTE"),
    ("SELECT * FROM t FOR UPDATE", "SELECT FOR UPDATE"),
    ("SELECT * FROM t FOR NO KEY UPDATE", "SELECT FOR NO KEY UPDATE"),
    ("SELECT * FROM t FOR SHARE", "SELECT FOR SHARE"),
    ("SELECT * FROM t FOR KEY SHARE SKIP LOCKED", "SELECT FOR KEY SHARE"),
    ("SELECT (SELECT a FROM t LIMIT 1 FOR UPDATE)", "SELECT FOR UPDATE"),  # in a subquery too
    ("SELECT * INTO t2 FROM t", "SELECT INTO"),
    ("SELECT nextval('s')", "function nextval"),
    ("SELECT pg_catalog.setval('s', 10)", "function setval"),
    ("SELECT * FROM nextval('s')", "function nextval"),
    ("SELECT currval('s')", "function currval"),
    ("SELECT pg_advisory_lock(1)", "function pg_advisory_lock"),
    ("SELECT pg_try_advisory_xact_lock(1)", "function pg_try_advisory_xact_lock"),
    ("SELECT pg_advisory_unlock_all()", "function pg_advisory_unlock_all"),
    ("SELECT set_config('a.b', 'c', false)", "function set_config"),
    ("SELECT pg_notify('chan', 'x')", "function pg_notify"),
    ("SELECT lo_create(0)", "function lo_create"),
    ("SELECT lo_unlink(1234)", "function lo_unlink"),
    ("SELECT txid_current()", "function txid_current"),
    ("SELECT pg_current_xact_id()", "function pg_current_xact_id"),
    ("SELECT pg_promote(true, 60)", "function pg_promote"),
    ("SELECT pg_terminate_backend(123)", "function pg_terminate_backend"),
    ("SELECT pg_cancel_backend(123)", "function pg_cancel_backend"),
    ("SELECT a FROM t WHERE b = (SELECT nextval('s'))", "function nextval"),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", "LOCK"),
    ("COPY t FROM STDIN", "COPY FROM"),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", "delete"),
    ("DO $$ BEGIN PERFORM 1; END $$", "DO"),
    ("CALL my_proc(1)", "CALL"),
    ("CREATE TABLE x (a int)", "CREATE TABLE"),
    ("CREATE TABLE x AS SELECT 1", "CREATE TABLE AS"),
    ("ALTER TABLE t ADD COLUMN b int", "ALTER TABLE"),
    ("DROP TABLE t", "DROP"),
    ("TRUNCATE t", "TRUNCATE"),
    ("VACUUM t", "VACUUM"),
    ("CREATE SEQUENCE s", "CreateSeqStmt"),
    ("LISTEN chan", "LISTEN"),
    ("NOTIFY chan", "NOTIFY"),
    ("PREPARE q AS SELECT 1", "PREPARE"),
    ("EXECUTE q", "EXECUTE"),
    ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", "EXPLAIN ANALYZE of a write"),
    ("EXPLAIN (ANALYZE true) SELECT nextval('s')", "EXPLAIN ANALYZE of a write"),
    ("EXPLAIN (ANALYZE on) SELECT * FROM t FOR UPDATE", "EXPLAIN ANALYZE of a write"),
    ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", "SELECT FOR UPDATE"),
    ("SELECT 1; INSERT INTO t VALUES (1)", "multi-statement with a write"),
    ("INSERT INTO t VALUES (1); SELECT 1", "multi-statement with a write"),
    ("SELEC 1", "unparsable"),
    ("SELECT * FROM", "unparsable"),
    ("PREPARE TRANSACTION 'x'", "two-phase commit"),
    # Reads that pin the session (on a replica, its later writes would fail there: 25006).
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "pins the session (cursor WITH HOLD)"),
    ("SET ROLE bob", "pins the session (SET ROLE)"),
    ("SET SESSION AUTHORIZATION bob", "pins the session (SET SESSION_AUTHORIZATION)"),
    ("COMMIT PREPARED 'x'", "two-phase commit"),
]


@pytest.mark.parametrize(("sql", "reason"), READS)
def test_reads(sql, reason):
    c = classify(sql)
    assert c.read_only, c
    assert c.reason == reason


@pytest.mark.parametrize(("sql", "reason"), WRITES)
def test_writes(sql, reason):
    c = classify(sql)
    assert not c.read_only, c
    assert c.reason == reason


def test_quoted_identifier_is_not_the_builtin_writer():
    # "NEXTVAL" quoted is another function; unquoted names are folded to lower case by the parser.
    assert classify('SELECT "NEXTVAL"(1)').read_only
    assert not classify("SELECT NEXTVAL('s')").read_only


@pytest.mark.parametrize(
    ("sql", "tx", "read_only"),
    [
        ("BEGIN", "begin", True),
        ("begin transaction", "begin", True),
        ("START TRANSACTION", "begin", True),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", "begin", True),
        ("BEGIN READ WRITE", "begin", True),
        ("BEGIN READ ONLY", "begin_read_only", True),
        ("START TRANSACTION READ ONLY", "begin_read_only", True),
        ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE", "begin_read_only", True),
        ("COMMIT", "commit", True),
        ("END", "commit", True),
        ("COMMIT AND CHAIN", "commit", True),
        ("ROLLBACK", "rollback", True),
        ("ABORT", "rollback", True),
        ("SAVEPOINT sp", "savepoint", True),
        ("RELEASE SAVEPOINT sp", "release", True),
        ("ROLLBACK TO SAVEPOINT sp", "rollback_to", True),
        ("PREPARE TRANSACTION 'g'", "prepare_transaction", False),
        ("ROLLBACK PREPARED 'g'", "rollback_prepared", False),
        ("SET TRANSACTION READ ONLY", "set_transaction_read_only", True),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", "set_transaction_read_only", True),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "set_transaction_read_only", True),
        ("SET transaction_read_only = on", "set_transaction_read_only", True),
        ("SET default_transaction_read_only TO true", "set_transaction_read_only", True),
        ("SET TRANSACTION READ WRITE", None, True),
        ("SET transaction_read_only = off", None, True),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None, True),
        ("BEGIN; SELECT 1; COMMIT", "begin", True),
        ("BEGIN READ ONLY; SELECT 1; COMMIT", "begin_read_only", True),
        ("BEGIN; SET TRANSACTION READ ONLY; SELECT 1", "begin_read_only", True),
        ("SELECT 1; COMMIT", "commit", True),
        ("BEGIN; INSERT INTO t VALUES (1); COMMIT", "begin", False),
        ("SELECT 1", None, True),
    ],
)
def test_transaction_control(sql, tx, read_only):
    c = classify(sql)
    assert c.tx == tx, c
    assert c.read_only is read_only, c


def test_transaction_control_reason():
    assert classify("COMMIT").reason == "transaction control"
    assert classify("BEGIN READ ONLY; SELECT 1; COMMIT").reason == "select"


@pytest.mark.parametrize(
    ("sql", "hint"),
    [
        ("/* pgtwist:primary */ SELECT 1", "primary"),
        ("/* pgtwist:replica */ SELECT 1", "replica"),
        ("/*pgtwist:replica*/SELECT 1", "replica"),
        ("  \n\t/*   PGTWIST : Replica   */\nSELECT 1", "replica"),
        ("-- pgtwist:replica\nSELECT 1", "replica"),
        ("--pgtwist:primary\nSELECT 1", "primary"),
        ("/* app=shop */ /* pgtwist:replica */ SELECT 1", "replica"),
        ("-- request 42\n-- pgtwist:replica\nSELECT 1", "replica"),
        ("/* pgtwist:replica */ /* pgtwist:primary */ SELECT 1", "replica"),  # the first hint wins
        ("/* pgtwist:replica, from the reports page */ SELECT 1", "replica"),
        ("SELECT 1 /* pgtwist:replica */", None),  # not leading
        ("SELECT /* pgtwist:primary */ 1", None),
        ("/* pgtwist:nowhere */ SELECT 1", None),
        ("/* pgtwist:replicas */ SELECT 1", None),
        ("/* something pgtwist:replica */ SELECT 1", None),
        ("SELECT 1", None),
        ("-- pgtwist:replica", "replica"),  # comment only, no newline
        ("/* pgtwist:replica", "replica"),  # unterminated: the parser refuses it, the hint is still read
    ],
)
def test_hints(sql, hint):
    assert classify(sql).hint == hint


def test_hint_is_read_before_a_write_and_classification_still_computed():
    c = classify("/* pgtwist:replica */ INSERT INTO t VALUES (1)")
    assert c.hint == "replica"
    assert not c.read_only and c.reason == "insert"
    c = classify("/* pgtwist:primary */ SELECT 1")
    assert c.hint == "primary" and c.read_only


def test_leading_comment_does_not_hide_a_write():
    c = classify("/* SELECT */ -- SELECT\n DELETE FROM t")
    assert not c.read_only and c.reason == "delete" and c.hint is None


def test_hint_on_unparsable_text():
    c = classify("/* pgtwist:primary */ SELEC 1")
    assert c == Classification(False, "unparsable", hint="primary")


# -- volatility, supplied by the caller -----------------------------------------------------------


def volatile(*names):
    asked = []

    def is_volatile(name):
        asked.append(name)
        return name in names

    is_volatile.asked = asked
    return is_volatile


def test_volatile_function_makes_a_write():
    c = classify("SELECT f(1)", is_volatile=volatile("f"))
    assert not c.read_only and c.reason == "volatile function f"


def test_stable_function_stays_read_only():
    c = classify("SELECT g(1)", is_volatile=volatile("f"))
    assert c.read_only and c.reason == "select"


def test_volatile_function_in_from_and_subquery():
    assert not classify("SELECT * FROM f()", is_volatile=volatile("f")).read_only
    assert not classify("SELECT a FROM t WHERE b IN (SELECT f(c) FROM u)", is_volatile=volatile("f")).read_only


def test_volatility_is_asked_with_the_bare_name():
    is_volatile = volatile("f")
    c = classify("SELECT myschema.f(1)", is_volatile=is_volatile)
    assert not c.read_only and c.reason == "volatile function myschema.f"
    assert is_volatile.asked == ["f"]


def test_read_only_functions_allow_list():
    assert classify("SELECT f(1)", frozenset({"f"}), is_volatile=volatile("f")).read_only
    assert classify("SELECT s.f(1)", frozenset({"s.f"}), is_volatile=volatile("f")).read_only
    assert classify("SELECT s.f(1)", frozenset({"f"}), is_volatile=volatile("f")).read_only
    assert not classify("SELECT t.f(1)", frozenset({"s.f"}), is_volatile=volatile("f")).read_only


def test_allow_list_does_not_cover_known_writers():
    c = classify("SELECT nextval('s')", frozenset({"nextval"}), is_volatile=volatile())
    assert not c.read_only and c.reason == "function nextval"


def test_builtin_volatile_readers_are_not_asked():
    is_volatile = volatile("random", "clock_timestamp", "gen_random_uuid")
    assert classify("SELECT random(), clock_timestamp(), gen_random_uuid()", is_volatile=is_volatile).read_only
    assert is_volatile.asked == []
    # ...but a user's look-alike in its own schema is.
    assert not classify("SELECT app.random()", is_volatile=is_volatile).read_only


def test_first_volatile_function_named():
    c = classify("SELECT a(), b(), c()", is_volatile=volatile("b", "c"))
    assert c.reason == "volatile function b"


def test_without_is_volatile_unknown_functions_read():
    assert classify("SELECT f(1)").read_only


def test_explain_analyze_with_volatile_function():
    assert not classify("EXPLAIN ANALYZE SELECT f()", is_volatile=volatile("f")).read_only
    assert classify("EXPLAIN SELECT f()", is_volatile=volatile("f")).read_only  # not executed


def test_multi_statement_volatile_function():
    assert not classify("SELECT 1; SELECT f()", is_volatile=volatile("f")).read_only


# -- caching and limits ---------------------------------------------------------------------------


def test_parse_is_cached_by_text_but_volatility_is_not():
    analysis.cache_clear()
    sql = "SELECT cached_probe_fn(1)"
    assert classify(sql).read_only
    assert not classify(sql, is_volatile=volatile("cached_probe_fn")).read_only
    assert classify(sql, is_volatile=volatile()).read_only
    info = analysis.cache_info()
    assert info.misses == 1 and info.hits == 2


def test_long_texts_are_not_cached():
    analysis.cache_clear()
    sql = "SELECT 1 " + " " * analysis.MAX_CACHED_LENGTH
    assert classify(sql).read_only
    assert analysis.cache_info().currsize == 0


def test_too_long_to_parse(monkeypatch):
    monkeypatch.setattr(analysis, "MAX_PARSE_LENGTH", 100)
    long_insert = "/* pgtwist:replica */ INSERT INTO t VALUES " + ",".join(f"({i})" for i in range(50))
    c = analysis._analyze(long_insert).classification
    assert c == Classification(False, "insert", hint="replica")
    long_select = "SELECT " + ",".join(str(i) for i in range(50))
    assert analysis._analyze(long_select).classification == Classification(False, "too long to classify")


def test_bulk_insert_is_judged_by_its_first_keyword():
    # A 2 MB INSERT would take seconds to parse: the first keyword decides it.
    sql = "INSERT INTO t VALUES " + ",".join(f"({i}, 'x')" for i in range(150_000))
    assert len(sql) > analysis.MAX_PARSE_LENGTH
    assert classify(sql).reason == "insert"


def test_too_deeply_nested_goes_to_the_primary():
    c = classify("SELECT " + " + ".join(["1"] * 8000))
    assert c == Classification(False, "too complex to classify")
    assert classify("SELECT " + "(" * 1000 + "1" + ")" * 1000).read_only


# == session effects ==============================================================================


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
        ("CREATE TABLE pg_temp.t (a int)", lambda e: e.pin == "temporary table"),  # (temporary by its schema)
        ("CREATE VIEW pg_temp.v AS SELECT 1", lambda e: e.pin == "temporary view"),
        ("LISTEN chan", lambda e: e.pin == "LISTEN"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", lambda e: e.pin == "cursor WITH HOLD"),
        ("PREPARE p1 AS SELECT 1", lambda e: e.pin == "SQL PREPARE"),
        ("DEALLOCATE p1", lambda e: e.deallocate == ("p1",)),
        ("DEALLOCATE ALL", lambda e: e.deallocate_all),
        ("SET ROLE other", lambda e: e.pin == "SET ROLE"),
        # Back to the login role, which every pooled connection has: nothing to keep (review:
        # an application's cleanup pinned every session, and now sends it to the primary).
        ("RESET ROLE", lambda e: e.pin is None),
        ("SET ROLE NONE", lambda e: e.pin is None),
        ("SET role TO DEFAULT", lambda e: e.pin is None),
        ("RESET SESSION AUTHORIZATION", lambda e: e.pin is None),
        ("SET SESSION AUTHORIZATION DEFAULT", lambda e: e.pin is None),
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


def test_texts_that_differ_only_in_numbers_are_judged_once():
    analysis.cache_clear()
    for aid in (1, 7, 22, 95, 333):
        assert inspect_query(body(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}")) is NO_EFFECTS
    # (once per width of the number: its digits are made 0s, not taken out)
    assert analysis._NO_KEYWORD == {b"SELECT abalance FROM pgbench_accounts WHERE aid = " + w + b"\0" for w in (b"0", b"00", b"000")}
    assert analysis.cache_info().misses == 0
    # ... but a number never hides a keyword, nor does the remembered verdict of another text.
    assert inspect_query(body("SELECT pg_advisory_lock(7)")).pin
    assert inspect_query(body("DEALLOCATE p7")).deallocate == ("p7",)
    assert inspect_query(body("DEALLOCATE p8")).deallocate == ("p8",)


def test_the_memory_of_plain_texts_is_bounded(monkeypatch):
    monkeypatch.setattr(analysis, "_NO_KEYWORD_LIMIT", 3)
    analysis._NO_KEYWORD.clear()
    for word in ("a", "b", "c", "d", "e"):
        inspect_query(body(f"SELECT '{word}'"))
        assert len(analysis._NO_KEYWORD) <= 3


_FRAGMENTS = st.sampled_from(
    ["SELECT ", "set", "SeT", "s", "et", "_config(", "'a', 'b', false)", "1", "23", " ", "pg_advisory_lock(", ")",
     "TEMP", "temporary", "LISTEN x", "DISCARD ALL", "RESET ALL", "dea", "llocate", "é", "\u2603", ";", "\n"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=8).map("".join))
def test_the_prefilter_never_misses_what_the_parser_sees(sql):
    analysis._NO_KEYWORD.clear()
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
        "SELECT * INTO t4 FROM t",  # makes a table, as CREATE TABLE AS does
        "select a into unlogged t5 from t where a > 3",
        "WITH x AS (SELECT 1 AS a) SELECT a INTO t6 FROM x",
        "EXPLAIN ANALYZE CREATE TABLE t7 AS SELECT 1 AS a",  # (EXPLAIN ANALYZE runs what it explains)
        "explain (analyze, buffers) select 1 as a into t8",
        "/* x */ EXPLAIN ANALYZE CREATE MATERIALIZED VIEW m AS SELECT 1 AS a",
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
        "SELECT into_date, \"into\" FROM t",  # (a word, not SELECT ... INTO)
        "EXPLAIN CREATE TABLE t9 AS SELECT 1 AS a",  # (planned, not run)
        "EXPLAIN (ANALYZE false) SELECT 1 AS a INTO t9",
        "WITH x AS (SELECT 1 AS a) INSERT INTO t SELECT a FROM x",
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


# == one parse, one cache, one prefilter ============================================================


PLAIN = [
    "BEGIN",
    "begin;",
    "COMMIT",
    "END",
    "ROLLBACK",
    "ABORT",
    "START TRANSACTION",
    "UPDATE pgbench_accounts SET abalance = abalance + -4236 WHERE aid = 51234;",
    "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 9, -4236, CURRENT_TIMESTAMP);",
    "delete from t where a = $1 returning *",
]


@pytest.mark.parametrize("sql", PLAIN)
def test_the_commonest_statements_skip_the_parser_and_agree_with_it(sql):
    analysis.cache_clear()
    quick = analysis.analyze(sql)
    assert analysis.cache_info().misses == 0  # (no parse, nothing cached)
    assert quick == analysis._analyze(sql)
    assert inspect_query(body(sql)) is NO_EFFECTS


def test_one_parse_answers_both_questions():
    analysis.cache_clear()
    sql = "SET work_mem = 2048"
    assert inspect_query(body(sql)).settings == {"work_mem"}
    assert classify(sql) == Classification(True, "SET")
    assert classify(sql.replace("2048", "4096")).read_only
    info = analysis.cache_info()
    assert info.misses == 1 and info.hits == 2


def test_a_select_is_parsed_for_its_classification_but_not_for_its_effects():
    analysis.cache_clear()
    sql = "SELECT abalance FROM pgbench_accounts WHERE aid = 5"
    assert inspect_query(body(sql)) is NO_EFFECTS and analysis.cache_info().misses == 0
    assert classify(sql) == Classification(True, "select")
    assert classify("SELECT * FROM") == Classification(False, "unparsable")  # (a syntax error: the primary)


def test_a_deallocated_name_made_of_digits_is_not_taken_for_a_number():
    assert inspect('DEALLOCATE "7"').deallocate == ("7",)
    assert inspect('DEALLOCATE "10"').deallocate == ("10",)


def test_a_dml_statement_calling_set_config_is_parsed():
    assert inspect("UPDATE t SET a = 1 WHERE set_config('work_mem', '1MB', false) IS NOT NULL").settings == {"work_mem"}
    assert inspect("UPDATE t SET a = 1; SET search_path = x").settings == {"search_path"}
    assert inspect("INSERT INTO t SELECT pg_advisory_lock(1)").pin
    assert inspect("SELECT 1 INTO TEMP x").pin == "temporary table"


_PLAIN_FRAGMENTS = st.sampled_from(
    ["SELECT ", "UPDATE ", "insert ", "DELETE ", "BEGIN", "commit", " t SET a = 1", "set_config('a', 'b', false)",
     "pg_advisory_lock(1)", "INTO TEMP x", "1", " ", ";", "\n", "-- c\n", "/* pgtwist:replica */", "u&\"x\"", "(", ")"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PLAIN_FRAGMENTS, max_size=6).map("".join))
def test_what_the_prefilter_decides_alone_is_what_the_parser_says(sql):
    quick = analysis._prefilter(sql.lower())[1]
    full = analysis._analyze(sql)
    if quick is not None:
        assert quick.effects == full.effects
        if full.classification.reason != "unparsable":
            assert quick.classification == full.classification
        else:
            assert not quick.classification.read_only  # (only called by its keyword)
    assert analysis.session_effects(sql) == full.effects


@pytest.mark.parametrize(
    "sql, frees",
    [
        ("DROP DATABASE scratch", ("scratch",)),
        ('drop database if exists "Mixed Case"', ("Mixed Case",)),
        ('DROP DATABASE "7"', ("7",)),  # (digits: the cache's key would lose them)
        ("DROP DATABASE a WITH (FORCE)", ("a",)),
        ("ALTER DATABASE old RENAME TO new", ("old",)),
        ("ALTER DATABASE db SET TABLESPACE fast", ("db",)),
        ("CREATE DATABASE copy TEMPLATE source OWNER app", ("source",)),
        ("CREATE DATABASE fresh", ()),
        ("ALTER DATABASE db SET work_mem = '1MB'", ()),
        ("ALTER TABLE t RENAME TO u", ()),
        ("DROP TABLE scratch", ()),
    ],
)
def test_statements_that_need_their_database_free_of_other_sessions(sql, frees):
    effects = inspect(sql)
    assert effects.frees == frees
    assert effects.changes_state or not frees
    assert inspect_query(sql.encode() + b"\x00").frees == frees


def test_insert_select_texts_that_make_no_table_skip_the_parser(monkeypatch):
    # (Review.) SELECT ... INTO is looked for after a SELECT; an INSERT INTO ... SELECT is not
    # one: a long one would be parsed on every Query, a short one with a varying literal would
    # miss the cache each time.
    from pgtwist.routing import analysis

    parses = []
    real = analysis._analyze
    monkeypatch.setattr(analysis, "_analyze", lambda sql: parses.append(sql) or real(sql))
    cols = ", ".join(f"c{i}" for i in range(400))
    long = f"WITH src AS (SELECT {cols} FROM staging WHERE batch = $1) INSERT INTO target ({cols}) SELECT {cols} FROM src"
    assert len(long) > analysis.MAX_CACHED_LENGTH
    for _ in range(3):
        analysis.query_effects(long.encode() + b"\x00")
    for i in range(3):
        analysis.query_effects(f"INSERT INTO a VALUES (1); INSERT INTO b SELECT * FROM c WHERE k = 'k{i}'".encode() + b"\x00")
    assert parses == []
