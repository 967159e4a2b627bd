"""ServerConnection.relink: a linked connection passed to another client in place, as unlink() then link() would leave it."""

import pytest
from twisted.internet.testing import StringTransport

from pgtwist.backend.connection import _LINKED_CAPTURE, IllegalTransition
from pgtwist.wire import protocol as p

from tests.harness.compiled import pure_only
from tests.unit.backend.test_connection import SessionStandIn, connecting, logged_in

# (Each links a stand-in session: tests.harness.compiled.)
pytestmark = pure_only


def linked(pause_node=False, pause_client=False, old_client_gone=False):
    """A connection linked to a first client; *pause_client*: that client stopped reading (the
    node's reads are paused), *pause_node*: the node's side is full (the client's reads are)."""
    conn, transport, _ = logged_in()
    first = StringTransport()
    conn.link(SessionStandIn(), first)
    if pause_client:
        first.producer.pauseProducing()
    if pause_node:
        transport.producer.pauseProducing()
    if old_client_gone:
        first.connected = False
    return conn, transport, first


def where(conn, transport, first, second):
    """Where each side's producer is, by name, and who is paused: what the two ways must agree on."""
    names = {id(conn._server_throttle): "server throttle", id(conn._client_throttle): "client throttle", id(None): None}
    clients = {id(first): "first", id(second): "second", id(None): None}
    return {
        "node's producer": names[id(transport.producer)],
        "first's producer": names[id(first.producer)],
        "second's producer": names[id(second.producer)],
        "client throttle throttles": clients[id(conn._client_throttle.transport)],
        "client transport": clients[id(conn.client_transport)],
        "paused": (transport.producerState, first.producerState, second.producerState),
        "throttles paused": (conn._server_throttle.paused, conn._client_throttle.paused),
        "state": conn.state,
    }


@pytest.mark.parametrize("pause_node", [False, True], ids=["", "node-full"])
@pytest.mark.parametrize("pause_client", [False, True], ids=["", "client-full"])
@pytest.mark.parametrize("old_client_gone", [False, True], ids=["", "old-client-gone"])
def test_the_producers_end_where_unlink_then_link_would_put_them(pause_node, pause_client, old_client_gone):
    conn, transport, first = linked(pause_node, pause_client, old_client_gone)
    second = StringTransport()
    conn.relink(SessionStandIn(), second)
    relinked = where(conn, transport, first, second)
    twin, twin_transport, twin_first = linked(pause_node, pause_client, old_client_gone)
    twin_second = StringTransport()
    twin.unlink()
    twin.link(SessionStandIn(), twin_second)
    assert relinked == where(twin, twin_transport, twin_first, twin_second)
    assert relinked["state"] == "linked"


def test_the_new_client_is_throttled_and_throttles_the_node():
    conn, transport, first = linked()
    server_throttle, client_throttle = first.producer, transport.producer
    session, second = SessionStandIn(), StringTransport()
    conn.relink(session, second)
    assert conn.state == "linked" and conn.session is session and conn.client_transport is second
    assert first.producer is None  # the old client throttles nothing any more
    assert second.producer is server_throttle  # the new one, when full, pauses the node's reads
    assert transport.producer is client_throttle and client_throttle.transport is second  # registered all along
    transport.producer.pauseProducing()  # the node's side is full: the new client's reads pause, not the old one's
    assert second.producerState == "paused" and first.producerState == "producing"
    transport.producer.resumeProducing()
    second.producer.pauseProducing()  # the new client stopped reading: the node's reads pause
    assert transport.producerState == "paused"


@pytest.mark.parametrize("side", ["client", "node", "both"])
def test_a_paused_side_is_resumed_for_the_next_client(side):
    conn, transport, first = linked(pause_node=side in ("node", "both"), pause_client=side in ("client", "both"))
    server_throttle, client_throttle = conn._server_throttle, conn._client_throttle
    assert server_throttle.paused == (side != "node") and client_throttle.paused == (side != "client")
    second = StringTransport()
    conn.relink(SessionStandIn(), second)
    assert not server_throttle.paused and not client_throttle.paused
    assert transport.producerState == "producing"  # the node is read again
    assert first.producerState == "producing"  # the old client is not left paused
    assert second.producerState == "producing"


def test_the_scanner_stays_and_takes_the_new_client_s_capture():
    conn, _, _ = linked()
    scanner = conn.scanner
    conn.replied = True
    capture = frozenset((p.READY_FOR_QUERY, p.PARAMETER_STATUS, p.ERROR_RESPONSE))
    conn.relink(SessionStandIn(), StringTransport(), capture)
    assert conn.scanner is scanner and scanner.capture == capture and not conn.replied
    conn.relink(SessionStandIn(), StringTransport())
    assert conn.scanner is scanner and scanner.capture == _LINKED_CAPTURE


def test_the_new_client_gets_what_the_node_says_next():
    conn, _, first = linked()
    second = StringTransport()
    conn.relink(SessionStandIn(), second)
    conn.got_data(b"D\x00\x00\x00\x06\x00\x00")  # a DataRow (not captured): forwarded as it came
    assert second.value() == b"D\x00\x00\x00\x06\x00\x00" and first.value() == b""


def not_logged_in():
    conn, _, _, _ = connecting()
    return conn


def idle():
    conn, _, _ = logged_in()
    return conn


def running_internal():
    conn, _, _ = logged_in()
    conn.run_internal(["SELECT 1"])
    return conn


def unlinked():
    conn, _, _ = linked()
    conn.unlink()
    return conn


def closed():
    conn, _, _ = linked()
    conn.abandon()
    return conn


@pytest.mark.parametrize("make", [not_logged_in, idle, running_internal, unlinked, closed], ids=lambda f: f.__name__)
def test_only_a_linked_connection_is_relinked(make):
    conn = make()
    state, session, client, producer = conn.state, conn.session, conn.client_transport, conn.transport.producer
    second = StringTransport()
    with pytest.raises(IllegalTransition, match="relinked"):
        conn.relink(SessionStandIn(), second)
    assert (conn.state, conn.session, conn.client_transport, conn.transport.producer) == (state, session, client, producer)
    assert second.producer is None
