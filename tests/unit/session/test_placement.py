"""Placement: which node a transaction-pooled client's work runs on, seen from the client's side.

Kept light on purpose (session/ is being restructured for #12): only what a client can observe
through the Setup harness -- the node its statements reach. Surviving a node's loss is in
test_placement_failover.py, read-your-writes in test_placement_read_your_writes.py.
"""

import pytest

from pgtwist.wire import messages as m

from tests.harness.routing import R1, R2, P
from tests.harness.session import RESULT, Z_IDLE, Z_IN, Harness, Setup, queries, sent


def run(session, sql: str, status=Z_IDLE) -> str:
    """Send *sql* as a simple Query, answer it from whichever node got it; that node's name."""
    session.got_data(m.query(sql))
    server = session.server
    assert queries(sent(server)) == [sql]
    server.got_data(RESULT + status)
    return str(server.node)


@pytest.mark.parametrize(
    "sql, nodes",
    [
        ("SELECT 1", {R1, R2}),
        ("INSERT INTO t VALUES (1)", {P}),
        ("UPDATE t SET x = 1", {P}),
        ("SELECT nextval('s')", {P}),  # a volatile function: a write, as far as placement knows
    ],
    ids=["read", "insert", "update", "volatile"],
)
def test_a_statement_runs_where_its_kind_belongs(sql, nodes):
    s = Setup()
    session, _ = s.client()
    assert run(session, sql) in nodes


def test_a_transaction_stays_on_the_node_it_began_on():
    s = Setup()
    session, ct = s.client()
    node = run(session, "BEGIN", Z_IN)
    assert node == P  # a transaction that may write begins on the primary
    assert run(session, "SELECT 1", Z_IN) == node
    assert run(session, "COMMIT") == node
    assert ct.value().endswith(Z_IDLE)


def test_begin_read_only_may_run_on_a_replica():
    s = Setup()
    session, _ = s.client()
    node = run(session, "BEGIN READ ONLY", Z_IN)
    assert node in {R1, R2}
    assert run(session, "SELECT 1", Z_IN) == node
    assert run(session, "COMMIT") == node


def test_single_node_everything_runs_there():
    s = Setup(clustered=False)
    session, _ = s.client()
    assert {run(session, sql) for sql in ("SELECT 1", "INSERT INTO t VALUES (1)")} == {"db1:5432"}


def test_two_databases_on_one_node_share_the_primarys_decision():
    h = Harness(
        pool_mode="transaction",
        databases={
            "appdb": {"dbname": "postgres", "nodes": ["db1:5432"], "pool_size": 2},
            "otherdb": {"dbname": "other", "nodes": ["db1:5432"], "pool_size": 2},
        },
    )
    decisions = []
    for database in ("appdb", "otherdb", "appdb", "otherdb"):
        session, _ = h.client(database=database)
        decisions.append(session.placement._primary_decision())
    assert decisions[0] is decisions[2] and decisions[1] is decisions[3]
    assert decisions[0].node is h.proxy.config.databases["appdb"].nodes[0]
    assert decisions[1].node is h.proxy.config.databases["otherdb"].nodes[0]
