"""Read/write routing against a real primary + 2 streaming replicas (transaction pooling, routing on).

One private cluster and one routing proxy for the module; nothing here is destructive (the
apply-delay test puts the replicas back as they were). Which node served a statement is
what inet_server_port() says.
"""

from __future__ import annotations

import json
import textwrap
import time

import psycopg
import pytest

from pgtwist.tools.localcluster import LocalCluster
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.proxy import DATABASE, RawClient, start_proxy, wait_for
from tests.harness.txhelpers import data_row_values

pytestmark = pytest.mark.integration

READER = "reader"  # a user with route = "replica"
READER_PASSWORD = "reader-secret-1"

# Health checks often so the proxy knows the nodes (and the replicas' replay positions) quickly.
ROUTING: dict = {
    "pool_mode": "transaction",
    "pool_size": 6,
    "query_wait_timeout": 30,
    "health_check_interval": 0.2,
    "health_check_timeout": 2.0,
    "failover_wait": 10.0,
    "read_only_functions": ["listed_fn"],  # volatile in pg_proc, declared read only
}

SETUP_SQL = """
CREATE TABLE rt (id serial PRIMARY KEY, v int, port int);
INSERT INTO rt (v, port) VALUES (0, 0);
CREATE TABLE ryw (id serial PRIMARY KEY, v int);
CREATE SEQUENCE rseq;
CREATE FUNCTION write_fn() RETURNS int LANGUAGE sql VOLATILE
    AS $$ INSERT INTO rt (v, port) VALUES (7, inet_server_port()) RETURNING inet_server_port() $$;
CREATE FUNCTION stable_fn() RETURNS int LANGUAGE sql STABLE AS $$ SELECT inet_server_port() $$;
CREATE FUNCTION listed_fn() RETURNS int LANGUAGE sql VOLATILE AS $$ SELECT inet_server_port() $$;
"""


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster.create(replicas=2) as c:
        c.psql(c.nodes[0], SETUP_SQL, user=c.app_user, dbname=c.app_database)
        c.psql(
            c.nodes[0],
            f"CREATE ROLE {READER} LOGIN PASSWORD '{READER_PASSWORD}'; GRANT SELECT ON rt TO {READER};",
            dbname=c.app_database,
        )
        c.wait_replicas_caught_up(30)
        yield c


def cluster_databases(cluster) -> dict:
    return {DATABASE: {"dbname": cluster.app_database, "nodes": [n.addr for n in cluster.nodes]}}


def cluster_users(cluster) -> dict:
    return {
        cluster.app_user: {"password": cluster.app_password},
        READER: {"password": READER_PASSWORD, "route": "replica"},
    }


@pytest.fixture(scope="module")
def rproxy(cluster, tmp_path_factory):
    with start_proxy(
        cluster,
        tmp_path_factory.mktemp("routing"),
        databases=cluster_databases(cluster),
        users=cluster_users(cluster),
        **ROUTING,
    ) as px:
        wait_until_routing(px, cluster)
        yield px


def ports(cluster) -> tuple[int, int, int]:
    primary, r1, r2 = cluster.nodes
    return primary.port, r1.port, r2.port


def wait_until_routing(px, cluster, timeout: float = 20) -> None:
    """Until the proxy's monitor knows the roles: reads reach both replicas, a write the primary."""
    primary, r1, r2 = ports(cluster)
    seen: set[int] = set()

    def both_replicas():
        with px.connect() as conn:
            for _ in range(6):
                seen.add(conn.execute("SELECT inet_server_port()").fetchone()[0])
        return {r1, r2} <= seen

    wait_for(both_replicas, timeout, f"reads on both replicas (seen {seen})")
    with px.connect() as conn:
        wait_for(
            lambda: conn.execute("SELECT nextval('rseq'), inet_server_port()").fetchone()[1] == primary,
            timeout,
            "a write on the primary",
        )


def one(conn, sql: str, params=None):
    return conn.execute(sql, params).fetchone()


def raw_rows(client: RawClient, sql: str) -> list[list[str | None]]:
    """Every DataRow of a simple Query (all its statements)."""
    return [data_row_values(body) for t, body in client.query(sql) if t == p.DATA_ROW]


# --------------------------------------------------------------------------- reads and writes


def test_autocommit_reads_spread_over_both_replicas(rproxy, cluster):
    primary, r1, r2 = ports(cluster)
    counts = {primary: 0, r1: 0, r2: 0}
    with rproxy.connect() as a, rproxy.connect() as b:
        for _ in range(20):
            for conn in (a, b):
                counts[one(conn, "SELECT inet_server_port()")[0]] += 1
        # Extended protocol with parameters: reads too.
        for _ in range(10):
            counts[one(a, "SELECT inet_server_port() + %s", (0,))[0]] += 1
    assert counts[primary] == 0, counts
    # Least-outstanding with round robin among equals: each replica gets a fair share.
    assert counts[r1] >= 10 and counts[r2] >= 10, counts


def test_writes_and_reads_in_a_write_transaction_hit_the_primary(rproxy, cluster):
    primary, r1, r2 = ports(cluster)
    with rproxy.connect() as conn:
        assert one(conn, "INSERT INTO rt (v, port) VALUES (1, inet_server_port()) RETURNING port")[0] == primary
        assert one(conn, "UPDATE rt SET v = v + 1 WHERE v = 1 RETURNING inet_server_port()")[0] == primary
        with conn.transaction():
            conn.execute("INSERT INTO rt (v, port) VALUES (2, inet_server_port())")
            assert one(conn, "SELECT inet_server_port()")[0] == primary
            # The transaction's own row is visible: same server, same transaction.
            assert one(conn, "SELECT count(*) FROM rt WHERE v = 2")[0] >= 1
        # A transaction that starts with a read still goes to the primary (it may write later).
        with conn.transaction():
            assert one(conn, "SELECT inet_server_port()")[0] == primary
            conn.execute("DELETE FROM rt WHERE v = 2")
    # Non-autocommit (psycopg's implicit BEGIN): the same.
    with rproxy.connect(autocommit=False) as conn:
        assert one(conn, "SELECT inet_server_port()")[0] == primary
        conn.execute("INSERT INTO rt (v, port) VALUES (3, inet_server_port())")
        conn.commit()


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param(
            "WITH w AS (INSERT INTO rt (v, port) VALUES (10, inet_server_port()) RETURNING port) SELECT port FROM w",
            id="writable-cte",
        ),
        pytest.param("SELECT inet_server_port() FROM rt LIMIT 1 FOR UPDATE", id="for-update"),
        pytest.param("SELECT nextval('rseq') * 0 + inet_server_port()", id="nextval"),
        pytest.param("SELECT write_fn()", id="volatile-writing-function"),
        pytest.param(
            "/* an application's comment */ INSERT INTO rt (v, port) VALUES (11, inet_server_port()) RETURNING port",
            id="leading-comment",
        ),
        pytest.param(
            "-- a line comment\nINSERT INTO rt (v, port) VALUES (12, inet_server_port()) RETURNING port",
            id="leading-line-comment",
        ),
    ],
)
def test_writes_in_disguise_reach_the_primary(rproxy, cluster, sql):
    primary, _, _ = ports(cluster)
    with rproxy.connect() as conn:
        for _ in range(3):  # not a lucky pick: every time
            assert one(conn, sql)[0] == primary


@pytest.mark.parametrize(
    "pin",
    [
        pytest.param("DECLARE c CURSOR WITH HOLD FOR SELECT inet_server_port()", id="cursor-with-hold"),
        pytest.param("SET ROLE {user}", id="set-role"),
    ],
)
def test_a_read_that_pins_the_session_goes_to_the_primary_and_its_writes_work(rproxy, cluster, pin):
    # Placed on a replica as the read it is, it pinned the session there for good: every later
    # write of that client failed, 25006 "cannot execute INSERT in a read-only transaction".
    primary, _, _ = ports(cluster)
    with rproxy.connect() as conn:
        conn.execute(pin.format(user=cluster.app_user))
        assert one(conn, "SELECT inet_server_port()")[0] == primary
        assert one(conn, "INSERT INTO rt (v, port) VALUES (20, inet_server_port()) RETURNING port")[0] == primary


def test_functions_that_only_read_go_to_replicas(rproxy, cluster):
    primary, r1, r2 = ports(cluster)
    with rproxy.connect() as conn:
        seen = set()
        for _ in range(4):
            seen.add(one(conn, "SELECT stable_fn()")[0])  # STABLE in pg_proc
            seen.add(one(conn, "SELECT listed_fn()")[0])  # VOLATILE, but in read_only_functions
            seen.add(one(conn, "SELECT random() * 0 + inet_server_port()")[0])  # a volatile built-in that only reads
        assert seen <= {r1, r2}, seen
        assert one(conn, "SELECT write_fn()")[0] == primary


def test_a_function_made_through_pgtwist_is_known_at_the_next_probe(rproxy, cluster):
    # The monitor reads pg_proc every 30 s; a DDL that committed through pgtwist asks for it at
    # the next probe (0.2 s here). Until then the new function counts as volatile: the primary.
    _, r1, r2 = ports(cluster)
    with rproxy.connect() as conn:
        conn.execute("CREATE FUNCTION made_through_pgtwist() RETURNS int LANGUAGE sql STABLE AS $$ SELECT inet_server_port() $$")
    cluster.wait_replicas_caught_up(30)
    with rproxy.connect() as conn:  # (a fresh client: no read-your-writes wait)
        wait_for(lambda: one(conn, "SELECT made_through_pgtwist()")[0] in (r1, r2), 10, "the new STABLE function on a replica")


def test_multi_statement_string_with_a_write_reaches_the_primary(rproxy, cluster):
    primary, _, _ = ports(cluster)
    with RawClient(rproxy.host, rproxy.port) as client:
        client.login(rproxy.user, DATABASE, rproxy.password)
        for _ in range(3):
            rows = raw_rows(
                client,
                "SELECT inet_server_port(); INSERT INTO rt (v, port) VALUES (13, inet_server_port()) RETURNING port;"
                " SELECT inet_server_port()",
            )
            assert [int(r[0]) for r in rows] == [primary] * 3


def test_a_write_pipelined_behind_a_read_reaches_the_primary(rproxy, cluster):
    """A read and a write sent together: the read may go to a replica, the write must not follow it."""
    primary, r1, r2 = ports(cluster)
    with RawClient(rproxy.host, rproxy.port) as client:
        client.login(rproxy.user, DATABASE, rproxy.password)
        for i in range(5):
            client.send(
                m.query("SELECT inet_server_port()")
                + m.query(f"INSERT INTO rt (v, port) VALUES ({100 + i}, inet_server_port()) RETURNING port")
                + m.query("SELECT inet_server_port()")
            )
            ports_seen = []
            ready = 0
            while ready < 3:
                t, body = client.read_message()
                assert t != p.ERROR_RESPONSE, m.decode_fields(body)
                if t == p.DATA_ROW:
                    ports_seen.append(int(data_row_values(body)[0]))
                elif t == p.READY_FOR_QUERY:
                    ready += 1
            assert ports_seen[0] in (primary, r1, r2) and ports_seen[1] == primary, ports_seen


def test_begin_read_only_goes_to_a_replica(rproxy, cluster):
    primary, r1, r2 = ports(cluster)
    seen = set()
    with rproxy.connect() as conn:
        for _ in range(4):
            conn.execute("BEGIN READ ONLY")
            seen.add(one(conn, "SELECT inet_server_port()")[0])
            assert one(conn, "SHOW transaction_read_only")[0] == "on"
            conn.execute("COMMIT")
    with rproxy.connect(autocommit=False) as conn:
        conn.read_only = True  # psycopg opens its transactions with BEGIN READ ONLY
        for _ in range(2):
            seen.add(one(conn, "SELECT inet_server_port()")[0])
            conn.commit()
    assert seen <= {r1, r2}, seen


def test_user_with_route_replica_goes_to_replicas(rproxy, cluster):
    primary, r1, r2 = ports(cluster)
    seen = set()
    with rproxy.connect(user=READER, password=READER_PASSWORD) as conn:

        def both_replicas() -> bool:
            for _ in range(8):
                seen.add(one(conn, "SELECT inet_server_port()")[0])
            assert seen <= {r1, r2}, seen  # (never the primary)
            return seen == {r1, r2}

        # (Both, in time: a replica whose last probe predates the DDL an earlier test made through
        # this pgtwist gets no reads until its next probe shows it has replayed it.)
        wait_for(both_replicas, 10, f"reads on both replicas (seen {seen})")
        # Even what the built-in policy would send to the primary: the rule says replica.
        with conn.transaction():
            assert one(conn, "SELECT inet_server_port()")[0] in (r1, r2)
        # A read of a table the reader may read.
        assert one(conn, "SELECT count(*) >= 0 FROM rt")[0] is True


def test_statement_hints(rproxy, cluster):
    primary, r1, r2 = ports(cluster)
    with rproxy.connect() as conn:
        for _ in range(4):
            assert one(conn, "/* pgtwist:primary */ SELECT inet_server_port()")[0] == primary
            assert one(conn, "/*pgtwist: replica*/ SELECT inet_server_port()")[0] in (r1, r2)
        # The hint sends a whole transaction.
        conn.execute("/* pgtwist:replica */ BEGIN")
        assert one(conn, "SELECT inet_server_port()")[0] in (r1, r2)
        conn.execute("COMMIT")


# --------------------------------------------------------------------------- routing hook

HOOK_SOURCE = '''
"""A routing hook for the integration tests: marker functions in the query pick the answer."""

import json

REPLICA_NODE = {replica!r}
ASYNC_NODE = {async_node!r}
LOG = {log!r}


async def _later(node):
    return node


def choose(classification, identity):
    with open(LOG, "a") as f:
        f.write(json.dumps({{"identity": identity, "functions": list(classification.functions),
                             "read_only": classification.read_only}}) + "\\n")
    functions = set(classification.functions)
    if "upper" in functions:
        return REPLICA_NODE        # a node by name
    if "lower" in functions:
        return "primary"           # a role
    if "md5" in functions:
        return _later(ASYNC_NODE)  # a coroutine
    if "initcap" in functions:
        raise RuntimeError("the test hook fails on purpose")
    return None                    # the built-in policy
'''


def test_routing_hook_routes_and_a_failing_hook_falls_back(cluster, tmp_path, monkeypatch):
    primary, r1, r2 = ports(cluster)
    module = f"pgtwist_test_hook_{int(time.time() * 1000) % 100000}"
    hook_dir = tmp_path / "hooks"
    hook_dir.mkdir()
    log_path = tmp_path / "hook-calls.jsonl"
    (hook_dir / f"{module}.py").write_text(
        textwrap.dedent(HOOK_SOURCE.format(replica=cluster.nodes[2].addr, async_node=cluster.nodes[1].addr, log=str(log_path)))
    )
    # start_proxy keeps our PYTHONPATH after the repository's.
    monkeypatch.setenv("PYTHONPATH", str(hook_dir))
    with start_proxy(
        cluster,
        tmp_path / "proxy",
        databases=cluster_databases(cluster),
        users=cluster_users(cluster),
        routing_hook=f"{module}:choose",
        check_log=False,  # the failing hook is logged with its traceback, on purpose
        **ROUTING,
    ) as px:
        wait_until_routing(px, cluster)
        with px.connect() as conn:
            for _ in range(4):
                assert one(conn, "SELECT inet_server_port(), upper('x')")[0] == r2
                assert one(conn, "SELECT inet_server_port(), lower('x')")[0] == primary
                assert one(conn, "SELECT inet_server_port(), md5('x')")[0] == r1
            # None: the built-in policy (reads to replicas, writes to the primary).
            seen = {one(conn, "SELECT inet_server_port()")[0] for _ in range(6)}
            assert seen == {r1, r2}
            assert one(conn, "SELECT nextval('rseq') * 0 + inet_server_port()")[0] == primary
        # (A fresh client: this one's reads now wait for the replicas to replay its write.)
        with px.connect() as conn:
            # A hook that raises: the built-in policy decides, the client sees nothing of it.
            seen = {one(conn, "SELECT inet_server_port(), initcap('x')")[0] for _ in range(6)}
            assert seen == {r1, r2}
            assert one(conn, "INSERT INTO rt (v, port) VALUES (20, inet_server_port()) RETURNING port, initcap('x')")[0] == primary
        log = px.log_text()
        assert "routing hook failed" in log and "the test hook fails on purpose" in log
        assert px.alive()
    calls = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert calls, "the hook was never called"
    identity = calls[-1]["identity"]
    assert identity["user"] == cluster.app_user and identity["database"] == DATABASE


# --------------------------------------------------------------------------- read your writes


def set_apply_delay(cluster, value: str | None) -> None:
    for replica in cluster.nodes[1:]:
        sql = (
            f"ALTER SYSTEM SET recovery_min_apply_delay = '{value}'"
            if value is not None
            else "ALTER SYSTEM RESET recovery_min_apply_delay"
        )
        cluster.psql(replica, sql + ";\nSELECT pg_reload_conf();")


@pytest.mark.parametrize("synchronous_commit", ["off", "on"])
def test_read_your_writes_with_delayed_replicas(rproxy, cluster, synchronous_commit):
    """With synchronous_commit on, the write's flush position is what replicas must reach; off
    (the test cluster's default), the insert position."""
    primary, r1, r2 = ports(cluster)
    direct = [psycopg.connect(cluster.dsn(n, connect_timeout=10), autocommit=True) for n in cluster.nodes[1:]]
    set_apply_delay(cluster, "2s")
    try:
        for conn in direct:
            wait_for(lambda conn=conn: one(conn, "SHOW recovery_min_apply_delay")[0] == "2s", 10, "the apply delay in effect")
        start = one(direct[0], "SELECT count(*) FROM ryw")[0]
        with rproxy.connect(options=f"-c synchronous_commit={synchronous_commit}") as writer, rproxy.connect() as other:
            writer_ports, other_ports = [], []
            for i in range(20):
                writer.execute("INSERT INTO ryw (v) VALUES (%s)", (i,))
                count, port = one(writer, "SELECT count(*), inet_server_port() FROM ryw")
                assert count == start + i + 1, f"iteration {i}: the writer did not see its own write (served by {port})"
                writer_ports.append(port)
                other_ports.append(one(other, "SELECT inet_server_port()")[0])
            # The replicas really were behind: 2 s of writes are not replayed yet.
            behind = [one(conn, "SELECT count(*) FROM ryw")[0] for conn in direct]
            assert all(n < start + 20 for n in behind), behind
            # Once the replicas have replayed the writes, the writer's reads go back to them.
            set_apply_delay(cluster, None)
            wait_for(lambda: one(writer, "SELECT inet_server_port()")[0] in (r1, r2), 20, "the writer reading from a replica again")
        assert set(other_ports) <= {r1, r2} and len(set(other_ports)) == 2, other_ports
        # The writer's reads went where its writes were (nothing replayed them anywhere else yet).
        assert set(writer_ports) == {primary}, writer_ports
    finally:
        set_apply_delay(cluster, None)
        for conn in direct:
            conn.close()
    cluster.wait_replicas_caught_up(30)
