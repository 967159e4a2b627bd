"""What a transaction-mode login is told without a server: remembered per (database, user, node), never shared.

The real Proxy, ClientSession, Pool and ServerConnection on StringTransports (tests.harness.session's
Proxy4Test); the node's side of each login is played by hand, with what PostgreSQL reports
for that user (session_authorization, is_superuser) and that node (server_version, in_hot_standby).
"""

import pytest

from pgtwist.pooling.statements import internal_batch
from pgtwist.routing.policy import NodeState
from pgtwist.routing.router import DatabaseRouter
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.routing import FakeMonitor
from tests.harness.session import NODE_KEY, NODE_PID, Proxy4Test, finish_internal, make_config, messages

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


def test_a_promoted_nodes_idle_connections_are_asked_again_before_a_login_is_told():
    """PostgreSQL reports in_hot_standby's change only at a ReadyForQuery: an idle connection
    to a replica that was promoted still holds "on". The first login on it asks the node (an
    empty batch) and is told "off", as a direct login would be."""
    nodes = Nodes(clustered=True)
    nodes.login("app")
    session = nodes.proxy.clients[max(nodes.proxy.clients, key=lambda c: int(c[1:]))]
    session.got_data(m.query("SELECT 1"))  # a read: a connection to the replica R1
    reader = nodes.proxy.servers[-1]
    assert str(reader.node) == R1
    reader.got_data(welcome(reported("app", standby="on")))
    reader.got_data(m.command_complete("SELECT 1") + m.ready_for_query())
    session.connection_lost(None)  # (its connection goes back to R1's pool)
    assert reader.state == "idle" and reader.parameters["in_hot_standby"] == "on"
    reader.transport.clear()
    nodes.monitor.states[P].up = False
    nodes.monitor.states[R1].role = "primary"
    nodes.proxy._node_changed(nodes.database, nodes.monitor.states[R1], "promoted")
    opened = nodes.servers_opened()
    newcomer, ct = nodes._client("app")
    assert nodes.servers_opened() == opened and newcomer.server is reader and newcomer.state == "preparing"
    assert reader.transport.value() == internal_batch([])  # Close, Close, Sync: nothing run
    reader.got_data(m.close_complete() * 2 + m.parameter_status("in_hot_standby", "off") + m.ready_for_query())
    got = dict(m.decode_parameter_status(b) for t, b in messages(ct.value()) if t == p.PARAMETER_STATUS)
    assert got["in_hot_standby"] == "off" and not reader.parameters_stale


def test_a_known_login_is_answered_in_one_write():
    """AuthenticationOk leaves with the ParameterStatus set, BackendKeyData and ReadyForQuery: one
    send per login (each send on loopback costs both ends' TCP work in the proxy's CPU)."""
    from tests.harness.session import RecordingTransport

    nodes = Nodes()
    nodes.login("app")
    ct = RecordingTransport()
    session = nodes.proxy.new_client(ct)
    session.got_data(m.startup_message({"user": "app", "database": "appdb"}))
    assert session.logged_in and nodes.servers_opened() == 1
    (write,) = ct.writes
    kinds = [t for t, _ in messages(write)]
    assert kinds[0] == p.AUTHENTICATION and kinds[-2:] == [p.BACKEND_KEY_DATA, p.READY_FOR_QUERY]
    assert m.decode_authentication(messages(write)[0][1])[0] == p.AUTH_OK


def test_an_unknown_database_still_gets_authentication_ok_before_its_error():
    from tests.harness.session import RecordingTransport

    nodes = Nodes()
    ct = RecordingTransport()
    session = nodes.proxy.new_client(ct)
    session.got_data(m.startup_message({"user": "app", "database": "nosuch"}))
    kinds = [t for t, _ in messages(b"".join(ct.writes))]
    assert kinds == [p.AUTHENTICATION, p.ERROR_RESPONSE]  # as PostgreSQL orders them
