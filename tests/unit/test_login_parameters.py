"""What a transaction-mode login is told without a server: remembered per (database, user, node), never shared.

The real Proxy, ClientSession, Pool and ServerConnection on StringTransports (test_session's
Proxy4Test); the node's side of each login is played by hand, with what PostgreSQL reports
for that user (session_authorization, is_superuser) and that node (server_version, in_hot_standby).
"""

import pytest

from pgtwist.router import DatabaseRouter
from pgtwist.routing.policy import NodeState
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from .test_router import FakeMonitor
from .test_session import NODE_KEY, NODE_PID, Proxy4Test, finish_internal, make_config, messages

P, R1 = "p:5432", "r1:5432"
USERS = {"admin": {"password": "pw"}, "app": {"password": "pw"}}


def reported(user: str, version: str = "15.8", standby: str = "off") -> dict[str, str]:
    return {
        "server_version": version,
        "in_hot_standby": standby,
        "client_encoding": "UTF8",
        "application_name": "",
        "session_authorization": user,
        "is_superuser": "on" if user == "admin" else "off",
    }


def welcome(params: dict[str, str]) -> bytes:
    return (
        m.authentication_ok()
        + b"".join(m.parameter_status(k, v) for k, v in params.items())
        + m.backend_key_data(NODE_PID, NODE_KEY)
        + m.ready_for_query()
    )


class Nodes:
    """A transaction-mode proxy whose node logins are answered by hand: login(user) plays one."""

    def __init__(self, clustered=False):
        nodes = [P, R1] if clustered else ["db1:5432"]
        config = make_config(
            pool_mode="transaction",
            users=USERS,
            databases={"appdb": {"dbname": "postgres", "nodes": nodes, "pool_size": 4}},
        )
        self.proxy = Proxy4Test(config)
        self.proxy.auto_login = False
        self.monitor = None
        self.database = config.databases["appdb"]
        if clustered:
            states = [NodeState(P, role="primary", up=True, timeline=1, lsn=10)]
            states.append(NodeState(R1, role="replica", up=True, timeline=1, lsn=10, lag_bytes=0, lag_seconds=0.0))
            self.monitor = FakeMonitor(states, self.proxy.clock)
            self.proxy.routers["appdb"] = DatabaseRouter(self.database, config, self.monitor)

    def login(self, user: str, node_says: dict[str, str] | None = None, **startup: str) -> dict[str, str]:
        """Log *user* in; when a server connection is opened for it, the node reports *node_says*
        (default: what PostgreSQL tells that user). Returns the ParameterStatus the client got."""
        before = len(self.proxy.servers)
        session, ct = self._client(user, **startup)
        if len(self.proxy.servers) > before:
            (server,) = self.proxy.servers[before:]
            assert session.state == "waiting"
            server.got_data(welcome(node_says or reported(user)))
        if session.state == "preparing":  # the startup settings applied on the server connection
            finish_internal(session.server, params=list(startup.items()))
        assert session.logged_in, ct.value()
        got = messages(ct.value())
        assert got[-1] == (p.READY_FOR_QUERY, b"I")
        return dict(m.decode_parameter_status(b) for t, b in got if t == p.PARAMETER_STATUS)

    def _client(self, user, **startup):
        from twisted.internet.testing import StringTransport

        ct = StringTransport(lenient=True)
        session = self.proxy.new_client(ct)
        session.got_data(m.startup_message({"user": user, "database": "appdb", **startup}))
        return session, ct

    def servers_opened(self) -> int:
        return len(self.proxy.servers)


@pytest.mark.parametrize("first, second", [("admin", "app"), ("app", "admin")])
def test_a_user_is_never_told_what_another_users_login_reported(first, second):
    nodes = Nodes()
    got = nodes.login(first, application_name="x")
    assert (got["session_authorization"], got["is_superuser"]) == (first, "on" if first == "admin" else "off")
    opened = nodes.servers_opened()
    got = nodes.login(second, application_name="x")  # the same startup settings, another user
    assert nodes.servers_opened() == opened + 1, "answered from the other user's login"
    assert got["session_authorization"] == second
    assert got["is_superuser"] == ("on" if second == "admin" else "off")


def test_the_same_user_with_the_same_settings_needs_no_server_again():
    nodes = Nodes()
    first = nodes.login("app")
    opened = nodes.servers_opened()
    assert nodes.login("app") == first and nodes.servers_opened() == opened
    # Other startup settings: their own login, on a server connection (the idle one).
    nodes.login("app", application_name="other")
    assert nodes.proxy.pools[("appdb", "app", "db1:5432")].login_parameters.keys() == {(), (("application_name", "other"),)}


def test_a_new_connection_reporting_other_values_makes_remembered_logins_stale():
    """The node restarted on another release: the next connection's login says so, and no
    client is told the old server_version after that."""
    nodes = Nodes()
    nodes.login("app")
    pool = nodes.proxy.pools[("appdb", "app", "db1:5432")]
    assert pool.login_parameters
    for conn in list(pool.idle) + list(pool.busy):  # the restart killed them
        conn.connection_lost(None)
    # Someone needs a connection again: the node's new login reports a new server_version.
    nodes.login("app", application_name="y", node_says=reported("app", version="15.9"))
    assert () not in pool.login_parameters  # the 15.8 login is forgotten
    assert nodes.login("app", node_says=reported("app", version="15.9"))["server_version"] == "15.9"


def test_a_failover_means_a_real_login_on_the_new_primary():
    nodes = Nodes(clustered=True)
    assert nodes.login("app")["in_hot_standby"] == "off"
    # R1 is promoted (P is gone): logins go there, and what P's logins reported is not reused.
    nodes.monitor.states[P].up = False
    nodes.monitor.states[R1].role = "primary"
    nodes.proxy._node_changed(nodes.database, nodes.monitor.states[R1], "promoted")
    opened = nodes.servers_opened()
    got = nodes.login("app", node_says=reported("app", version="16.1"))
    assert nodes.servers_opened() == opened + 1 and str(nodes.proxy.servers[-1].node) == R1
    assert got["server_version"] == "16.1"


def test_a_role_change_of_the_node_forgets_its_remembered_logins():
    nodes = Nodes(clustered=True)
    nodes.login("app")
    pool = nodes.proxy.pools[("appdb", "app", P)]
    assert pool.login_parameters
    nodes.proxy._node_changed(nodes.database, nodes.monitor.states[P], "demoted")
    assert pool.login_parameters == {}
