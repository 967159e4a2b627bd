"""ServerConnection's state: one owner, moved by one function through one table; others call methods."""

import pytest
from twisted.internet import task
from twisted.internet.testing import StringTransport

from pgtwist.backend.connection import CLOSED, CONNECTING, IDLE, INTERNAL, LINKED, LOGIN, TRANSITIONS, IllegalTransition, ServerConnection
from pgtwist.backend.login import ServerLogin
from pgtwist.wire import messages as m

from tests.harness.compiled import pure_only


class FakePool:
    node = "node1:5432"
    max_prepared_statements = 10
    internal_timeout = 0.0

    def __init__(self):
        self.clock = task.Clock()


def logged_in() -> ServerConnection:
    conn = ServerConnection("s1", FakePool(), ServerLogin("app", "appdb", None, node_name="node1:5432"))
    assert conn.state is CONNECTING
    conn.connection_made(StringTransport(lenient=True))
    assert conn.state is LOGIN
    conn.got_data(m.authentication_ok() + m.backend_key_data(1, b"KEY!") + m.ready_for_query())
    assert conn.state is IDLE
    return conn


def test_every_state_can_close_and_closed_is_final():
    assert set(TRANSITIONS) == {CONNECTING, LOGIN, IDLE, INTERNAL, LINKED, CLOSED}
    assert all(CLOSED in allowed for allowed in TRANSITIONS.values())
    assert TRANSITIONS[CLOSED] == {CLOSED}


@pure_only
def test_link_and_unlink_move_through_the_table():
    conn = logged_in()
    conn.link(object(), StringTransport(lenient=True))
    assert conn.linked
    conn.unlink()
    assert conn.state is IDLE and not conn.linked


def test_an_illegal_move_raises():
    conn = logged_in()
    with pytest.raises(IllegalTransition, match="idle -> idle"):
        conn.unlink()
    conn.run_internal(["SELECT 1"])
    with pytest.raises(IllegalTransition, match="internal -> linked"):
        conn.link(object(), StringTransport(lenient=True))


def test_a_connection_not_logged_in_cannot_be_linked():
    conn = ServerConnection("s1", FakePool(), ServerLogin("app", "appdb", None))
    with pytest.raises(IllegalTransition):
        conn.link(object(), StringTransport(lenient=True))


def test_settings_change_through_methods():
    conn = logged_in()
    conn.settings_synced({"application_name": "a"})
    conn.setting_reported("timezone", "UTC")
    assert conn.settings == {"application_name": "a", "timezone": "UTC"}
    conn.forget_settings()
    assert conn.settings == {}
    conn.settings_synced({"x": "1"})
    conn.statements.add("pgtwist_1", 0)
    conn.was_reset(statements_dropped=True)
    assert conn.settings == {} and len(conn.statements) == 0


def test_taint_is_one_way():
    conn = logged_in()
    assert not conn.tainted
    conn.taint("DISCARD ALL")
    conn.taint("again")
    assert conn.tainted
