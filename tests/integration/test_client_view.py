"""What a client can tell apart from a direct connection: reported parameters, its unnamed statement, backend pids.

Real PostgreSQL (the shared LocalCluster), real drivers (psycopg 3), pgtwist under twistd.
"""

import psycopg
import pytest

from . import proxy as proxymod
from .txhelpers import TX_CONFIG

pytestmark = pytest.mark.integration


def _users(cluster) -> dict:
    return {
        cluster.app_user: {"password": cluster.app_password},
        cluster.superuser: {"password": cluster.superuser_password},
    }


@pytest.fixture(scope="module")
def tx_proxy(pg_cluster, tmp_path_factory):
    """Transaction pooling, the app user and the superuser."""
    with proxymod.start_proxy(pg_cluster, tmp_path_factory.mktemp("tx-view"), users=_users(pg_cluster), **TX_CONFIG) as px:
        yield px


def _reported(px, user: str, password: str, **dsn) -> tuple[str | None, str | None, str]:
    with psycopg.connect(px.dsn(user=user, password=password, **dsn), autocommit=True) as conn:
        info = conn.info
        ran_as = conn.execute("SELECT current_user").fetchone()[0]
        return info.parameter_status("session_authorization"), info.parameter_status("is_superuser"), ran_as


# -- 1. what a login reports is the user's own ------------------------------------------------------


@pytest.mark.parametrize("superuser_first", [True, False])
def test_each_user_is_told_its_own_session_authorization(tx_proxy, pg_cluster, superuser_first):
    """A superuser and a plain user log in with the same startup settings, in either order: each
    is told its own session_authorization and is_superuser (psql's prompt shows # only for the
    superuser), as on a direct connection; and a second login of each (answered without a
    server connection) says the same again."""
    app = (pg_cluster.app_user, pg_cluster.app_password, "off")
    sup = (pg_cluster.superuser, pg_cluster.superuser_password, "on")
    order = [sup, app] if superuser_first else [app, sup]
    name = f"view-{superuser_first}"  # startup settings no earlier test logged in with
    for _ in range(2):
        for user, password, is_superuser in order:
            assert _reported(tx_proxy, user, password, application_name=name) == (user, is_superuser, user)


def test_login_reports_what_a_direct_login_reports(tx_proxy, pg_cluster):
    """Everything PostgreSQL reports at login, for each user, twice (the second from memory)."""
    primary = pg_cluster.nodes[0]
    for user, password in ((pg_cluster.app_user, pg_cluster.app_password), (pg_cluster.superuser, pg_cluster.superuser_password)):
        direct_dsn = pg_cluster.dsn(primary, user=user, password=password, dbname=pg_cluster.app_database, connect_timeout=10)
        with psycopg.connect(direct_dsn) as direct:
            want = {k: direct.info.parameter_status(k) for k in _REPORTED}
        for _ in range(2):
            with psycopg.connect(tx_proxy.dsn(user=user, password=password), autocommit=True) as conn:
                got = {k: conn.info.parameter_status(k) for k in _REPORTED}
            assert got == want


_REPORTED = (
    "session_authorization",
    "is_superuser",
    "server_version",
    "in_hot_standby",
    "server_encoding",
    "client_encoding",
    "integer_datetimes",
    "standard_conforming_strings",
)
