"""PgBouncer's limits and per-database / per-user settings against real PostgreSQL:
pool_mode per database and per user (user over database over global)."""

from __future__ import annotations

import psycopg
import pytest

from .proxy import DATABASE, start_proxy

pytestmark = pytest.mark.integration

OWN_PIDS_FROM = 2**22 + 1  # pgtwist's own BackendKeyData process ids (transaction pooling) start here


def connect(px, user, password, dbname=DATABASE):
    return psycopg.connect(
        host=px.host, port=px.port, dbname=dbname, user=user, password=password, sslmode="disable", connect_timeout=10, autocommit=True
    )


def mode_of(conn) -> str:
    """Session pooling gives the node's own process id; transaction pooling one of pgtwist's."""
    node_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    if conn.info.backend_pid == node_pid:
        return "session"
    assert conn.info.backend_pid >= OWN_PIDS_FROM
    return "transaction"


def test_pool_mode_user_over_database_over_global(pg_cluster, tmp_path):
    c = pg_cluster
    node = c.nodes[0].addr
    databases = {
        DATABASE: {"dbname": c.app_database, "nodes": [node], "pool_mode": "transaction"},
        "plain": {"dbname": c.app_database, "nodes": [node]},
    }
    users = {
        c.app_user: {"password": c.app_password, "pool_mode": "session"},
        c.superuser: {"password": c.superuser_password},
    }
    with start_proxy(c, tmp_path, pool_mode="session", databases=databases, users=users) as px:
        with connect(px, c.superuser, c.superuser_password) as conn:
            assert mode_of(conn) == "transaction"  # the database's
        with connect(px, c.app_user, c.app_password) as conn:
            assert mode_of(conn) == "session"  # the user's, over the database's
        with connect(px, c.superuser, c.superuser_password, "plain") as conn:
            assert mode_of(conn) == "session"  # the global one
        with connect(px, c.app_user, c.app_password, "plain") as conn:
            assert mode_of(conn) == "session"
