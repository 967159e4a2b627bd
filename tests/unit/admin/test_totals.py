"""PgBouncer's views under workers = N: each worker's rows merged into one row per key (admin.totals)."""

from twisted.internet import defer

from pgtwist.admin import bouncer, console, totals

from tests.harness.admin_support import TestProxy, make_config


def pool_row(database, user, worker, **counts):
    row = {c: 0 for c, _ in bouncer.POOLS_COLUMNS}
    row.update(database=database, user=user, pool_mode="transaction", paused=False, worker=worker)
    row.update(counts)
    return row


def test_pools_add_up_per_database_and_user():
    rows = [
        pool_row("appdb", "app", 0, cl_active=3, cl_waiting=1, sv_active=2, sv_idle=1, nodes=1, pool_size=4, maxwait=1, maxwait_us=500_000),
        pool_row("pgbouncer", "pgbouncer", 0, cl_active=1, pool_mode="statement"),
        pool_row("appdb", "app", 1, cl_active=5, cl_waiting=4, sv_active=4, sv_login=1, nodes=1, pool_size=4, maxwait=2, maxwait_us=100),
        pool_row("appdb", "other", 1, cl_active=1, paused=True),
    ]
    merged = totals.pools(rows)
    assert [(r["database"], r["user"]) for r in merged] == [("appdb", "app"), ("appdb", "other"), ("pgbouncer", "pgbouncer")]
    app = merged[0]
    assert (app["cl_active"], app["cl_waiting"], app["sv_active"], app["sv_idle"], app["sv_login"]) == (8, 5, 6, 1, 1)
    assert (app["nodes"], app["pool_size"]) == (2, 8)  # (pool_size is per worker: the tree holds twice that)
    assert (app["maxwait"], app["maxwait_us"]) == (2, 100)  # the longest wait of either worker, not a sum
    assert app["pool_mode"] == "transaction" and app["paused"] is False
    assert merged[1]["paused"] is True
    assert "worker" not in app
    assert merged[2]["cl_active"] == 1 and merged[2]["pool_mode"] == "statement"


def test_maxwait_carries_microseconds_into_seconds():
    rows = [pool_row("d", "u", 0, maxwait=0, maxwait_us=999_999), pool_row("d", "u", 1, maxwait=1, maxwait_us=0)]
    (row,) = totals.pools(rows)
    assert (row["maxwait"], row["maxwait_us"]) == (1, 0)


def test_stats_totals_add_up():
    a = {"database": "appdb", "xact_count": 10, "query_count": 20, "bytes_received": 100, "bytes_sent": 1000, "xact_time": 50, "query_time": 40, "wait_time": 7, "worker": 0}
    b = dict(a, xact_count=5, query_count=5, wait_time=3, worker=1)
    (row,) = totals.stats_totals([a, b])
    assert row == {"database": "appdb", "xact_count": 15, "query_count": 25, "bytes_received": 200, "bytes_sent": 2000, "xact_time": 100, "query_time": 80, "wait_time": 10}


def test_averages_add_rates_and_weigh_times_by_their_items():
    a = {"database": "appdb", "xact_count": 30, "query_count": 30, "bytes_received": 10, "bytes_sent": 20, "xact_time": 100, "query_time": 90, "wait_time": 0, "worker": 0}
    b = {"database": "appdb", "xact_count": 10, "query_count": 10, "bytes_received": 1, "bytes_sent": 2, "xact_time": 500, "query_time": 490, "wait_time": 40, "worker": 1}
    (row,) = totals.stats_averages([a, b])
    assert (row["xact_count"], row["query_count"], row["bytes_received"], row["bytes_sent"]) == (40, 40, 11, 22)
    assert (row["xact_time"], row["query_time"], row["wait_time"]) == (200, 190, 10)  # (30*100 + 10*500) / 40 ...
    idle = dict(a, xact_count=0, query_count=0, xact_time=0, query_time=0, worker=1)
    (row,) = totals.stats_averages([dict(a, xact_count=0, query_count=0), idle])
    assert row["xact_time"] == 0  # (no items anywhere: nothing to average)


def test_stats_adds_totals_and_rates_and_weighs_times():
    base = {c: 0 for c, _ in bouncer.STATS_COLUMNS}
    a = dict(base, database="appdb", total_xact_count=8, avg_xact_count=3, avg_xact_time=100, avg_query_count=1, avg_query_time=10, worker=0)
    b = dict(base, database="appdb", total_xact_count=2, avg_xact_count=1, avg_xact_time=500, avg_query_count=3, avg_query_time=50, worker=1)
    (row,) = totals.stats([a, b])
    assert (row["total_xact_count"], row["avg_xact_count"], row["avg_query_count"]) == (10, 4, 4)
    assert (row["avg_xact_time"], row["avg_query_time"]) == (200, 40)


def test_lists_add_connections_and_keep_the_config_counts():
    def lists(worker, used_clients, used_servers):
        return [
            {"list": "databases", "items": 2, "worker": worker},
            {"list": "pools", "items": 3, "worker": worker},
            {"list": "used_clients", "items": used_clients, "worker": worker},
            {"list": "used_servers", "items": used_servers, "worker": worker},
        ]

    merged = totals.lists(lists(0, 10, 4) + lists(1, 7, 3))
    assert merged == [{"list": "databases", "items": 2}, {"list": "pools", "items": 3}, {"list": "used_clients", "items": 17}, {"list": "used_servers", "items": 7}]


def test_databases_add_connections_and_show_any_pause():
    a = {"name": "appdb", "pool_size": 4, "current_connections": 3, "current_client_connections": 10, "paused": 0, "worker": 0}
    b = dict(a, current_connections=2, current_client_connections=5, paused=1, worker=1)
    (row,) = totals.databases([a, b])
    assert (row["pool_size"], row["current_connections"], row["current_client_connections"], row["paused"]) == (4, 5, 15, 1)


def test_the_console_merges_pgbouncer_s_views_and_lists_connections_per_worker():
    proxy = TestProxy(make_config())
    proxy.pool_for(proxy.config.databases["appdb"], "app")
    asked = []

    class Link:
        def every_worker(self, what, rows):
            asked.append(what)
            return defer.succeed(([dict(r, worker=0) for r in rows] + [dict(r, worker=1) for r in rows], [2]))

    proxy.worker = Link()
    result = console.run(proxy, "SHOW POOLS")
    assert result.columns == bouncer.POOLS_COLUMNS  # (no worker column: what PgBouncer's tools expect)
    keys = [(row[0], row[1]) for row in result.rows]
    assert len(keys) == len(set(keys))
    assert console.describe("SHOW POOLS", proxy) == bouncer.POOLS_COLUMNS
    assert result.notices == ["worker 2 did not answer: its counts are missing"]
    for what in ("STATS", "STATS_TOTALS", "STATS_AVERAGES", "LISTS", "DATABASES"):
        assert console.run(proxy, f"SHOW {what}").columns == console.describe(f"SHOW {what}", proxy)
    servers = console.run(proxy, "SHOW SERVERS")
    assert servers.columns[-1][0] == "worker"
    assert asked == ["bouncer.pools", "bouncer.stats", "bouncer.stats_totals", "bouncer.stats_averages", "bouncer.lists", "bouncer.databases", "bouncer.servers"]


def test_every_merged_and_listed_view_is_served_by_a_worker():
    from pgtwist.service import peers

    assert {served for served, _ in totals.MERGED.values()} <= set(peers.SHOWN)
    assert set(console.PER_WORKER.values()) <= set(peers.SHOWN)
