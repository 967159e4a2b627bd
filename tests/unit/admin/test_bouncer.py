"""PgBouncer-shaped views: the avg_* columns over stats_period (StatsPeriods)."""

import struct
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from pgtwist.admin import bouncer

ZERO = dict.fromkeys(("xact_count", "query_count", "received", "sent", "xact_time", "query_time", "wait_time"), 0)


@pytest.fixture
def world(monkeypatch):
    clock = Clock()
    clock.advance(1000)
    totals = {"appdb": dict(ZERO)}
    proxy = SimpleNamespace(
        clock=clock,
        config=SimpleNamespace(stats_period=60.0),
        counters=SimpleNamespace(started=clock.seconds(), periods=None),
    )
    monkeypatch.setattr(bouncer, "_stats_rows", lambda _: [(name, dict(t)) for name, t in totals.items()])
    return proxy, clock, totals


def add(totals, xacts, queries, xact_us, query_us, wait_us=0, received=0, sent=0):
    for key, n in (("xact_count", xacts), ("query_count", queries), ("xact_time", xact_us), ("query_time", query_us),
                   ("wait_time", wait_us), ("received", received), ("sent", sent)):
        totals[key] += n


def test_before_the_first_period_ends_the_averages_run_from_the_start(world):
    proxy, clock, totals = world
    periods = bouncer.StatsPeriods()
    periods.tick(proxy, clock.seconds())
    clock.advance(10)
    add(totals["appdb"], 100, 200, 100 * 50, 200 * 20, received=10_000)
    averages = periods.for_database(proxy, "appdb", totals["appdb"])
    assert averages["xact_count"] == 10 and averages["query_count"] == 20 and averages["received"] == 1000
    assert averages["xact_time"] == 50 and averages["query_time"] == 20


def test_the_averages_describe_the_last_whole_period_only(world):
    proxy, clock, totals = world
    periods = bouncer.StatsPeriods()
    periods.tick(proxy, clock.seconds())
    add(totals["appdb"], 6000, 6000, 6000 * 1000, 6000 * 1000)  # a busy, slow first minute
    clock.advance(60)
    periods.tick(proxy, clock.seconds())
    add(totals["appdb"], 60, 120, 60 * 10, 120 * 5, wait_us=120 * 7)  # a quiet, fast second one
    clock.advance(30)
    periods.tick(proxy, clock.seconds())  # (mid-period: nothing changes)
    first = periods.for_database(proxy, "appdb", totals["appdb"])
    assert first["xact_count"] == 100 and first["xact_time"] == 1000
    clock.advance(30)
    periods.tick(proxy, clock.seconds())
    second = periods.for_database(proxy, "appdb", totals["appdb"])
    assert second["xact_count"] == 1 and second["query_count"] == 2
    assert second["xact_time"] == 10 and second["query_time"] == 5 and second["wait_time"] == 7


def test_a_database_that_appeared_since_the_last_period_shows_zeros(world):
    proxy, clock, totals = world
    periods = bouncer.StatsPeriods()
    periods.tick(proxy, clock.seconds())
    clock.advance(60)
    periods.tick(proxy, clock.seconds())
    totals["newdb"] = dict(ZERO, xact_count=5, query_count=5)
    assert periods.for_database(proxy, "newdb", totals["newdb"]) == ZERO | {"received": 0, "sent": 0}


def test_stats_period_is_checked_and_reloadable():
    from pgtwist import config as configmod

    from tests.harness.admin_support import BASE

    assert configmod.from_dict({**BASE, "stats_period": 15}).stats_period == 15.0
    with pytest.raises(configmod.ConfigError, match="stats_period"):
        configmod.from_dict({**BASE, "stats_period": 0})


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, (0, 0, 0, 0, ())),
        (7, (1, 0, 0, 0, (7,))),
        (10_000, (1, 1, 0, 0, (1,))),  # (trailing zero digits dropped, as PostgreSQL does)
        (123_456_789, (3, 2, 0, 0, (1, 2345, 6789))),
        (-20_001, (2, 1, 0x4000, 0, (2, 1))),
    ],
)
def test_numeric_in_binary_as_postgresql_sends_it(value, encoded):
    from pgtwist.admin.columns import Numeric

    ndigits, weight, sign, dscale, digits = encoded
    assert Numeric.binary(value) == struct.pack(f"!hhHh{ndigits}h", ndigits, weight, sign, dscale, *digits)


def test_server_state_is_the_list_server_counts_puts_it_on():
    conns = [object() for _ in range(6)]
    idle, used, active, lent, testing, resetting = conns
    pool = SimpleNamespace(busy={active, lent, testing, resetting}, lent={lent: None}, testing={testing}, resetting={resetting},
                           due_for_check=lambda conn, now: conn is used)
    assert [bouncer._server_state(pool, c, 0.0) for c in conns] == ["idle", "used", "active", "idle", "tested", "tested"]


def test_tls_column_says_protocol_and_cipher_as_pgbouncer():
    handle = SimpleNamespace(get_protocol_version_name=lambda: "TLSv1.3", get_cipher_name=lambda: "TLS_AES_256_GCM_SHA384")
    tls = SimpleNamespace(TLS=True, protocol=SimpleNamespace(getHandle=lambda: handle))
    assert bouncer._tls(tls) == "TLSv1.3/TLS_AES_256_GCM_SHA384"
    assert bouncer._tls(SimpleNamespace(TLS=False)) == ""  # (PgBouncer: '', not NULL)
    assert bouncer._tls(SimpleNamespace(TLS=True)) == "TLS"  # a TLS transport that cannot say more
