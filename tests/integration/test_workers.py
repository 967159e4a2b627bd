"""workers = 2 against real PostgreSQL: both workers serve, cancels cross workers, SIGHUP, SIGTERM, a killed worker."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import psycopg
import pytest

from tests.harness import proxy as proxymod
from tests.harness.proxy import wait_for
from tests.harness.workers import local_port, on_each_worker, worker_of, worker_pids

pytestmark = pytest.mark.integration


@pytest.fixture
def px(pg_cluster, tmp_path):
    metrics_port = proxymod.free_port(proxymod.HOST)
    with proxymod.start_proxy(
        pg_cluster, tmp_path, workers=2, pool_size=24, shutdown_timeout=10,  # (per worker: the kernel may hand one worker every client)
        metrics={"listen": f"{proxymod.HOST}:{metrics_port}"}, admin={"users": [pg_cluster.app_user]},
    ) as running:
        running.metrics_port = metrics_port
        wait_for(lambda: len(worker_pids(running)) == 2 and running.log_text().count("listening on") >= 3, 20, "both workers up")
        yield running


def test_many_clients_are_served_by_both_workers(px):
    conns = [px.connect() for _ in range(20)]
    try:
        for i, conn in enumerate(conns):
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone()[0] == i + 1
        served = {worker_of(px, conn) for conn in conns}
        # The admin console, on whichever worker it lands, shows every worker's clients, server
        # connections, node pools, memory and sockets, with a worker column.
        with px.connect(dbname="pgbalance") as console:
            for what in ("CLIENTS", "SERVERS", "NODE_POOLS", "NODES", "MEM", "FDS"):
                cur = console.execute(f"SHOW {what}")
                names = [d.name for d in cur.description]
                assert names[-1] == "worker"
                rows = cur.fetchall()
                assert {row[-1] for row in rows} == {0, 1}, (what, rows)
            # PgBouncer's views of counts add the workers up, one row per key as pgbouncer_exporter
            # needs (a duplicate label set fails its whole scrape).
            for what, key in (("POOLS", ("database", "user")), ("STATS", ("database",)), ("STATS_TOTALS", ("database",)),
                              ("STATS_AVERAGES", ("database",)), ("DATABASES", ("name",)), ("LISTS", ("list",))):
                cur = console.execute(f"SHOW {what}")
                names = [d.name for d in cur.description]
                assert "worker" not in names, what
                rows = [dict(zip(names, row)) for row in cur.fetchall()]
                keys = [tuple(r[k] for k in key) for r in rows]
                assert len(keys) == len(set(keys)), (what, keys)
                if what == "POOLS":
                    app = next(r for r in rows if r["database"] == "appdb")
                    assert app["cl_active"] + app["cl_waiting"] >= len(conns), app  # both workers' clients
                if what == "STATS_TOTALS":
                    appdb = next(r for r in rows if r["database"] == "appdb")
                    assert appdb["query_count"] >= len(conns), appdb  # both workers' queries
                if what == "LISTS":
                    assert {r["list"]: r["items"] for r in rows}["used_clients"] >= len(conns) + 1
            cur = console.execute("SHOW CLIENTS")
            names = [d.name for d in cur.description]
            clients = [dict(zip(names, row)) for row in cur.fetchall()]
            ours = {local_port(conn): conn for conn in conns}
            mine = [r for r in clients if r["port"] in ours]
            assert len(mine) == len(conns)
            assert all(r["id"].startswith(f"w{r['worker']}.c") for r in mine)  # (ids are unique in the tree)
            # KILL reaches a client of either worker, whichever the console is on.
            victims = [next(r for r in mine if r["worker"] == w) for w in (0, 1)]
            for r in victims:
                console.execute(f"KILL {r['id']}")
            for r in victims:
                with pytest.raises(psycopg.OperationalError):
                    ours[r["port"]].execute("SELECT 1")
    finally:
        for conn in conns:
            conn.close()
    # PAUSE (which waits, as PgBouncer's does, for the session-mode clients to have left) and
    # RESUME on one console reach every worker's pools.
    with px.connect(dbname="pgbalance") as console:
        for verb, paused in (("PAUSE", True), ("RESUME", False)):
            console.execute(verb)
            cur = console.execute("SHOW NODE_POOLS")
            names = [d.name for d in cur.description]
            pools = [dict(zip(names, row)) for row in cur.fetchall()]
            assert {p["worker"] for p in pools} == {0, 1}
            assert all(p["paused"] is paused for p in pools), pools
    assert served == {0, 1}
    # One /metrics for the tree: every sample says its worker.
    text = urllib.request.urlopen(f"http://{proxymod.HOST}:{px.metrics_port}/metrics", timeout=10).read().decode()
    assert 'pgbalance_clients_accepted_total{worker="0"}' in text
    assert 'pgbalance_clients_accepted_total{worker="1"}' in text
    assert "pgbalance_workers_up 2.0" in text
    assert text.count("# TYPE pgbalance_clients_accepted_total counter") == 1


def test_cancel_reaches_the_owner_whichever_worker_accepts_it(px, admin):
    # Which worker accepts the cancel's connection is the kernel's choice (SO_REUSEPORT spreads
    # them), so this goes on until both cases happened. Either way conn.cancel() returns only when
    # the cancel has landed, so the `SELECT 1` after it is never the one cancelled.
    seen = {"crossed": 0, "same": 0}
    give_up = time.monotonic() + 70  # (the per-test deadline is 90 s)
    while time.monotonic() < give_up:
        with px.connect() as conn:
            before = px.log_text().count("forwarded there")
            errors = []

            def sleep():
                try:
                    conn.execute("SELECT pg_sleep(20)")
                except psycopg.errors.QueryCanceled as e:
                    errors.append(e)

            t = threading.Thread(target=sleep)
            started = time.monotonic()
            t.start()
            # A cancel that arrives before the query would be lost, as with PostgreSQL: wait until it runs.
            wait_for(
                lambda: admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' AND state = 'active'"
                ).fetchone()[0],
                10,
                "pg_sleep running",
                interval=0.02,
            )
            conn.cancel()
            t.join(15)
            assert not t.is_alive()
            assert errors and errors[0].sqlstate == "57014", "pg_sleep was not cancelled"
            assert time.monotonic() - started < 10
            assert conn.execute("SELECT 1").fetchone()[0] == 1  # the session goes on
            crossed = px.log_text().count("forwarded there") > before
            seen["crossed" if crossed else "same"] += 1
        if seen["crossed"] >= 2 and seen["same"] >= 1:
            break
    assert seen["crossed"] and seen["same"], seen


def test_sighup_reloads_every_worker(px):
    text = px.config_path.read_text()
    px.config_path.write_text(text.replace("pool_size = 24", "pool_size = 25"))
    since = px.log_size()
    os.kill(px.pid, signal.SIGHUP)
    for i in (0, 1):
        wait_for(lambda: re.search(r"worker %d: .*reload: .* applied; changed: .*pool_size" % i, px.log_text(since)), 15, f"worker {i} reloaded")
    with px.connect() as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_a_sighup_while_the_workers_start_waits_for_them(pg_cluster, tmp_path):
    # start_proxy returns once the supervisor's socket accepts, about a second before the
    # workers' Python has its handlers in: SIGHUP's default action used to kill both there.
    with proxymod.start_proxy(pg_cluster, tmp_path, workers=2, pool_size=24) as px:
        px.config_path.write_text(px.config_path.read_text().replace("pool_size = 24", "pool_size = 25"))
        os.kill(px.pid, signal.SIGHUP)
        for i in (0, 1):
            # (a worker that read the file after the change has nothing left to apply)
            wait_for(lambda: re.search(r"worker %d: .*reload: .* applied" % i, px.log_text()), 30, f"worker {i} reloaded")
        with px.connect() as conn:
            assert conn.execute("SELECT 1").fetchone()[0] == 1
        assert "killed by signal" not in px.log_text()
        assert len(worker_pids(px)) == 2 and px.log_text().count("started (pid") == 2


def test_sigterm_drains_every_worker(px):
    # A transaction open on each worker: both may finish it after SIGTERM, then are closed (57P01).
    # One per worker: extra connections are closed at once, so a kernel that hands one worker
    # every new client never leaves it short of server connections while we look for the other.
    by_worker: dict[int, psycopg.Connection] = {}
    for _ in range(60):
        conn = px.connect(autocommit=False)
        worker = worker_of(px, conn)
        if worker in by_worker:
            conn.close()
            continue
        conn.execute("SELECT 1")
        by_worker[worker] = conn
        if len(by_worker) == 2:
            break
    assert set(by_worker) == {0, 1}
    conns = list(by_worker.values())
    os.kill(px.pid, signal.SIGTERM)
    for i in (0, 1):
        wait_for(lambda: re.search(r"worker %d: .*draining" % i, px.log_text()), 15, f"worker {i} draining")
    for conn in conns:
        assert conn.execute("SELECT 2").fetchone()[0] == 2
        conn.commit()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 3")
            conn.commit()
        conn.close()
    px.process.wait(30)
    assert px.process.returncode == 0
    assert not proxymod.port_accepts(proxymod.HOST, px.port)


def test_a_killed_worker_is_restarted(px):
    pids = worker_pids(px)
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: worker_pids(px).get(0) not in (None, pids[0]), 20, "worker 0 restarted")
    assert re.search(r"worker 0 \(pid %d\) was killed by signal 9 \(SIGKILL\) after .* restarting it in" % pids[0], px.log_text())
    wait_for(lambda: px.log_text().count("listening on") >= 4, 20, "the new worker 0 listening")
    conns = [px.connect() for _ in range(16)]
    try:
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone()[0] == 1
    finally:
        for conn in conns:
            conn.close()
    assert worker_pids(px)[1] == pids[1]  # the other one was left alone


def test_sigint_stops_every_worker_at_once(px):
    conn = px.connect(autocommit=False)
    conn.execute("SELECT 1")  # in a transaction: SIGINT does not wait for it
    os.kill(px.pid, signal.SIGINT)
    px.process.wait(20)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 2")
    conn.close()
    for pid in worker_pids(px).values():
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read(), 10, f"worker {pid} gone")


def test_each_workers_manhole_has_its_port(pg_cluster, tmp_path):
    from tests.harness.ops import screen_text, ssh_keygen, ssh_repl

    key = ssh_keygen(tmp_path / "key")
    (tmp_path / "authorized_keys").write_text((tmp_path / "key.pub").read_text())
    port = proxymod.free_port(proxymod.HOST)
    manhole = {"listen": f"{proxymod.HOST}:{port}", "authorized_keys": "authorized_keys", "host_key": "host_key"}
    with proxymod.start_proxy(pg_cluster, tmp_path, workers=2, manhole=manhole) as px:
        wait_for(lambda: px.log_text().count("manhole: SSH on") >= 2, 20, "both workers' manholes")
        assert f"manhole: worker I listens on {proxymod.HOST}:{port}+I (ports {port}-{port + 1})" in px.log_text()
        for index in (0, 1):
            screen = screen_text(ssh_repl(port + index, key, ['"WORKER=%d" % service.worker.index']).stdout)
            assert f"'WORKER={index}'" in screen, screen


def test_a_cancel_for_a_statement_waiting_for_a_connection_reaches_its_worker(pg_cluster, tmp_path):
    # The statement waits in its worker's pool (pool_size 1, taken by a transaction); the cancel
    # is answered there with 57014 and the statement never runs, whichever worker accepts the
    # cancel's connection (forwarded by its key). Repeated until the cancel crossed workers once.
    with proxymod.start_proxy(
        pg_cluster, tmp_path, workers=2, pool_size=1, pool_mode="transaction", log_connections=True,
        admin={"users": [pg_cluster.app_user]},
    ) as px:
        wait_for(lambda: px.log_text().count("listening on") >= 3, 30, "both workers up")
        crossed = same = 0
        give_up = time.monotonic() + 60
        while not crossed and time.monotonic() < give_up:
            conns = [px.connect(autocommit=True) for _ in range(6)]
            by_worker: dict[int, list] = {}
            for conn in conns:
                by_worker.setdefault(worker_of(px, conn), []).append(conn)
            pair = next((v for v in by_worker.values() if len(v) >= 2), None)
            assert pair is not None
            holder, waiter = pair[:2]
            try:
                holder.execute("BEGIN")
                holder.execute("SELECT 1")  # (the worker's one server connection is held)
                errors = []

                def wait():
                    try:
                        waiter.execute("SELECT 42")
                    except psycopg.errors.QueryCanceled as e:
                        errors.append(e)

                t = threading.Thread(target=wait)
                t.start()
                with px.connect(dbname="pgbalance") as console:
                    wait_for(lambda: proxymod.clients_waiting(console), 10, "the statement waiting", interval=0.02)
                before = px.log_text().count("forwarded there")
                waiter.cancel()
                t.join(10)
                assert not t.is_alive() and errors and errors[0].sqlstate == "57014"
                holder.execute("COMMIT")
                assert waiter.execute("SELECT 7").fetchone()[0] == 7  # the session goes on
                if px.log_text().count("forwarded there") > before:
                    crossed += 1
                else:
                    same += 1
            finally:
                for conn in conns:
                    conn.close()
        assert crossed, (crossed, same)


def test_ddl_through_one_worker_makes_the_others_prepare_their_statements_again(pg_cluster, tmp_path):
    # Each worker shares prepared statements over its own server connections with a schema clock
    # of its own: without word of the other worker's DDL, the copy prepared before it answered
    # 0A000 "cached plan must not change result type" inside a transaction (no retry there).
    with proxymod.start_proxy(
        pg_cluster, tmp_path, workers=2, pool_size=1, pool_mode="transaction", log_connections=True,
    ) as px:
        wait_for(lambda: px.log_text().count("listening on") >= 3, 30, "both workers up")
        table = f"wddl_{os.getpid()}"
        migrator, app = on_each_worker(px, autocommit=True)
        with migrator, app:
            migrator.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (a int)")
            migrator.execute(f"INSERT INTO {table} VALUES (1)")
            for round in range(3):
                assert app.execute(f"SELECT * FROM {table}", prepare=True).fetchall()[0][0] == 1
                migrator.execute(f"ALTER TABLE {table} ADD COLUMN c{round} int")
                with app.transaction():
                    row = app.execute(f"SELECT * FROM {table}", prepare=True).fetchone()
                assert len(row) == 2 + round
            migrator.execute(f"DROP TABLE {table}")


def console_on(px, worker: int) -> psycopg.Connection:
    """An admin console connection that *worker* serves."""
    for _ in range(40):
        conn = px.connect(dbname="pgbalance", autocommit=True)
        if worker_of(px, conn) == worker:
            return conn
        conn.close()
    raise AssertionError(f"no console on worker {worker}")


def config_value(console: psycopg.Connection, key: str):
    return next(row[1] for row in console.execute("SHOW CONFIG").fetchall() if row[0] == key)


def test_console_commands_act_on_every_worker(px):
    # The operator asked the one pgtwist, whichever worker the console landed on: DISABLE, SET,
    # RECONNECT and KILL db acted on that worker alone (new clients of the others still came in,
    # the others kept their old pool_size and their server connections).
    with console_on(px, 0) as console, console_on(px, 1) as other:
        console.execute("DISABLE appdb")
        for _ in range(8):  # (spread over both workers by the kernel)
            with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
                px.connect()
        console.execute("ENABLE appdb")
        with px.connect() as conn:
            assert conn.execute("SELECT 1").fetchone()[0] == 1

        console.execute("SET query_wait_timeout = 17")
        assert str(config_value(other, "query_wait_timeout")) in ("17", "17.0")

        app = on_each_worker(px)
        for conn in app:
            conn.execute("SELECT 1")
            conn.close()

        def servers():
            return {row[-1] for row in console.execute("SHOW SERVERS").fetchall()}

        wait_for(lambda: servers() == {0, 1}, 10, "server connections on both workers")
        console.execute("RECONNECT appdb")
        wait_for(lambda: servers() == set(), 10, "every worker's server connections closed")

        app = on_each_worker(px)
        console.execute("KILL appdb")
        for conn in app:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
            conn.close()
        console.execute("RESUME appdb")
        with px.connect() as conn:
            assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_a_frozen_worker_costs_the_console_its_rows_and_the_other_workers_clients_nothing(px):
    # A console command asked the other workers one after another, blocking its own worker's
    # reactor for each: with one worker frozen (SIGSTOP), a SHOW (an exporter's scrape, say) held
    # every client of the console's worker for a second. The SHOW now waits alone.
    app = on_each_worker(px)
    with console_on(px, 0) as console:
        notices = []
        console.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        frozen = worker_pids(px)[1]
        os.kill(frozen, signal.SIGSTOP)
        try:
            order, shown = [], []

            def show():
                shown.extend(console.execute("SHOW CLIENTS").fetchall())
                order.append("SHOW")

            t = threading.Thread(target=show)
            t.start()
            time.sleep(0.3)  # (the SHOW is asked and waits SHOW_TIMEOUT, 1 s, for worker 1)
            assert app[0].execute("SELECT 1").fetchone()[0] == 1
            order.append("SELECT")
            t.join(10)
            assert order == ["SELECT", "SHOW"]
            assert {row[-1] for row in shown} == {0}
            assert notices == ["worker 1 did not answer: its rows are missing"]
            # A command the frozen worker cannot take is done on the others, and says so.
            console.execute("SET query_wait_timeout = 19")
            assert notices[-1] == "worker 1 did not answer: not done there"
            assert str(config_value(console, "query_wait_timeout")) in ("19", "19.0")
        finally:
            os.kill(frozen, signal.SIGCONT)
        notices.clear()
        assert {row[-1] for row in console.execute("SHOW CLIENTS").fetchall()} == {0, 1} and notices == []
    for conn in app:
        conn.close()


def test_a_frozen_worker_leaves_scrapes_and_probes_answered(px):
    # /metrics and /readyz ask every worker; one frozen (SIGSTOP) held them until the scraper
    # gave up: a scrape failed whole, and a readiness probe took a ready pgtwist out of service.
    base = f"http://{proxymod.HOST}:{px.metrics_port}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=15) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    assert get("/readyz") == (200, "ready: 2 of 2 workers ready\n")
    frozen = worker_pids(px)[1]
    os.kill(frozen, signal.SIGSTOP)
    try:
        assert get("/readyz") == (200, "ready: 1 of 2 workers ready\n")
        status, text = get("/metrics")
        assert status == 200 and 'pgbalance_clients_accepted_total{worker="0"}' in text
        assert 'worker="1"' not in text
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert get("/readyz") == (200, "ready: 2 of 2 workers ready\n")


def test_pause_answers_once_no_worker_has_a_server_connection_left(px):
    # PgBouncer's PAUSE answers once the pause is complete (this pgtwist pools sessions: once
    # their clients have left). Under workers = N it answered once the worker it was given on
    # had no server connection left, the others only told: a session still open on another
    # worker held its server connection when the operator went ahead.
    app = on_each_worker(px)
    app[0].close()
    with console_on(px, 0) as console:
        answered = threading.Event()
        t = threading.Thread(target=lambda: (console.execute("PAUSE appdb"), answered.set()))
        t.start()
        try:
            assert not answered.wait(2)  # (worker 1's client is still there)
        finally:
            app[1].close()
        assert answered.wait(10)
        t.join(10)
        assert [row for row in console.execute("SHOW SERVERS").fetchall() if "appdb" in row] == []
        console.execute("RESUME appdb")


def test_a_restarted_worker_takes_on_what_the_console_did(px):
    # PAUSE, DISABLE and SET reach every live worker; one restarted after a death started from the
    # file: it served the database the operator had paused for maintenance, or disabled.
    with console_on(px, 1) as console:
        console.execute("PAUSE appdb")
        console.execute("DISABLE appdb")
        console.execute("SET query_wait_timeout = 17")
        pids = worker_pids(px)
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: worker_pids(px).get(0) not in (None, pids[0]), 20, "worker 0 restarted")
        wait_for(lambda: px.log_text().count("listening on") >= 4, 20, "the new worker 0 listening")
        for _ in range(12):  # (spread over both workers by the kernel)
            with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
                px.connect()
        assert re.search(r"worker 0 restarted: took the console's state from worker 1: PAUSE appdb; DISABLE appdb; SET query_wait_timeout = 17", px.log_text())

        console.execute("ENABLE appdb")
        with console_on(px, 0) as restarted:
            assert str(config_value(restarted, "query_wait_timeout")) in ("17", "17.0")
        # Paused: a new client waits (its login needs a server connection), on either worker.
        answers = []

        def client():
            with px.connect() as conn:
                answers.append(conn.execute("SELECT 1").fetchone()[0])

        clients = [threading.Thread(target=client) for _ in range(10)]
        for t in clients:
            t.start()

        def workers_with_clients():
            cur = console.execute("SHOW CLIENTS")
            names = [d.name for d in cur.description]
            database, worker = names.index("database"), names.index("worker")
            return {row[worker] for row in cur.fetchall() if row[database] == "appdb"}

        wait_for(lambda: workers_with_clients() == {0, 1}, 10, "clients waiting on both workers")
        assert answers == []
        console.execute("RESUME appdb")
        for t in clients:
            t.join(10)
        assert answers == [1] * 10


def test_max_db_connections_caps_every_worker_together(pg_cluster, tmp_path, admin):
    # Set to stay under PostgreSQL's max_connections: each worker took the whole limit, and the
    # node saw twice as many. (A database of its own: the cluster's other tests leave backends.)
    name = f"wlimit_{os.getpid()}"
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {name} OWNER {pg_cluster.app_user}")
    try:
        limit_of_every_worker(pg_cluster, tmp_path, admin, name)
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def limit_of_every_worker(pg_cluster, tmp_path, admin, name):
    with proxymod.start_proxy(
        pg_cluster, tmp_path, workers=2, pool_size=10, pool_mode="transaction", max_db_connections=2, query_wait_timeout=30,
        dbname=name,
    ) as px:
        wait_for(lambda: px.log_text().count("listening on") >= 3, 30, "both workers up")
        seen = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen.append(admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'", (name,)
                ).fetchone()[0])
                time.sleep(0.02)

        def client():
            with px.connect() as conn:
                for _ in range(3):
                    conn.execute("SELECT pg_sleep(0.1)")

        watcher = threading.Thread(target=watch)
        watcher.start()
        clients = [threading.Thread(target=client) for _ in range(12)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(60)
        stop.set()
        watcher.join()
        assert max(seen) == 2, seen


def test_systemd_hears_ready_from_the_supervisor_once_every_worker_is(pg_cluster, tmp_path):
    """Type=notify, NotifyAccess=main (etc/pgbalance.service): systemd heeds the process it
    started alone. The workers sent READY=1 each, as themselves, and the supervisor nothing: the
    unit never became ready and its start timed out."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        manager.settimeout(30)
        with proxymod.start_proxy(pg_cluster, tmp_path, workers=2, pool_size=24, environ={"NOTIFY_SOCKET": path}) as px:
            first = manager.recv(4096).decode()
            assert first.startswith("READY=1") and f"MAINPID={px.pid}\n" in first + "\n", first
            assert "2 workers" in first
            wait_for(lambda: len(worker_pids(px)) == 2, 20, "both workers up")
            with px.connect() as conn:
                assert conn.execute("SELECT 1").fetchone()[0] == 1
            os.kill(px.pid, signal.SIGTERM)
            assert manager.recv(4096).decode().startswith("STOPPING=1")
            manager.settimeout(0.5)
            with pytest.raises(TimeoutError):
                print(manager.recv(4096))  # (nothing from a worker)
