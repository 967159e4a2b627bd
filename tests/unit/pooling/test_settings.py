"""Session settings that follow a client: startup options parsed, values quoted as data, the SQL that syncs them."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgtwist.frontend.login import LoginError
from pgtwist.pooling.settings import (
    client_settings,
    parse_options,
    quote_literal,
    quote_name,
    readback_sql,
    sync_sql,
)

from tests.harness.session import parse_e_literal, parse_settings_query


def settings_query(wanted, reported):
    """What a fresh server connection (no settings applied by us yet) is sent: one SELECT, or None."""
    statements = sync_sql(wanted, {}, reported)
    if statements is None:
        return None
    (sql,) = statements  # (nothing applied yet: nothing to RESET)
    return sql


@pytest.mark.parametrize(
    "value, literal",
    [
        ("plain", "E'plain'"),
        ("", "E''"),
        ("it's", "E'it''s'"),
        ("back\\slash", "E'back\\\\slash'"),
        ("\\'", "E'\\\\'''"),
        ("x'; DROP TABLE t; --", "E'x''; DROP TABLE t; --'"),
        ("\\'; DROP TABLE t; --", "E'\\\\''; DROP TABLE t; --'"),
        ("'$$", "E'''$$'"),
    ],
)
def test_quote_literal(value, literal):
    assert quote_literal(value) == literal
    assert parse_e_literal(literal, 0) == (value, len(literal))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_characters="\x00")))
def test_quote_literal_round_trips_anything(value):
    literal = quote_literal(value)
    assert parse_e_literal(literal, 0) == (value, len(literal))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, alphabet=st.characters(exclude_characters="\x00")), st.text(alphabet=st.characters(exclude_characters="\x00")), min_size=1, max_size=5))
def test_settings_query_round_trips(wanted):
    assert parse_settings_query(settings_query(wanted, {})) == wanted


def test_settings_query_injection_attempts_stay_data():
    wanted = {
        "application_name": "x'); DROP TABLE users; --",
        "search_path": "\\'; DROP TABLE t; --",
        "a'b": "c\\",
    }
    sql = settings_query(wanted, {})
    assert parse_settings_query(sql) == wanted
    assert sql.count("pg_catalog.set_config(") == 3


def test_settings_query_skips_what_the_server_already_has():
    assert settings_query({"application_name": "x"}, {"application_name": "x"}) is None
    assert settings_query({}, {"a": "b"}) is None
    sql = settings_query({"application_name": "x", "datestyle": "ISO"}, {"application_name": "x", "DateStyle": "ISO, MDY"})
    assert sql == "SELECT pg_catalog.set_config(E'datestyle', E'ISO', false)"
    # Reported names compare case-insensitively (the node reports DateStyle, clients say datestyle).
    assert settings_query({"datestyle": "ISO, MDY"}, {"DateStyle": "ISO, MDY"}) is None


@pytest.mark.parametrize(
    "options, expected",
    [
        ("", {}),
        ("-c search_path=a,b", {"search_path": "a,b"}),
        ("-csearch_path=a", {"search_path": "a"}),
        ("--work-mem=64MB", {"work_mem": "64MB"}),
        ("-c geqo=off  --statement_timeout=5s", {"geqo": "off", "statement_timeout": "5s"}),
        ("-c application_name=my\\ app", {"application_name": "my app"}),
        ("-c a=b\\\\c", {"a": "b\\c"}),
        ("-c x=it's", {"x": "it's"}),
        ("-c x=", {"x": ""}),
    ],
)
def test_parse_options(options, expected):
    assert parse_options(options) == expected


@pytest.mark.parametrize("options, code", [("-d 5", "0A000"), ("foo", "0A000"), ("-c noequals", "08P01"), ("-c =x", "08P01")])
def test_parse_options_refuses(options, code):
    with pytest.raises(LoginError) as e:
        parse_options(options)
    assert e.value.sqlstate == code


def test_client_settings_merges_options_and_drops_non_settings():
    params = {"user": "u", "database": "d", "replication": "false", "application_name": "a", "options": "-c geqo=off"}
    assert client_settings(params) == {"application_name": "a", "geqo": "off"}


@pytest.mark.parametrize(
    "name, quoted",
    [("geqo", '"geqo"'), ("myapp.tenant", '"myapp"."tenant"'), ('we"ird', '"we""ird"'), ("a.b.c", '"a"."b"."c"')],
)
def test_quote_name_quotes_each_dotted_part(name, quoted):
    assert quote_name(name) == quoted


def test_sync_sql_resets_what_the_client_no_longer_wants_before_setting_the_rest():
    statements = sync_sql({"geqo": "off", "work_mem": "64MB"}, {"geqo": "off", "myapp.tenant": "7"}, {})
    assert statements[0] == 'RESET "myapp"."tenant"'
    assert parse_settings_query(statements[1]) == {"work_mem": "64MB"}  # geqo is already off there
    assert len(statements) == 2


def test_sync_sql_with_everything_in_place_is_none():
    assert sync_sql({"geqo": "off"}, {"geqo": "off"}, {}) is None
    assert sync_sql({}, {}, {"DateStyle": "ISO, MDY"}) is None


def test_sync_sql_sets_again_a_value_the_server_reported_differently():
    # What was applied wins over what the server reported at login: it is the later word.
    assert sync_sql({"datestyle": "ISO, MDY"}, {"datestyle": "German"}, {"DateStyle": "ISO, MDY"}) == [
        "SELECT pg_catalog.set_config(E'datestyle', E'ISO, MDY', false)"
    ]


names = st.text(min_size=1, max_size=8, alphabet="abcxyz._")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(names, st.sampled_from(["1", "2", "on"]), max_size=4), st.dictionaries(names, st.sampled_from(["1", "2", "on"]), max_size=4))
def test_sync_sql_turns_applied_into_wanted(wanted, applied):
    statements = sync_sql(wanted, applied, {}) or []
    resets = [s for s in statements if s.startswith("RESET ")]
    selects = [s for s in statements if s.startswith("SELECT ")]
    assert len(resets) + len(selects) == len(statements) and len(selects) <= 1
    assert statements[: len(resets)] == resets  # RESETs first: a SET after them is not undone
    assert resets == [f"RESET {quote_name(n)}" for n in applied if n not in wanted]
    set_now = parse_settings_query(selects[0]) if selects else {}
    assert set_now == {n: v for n, v in wanted.items() if applied.get(n) != v}


def test_readback_sql_reads_each_setting_in_order_null_if_unknown():
    assert readback_sql(["search_path", "myapp.tenant"]) == (
        "SELECT pg_catalog.current_setting(E'search_path', true), pg_catalog.current_setting(E'myapp.tenant', true)"
    )

