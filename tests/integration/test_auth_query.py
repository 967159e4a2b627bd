"""auth_query / auth_user against real PostgreSQL: users with no entry in pgtwist log in with
the secret PostgreSQL stores (SCRAM and md5), unknown users look like wrong passwords, answers are
cached for auth_cache_ttl, and neither the client's nor auth_user's search_path can change what
the query reads (CVE-2025-12819).

The cluster's pg_hba says md5, so that roles stored as md5 hashes log in too (PostgreSQL still uses
SCRAM for roles stored as SCRAM verifiers).
"""

from __future__ import annotations

import time

import psycopg
import pytest

from pgtwist.auth import ScramVerifier
from pgtwist.tools.localcluster import LocalCluster

from tests.harness.proxy import DATABASE, start_proxy

pytestmark = pytest.mark.integration

AUTH = "pgtwist_auth"
SCRAMMER, SCRAM_PW = "scrammer", "scram pw 1"
MD5ER, MD5_PW = "md5er", "md5 pw"
MALLORY_PW = "mallory's own"


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster.create(replicas=0) as c:
        primary = c.nodes[0]
        hba = primary.datadir / "pg_hba.conf"
        hba.write_text(hba.read_text().replace("scram-sha-256", "md5"))
        mallory = ScramVerifier.from_password(MALLORY_PW).to_text()
        c.psql(
            primary,
            f"SELECT pg_reload_conf();\n"
            f"CREATE ROLE {AUTH} LOGIN SUPERUSER PASSWORD 'auth secret';\n"
            f"CREATE ROLE {SCRAMMER} LOGIN PASSWORD '{SCRAM_PW}';\n"
            f"SET password_encryption = 'md5';\n"
            f"CREATE ROLE {MD5ER} LOGIN PASSWORD '{MD5_PW}';\n"
            f"RESET password_encryption;\n"
            f"CREATE ROLE nopass LOGIN;\n"
            # A pg_shadow that would let anyone in as "mallory" (who does not exist), first in
            # auth_user's own search_path and in the one clients ask for: never to be read.
            f"CREATE SCHEMA evil;\n"
            f"CREATE VIEW evil.pg_shadow AS SELECT 'mallory'::name AS usename, '{mallory}'::text AS passwd;\n"
            f"GRANT USAGE ON SCHEMA evil TO PUBLIC;\n"
            f"GRANT SELECT ON evil.pg_shadow TO PUBLIC;\n"
            f"ALTER ROLE {AUTH} SET search_path = evil, pg_catalog;\n",
        )
        yield c


def start(cluster, tmp_path, **overrides):
    # Only auth_user has an entry: every other user is looked up.
    users = {AUTH: {"password": "auth secret"}}
    return start_proxy(cluster, tmp_path, users=users, auth_user=AUTH, **overrides)


def connect(px, user, password, **kw):
    return psycopg.connect(
        host=px.host, port=px.port, dbname=DATABASE, user=user, password=password, sslmode="disable", connect_timeout=10, autocommit=True, **kw
    )


def refused(px, user, password, **kw) -> str:
    with pytest.raises(psycopg.OperationalError) as e:
        connect(px, user, password, **kw).close()
    return str(e.value)


def test_scram_user_known_only_to_postgresql_logs_in_and_reaches_the_node(cluster, tmp_path):
    with start(cluster, tmp_path) as px:
        for _ in range(2):  # the second login uses the cached verifier and the same pool
            with connect(px, SCRAMMER, SCRAM_PW) as conn:
                # The node login used the ClientKey from the client's proof (pass-through).
                assert conn.execute("SELECT current_user").fetchone()[0] == SCRAMMER
        message = refused(px, SCRAMMER, "wrong")
        assert f'password authentication failed for user "{SCRAMMER}"' in message
        assert SCRAM_PW not in px.log_text()


def test_md5_user_from_pg_shadow(cluster, tmp_path):
    with start(cluster, tmp_path, auth_type="md5") as px:
        with connect(px, MD5ER, MD5_PW) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == MD5ER
        # md5 upgrades to SCRAM for a role stored as a verifier, as PostgreSQL does.
        with connect(px, SCRAMMER, SCRAM_PW) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == SCRAMMER
        assert "password authentication failed" in refused(px, MD5ER, "wrong")


def test_unknown_and_passwordless_users_look_like_wrong_passwords(cluster, tmp_path):
    with start(cluster, tmp_path) as px:
        for user in ("no_such_role", "nopass", "x'; SELECT pg_sleep(5); --"):
            message = refused(px, user, "anything")
            assert f'password authentication failed for user "{user}"' in message, message
        # Straight from PostgreSQL, for comparison: the same words.
        direct = cluster.nodes[0]
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(host=direct.host, port=direct.port, dbname="postgres", user="no_such_role", password="anything", sslmode="disable").close()
        assert 'password authentication failed for user "no_such_role"' in str(e.value)


def test_search_path_of_the_client_or_of_auth_user_cannot_fake_pg_shadow(cluster, tmp_path):
    with start(cluster, tmp_path) as px:
        # evil.pg_shadow says mallory's secret is MALLORY_PW: if auth_query read it, this would get in.
        assert "password authentication failed" in refused(px, "mallory", MALLORY_PW)
        assert "password authentication failed" in refused(px, "mallory", MALLORY_PW, options="-c search_path=evil,pg_catalog")
        with connect(px, SCRAMMER, SCRAM_PW, options="-c search_path=evil,pg_catalog") as conn:
            assert conn.execute("SHOW search_path").fetchone()[0] == "evil,pg_catalog"  # the client's own


def test_changed_password_applies_after_auth_cache_ttl(cluster, tmp_path):
    role = "changer"
    cluster.psql(cluster.nodes[0], f"CREATE ROLE {role} LOGIN PASSWORD 'first'")
    try:
        with start(cluster, tmp_path, auth_cache_ttl=2.0) as px:
            with connect(px, role, "first") as conn:
                conn.execute("SELECT 1")
            cluster.psql(cluster.nodes[0], f"ALTER ROLE {role} PASSWORD 'second'")
            # Within the TTL the cached verifier still answers; after it, only the new password does.
            deadline = time.monotonic() + 20
            while True:
                try:
                    with connect(px, role, "second") as conn:
                        conn.execute("SELECT 1")
                    break
                except psycopg.OperationalError:
                    assert time.monotonic() < deadline, "the new password never applied"
                    time.sleep(0.5)
            assert "password authentication failed" in refused(px, role, "first")
    finally:
        cluster.psql(cluster.nodes[0], f"DROP ROLE {role}")


def test_lookup_failure_is_08006_not_a_password_error(cluster, tmp_path):
    # A query that fails on the node: the client cannot be checked, and is told so.
    with start(cluster, tmp_path, auth_query="SELECT usename, passwd FROM no_such_table WHERE usename=$1") as px:
        with pytest.raises(psycopg.OperationalError) as e:
            connect(px, SCRAMMER, SCRAM_PW).close()
        assert "auth_query failed" in str(e.value)
        assert "auth_query failed" in px.log_text()


def test_a_users_table_without_password_gives_a_looked_up_user_its_pool_mode(cluster, tmp_path):
    users = {AUTH: {"password": "auth secret"}, SCRAMMER: {"pool_mode": "transaction"}}
    with start_proxy(cluster, tmp_path, users=users, auth_user=AUTH, pool_mode="session", auth_type="md5") as px:
        with connect(px, SCRAMMER, SCRAM_PW) as conn:
            node_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            assert conn.info.backend_pid != node_pid  # pgtwist's own: transaction pooling
        with connect(px, MD5ER, MD5_PW) as conn:
            assert conn.info.backend_pid == conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # the global session mode


def test_a_frozen_node_fails_the_lookup_within_its_timeout_and_nothing_is_cached(cluster, tmp_path):
    # auth_cache_ttl = 0: every login asks. The first one leaves auth_user's connection idle; the
    # node then freezes (SIGSTOP), so the next lookup is sent and never answered.
    with start(cluster, tmp_path, server_connect_timeout=2.0, query_timeout=0.0, auth_cache_ttl=0.0) as px:
        with connect(px, SCRAMMER, SCRAM_PW) as conn:
            conn.execute("SELECT 1")
        primary = cluster.nodes[0]
        cluster.freeze(primary)
        try:
            started = time.monotonic()
            message = refused(px, SCRAMMER, SCRAM_PW)
            waited = time.monotonic() - started
        finally:
            cluster.thaw(primary)
        assert "auth_query failed" in message, message
        assert 1.5 < waited < 8.0, waited  # server_connect_timeout (query_timeout is 0), not connect_timeout
        assert "did not answer pgtwist's own statements within 2 s" in px.log_text()
        with connect(px, SCRAMMER, SCRAM_PW) as conn:  # thawed: asked again, on a new connection
            assert conn.execute("SELECT current_user").fetchone()[0] == SCRAMMER


def test_auth_query_connections_count_against_max_db_connections(cluster, tmp_path):
    """auth_user's connection is one of the database's on the node, as PgBouncer counts it: at the
    limit, its idle connection is closed to make room for a client's, never added on top."""
    with start(cluster, tmp_path, auth_type="md5", pool_mode="session", max_db_connections=2, query_wait_timeout=10) as px:
        direct = cluster.nodes[0]
        with psycopg.connect(
            host=direct.host, port=direct.port, dbname="postgres", user=cluster.superuser, password=cluster.superuser_password, sslmode="disable", autocommit=True
        ) as admin:

            def on_the_node() -> int:
                return admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename IN (%s, %s, %s)", (AUTH, SCRAMMER, MD5ER)
                ).fetchone()[0]

            with connect(px, SCRAMMER, SCRAM_PW) as first:  # looked up: auth_user's connection, then its own
                with connect(px, MD5ER, MD5_PW) as second:  # looked up again (another user): the limit holds
                    assert first.execute("SELECT current_user").fetchone()[0] == SCRAMMER
                    assert second.execute("SELECT current_user").fetchone()[0] == MD5ER
                    deadline = time.monotonic() + 10
                    while on_the_node() > 2:  # (a closed backend leaves pg_stat_activity a moment later)
                        assert time.monotonic() < deadline, "auth_user's connection came on top of max_db_connections"
                        time.sleep(0.1)


def test_a_lookup_at_max_db_connections_takes_a_connection_an_idle_client_keeps(cluster, tmp_path):
    """Transaction pooling lends a client its connection between transactions; at the limit, an
    auth_query lookup (and the new client's own connection) take such a connection back instead of
    waiting for that client's next transaction (here: never) until query_wait_timeout."""
    with start(cluster, tmp_path, auth_type="md5", pool_mode="transaction", max_db_connections=2, query_wait_timeout=20) as px:
        first, second = connect(px, SCRAMMER, SCRAM_PW), connect(px, SCRAMMER, SCRAM_PW)
        try:
            # Overlapping transactions: each client gets a connection of its own (auth_user's idle
            # one made room for the second), and keeps it once done, sitting idle.
            first.execute("BEGIN")
            assert first.execute("SELECT current_user").fetchone()[0] == SCRAMMER
            assert second.execute("SELECT current_user").fetchone()[0] == SCRAMMER
            first.execute("COMMIT")
            # Looked up: auth_user needs a connection. (Waiting for an idle client would outlast
            # the client's connect_timeout, 10 s, before query_wait_timeout's 20.)
            with connect(px, MD5ER, MD5_PW) as third:
                assert third.execute("SELECT current_user").fetchone()[0] == MD5ER
            for conn in (first, second):  # and the idle clients still work
                assert conn.execute("SELECT 1").fetchone()[0] == 1
        finally:
            first.close()
            second.close()
