"""Malformed and hostile bytes from clients: each gets a clear refusal (or a silent close), and the proxy lives on."""

import struct

import pytest

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.framing import frame

from .proxy import RawClient, error_fields_of, start_proxy

pytestmark = pytest.mark.integration

CLOSE_TIMEOUT = 5


def assert_serves(proxy) -> None:
    """Another client, right after: logs in and queries normally."""
    with proxy.connect() as conn:
        assert conn.execute("SELECT 'alive'").fetchone() == ("alive",)


def refused(proxy, data: bytes) -> dict | None:
    """Send *data* raw; the proxy must close the connection. Returns the ErrorResponse fields it sent, if any."""
    with RawClient(proxy.host, proxy.port) as c:
        try:
            c.send(data)
        except (BrokenPipeError, ConnectionResetError):
            return None
        reply = c.wait_closed(CLOSE_TIMEOUT)
    if reply:
        fields = error_fields_of(reply)
        assert fields is not None, f"expected an ErrorResponse, got {reply[:200]!r}"
        assert fields["S"] == "FATAL"
        return fields
    return None


def test_startup_length_3(proxy):
    fields = refused(proxy, struct.pack("!I", 3))
    # PostgreSQL closes silently here; an explicit 08P01 is as good.
    assert fields is None or fields["C"] == "08P01"
    assert_serves(proxy)


def test_startup_packet_over_10000_bytes(proxy):
    big = m.startup_message({"user": proxy.user, "database": "appdb", "application_name": "x" * 12000})
    assert len(big) > 10000
    fields = refused(proxy, big)
    assert fields is None or fields["C"] == "08P01"
    # Only the announced length, without the body: refused at once, not waited for.
    fields = refused(proxy, struct.pack("!II", 10001, p.PROTOCOL_3_0))
    assert fields is not None and fields["C"] == "08P01", fields
    assert_serves(proxy)


def test_http_request_instead_of_startup(proxy):
    refused(proxy, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert_serves(proxy)


def test_protocol_2_is_refused_with_0A000(proxy):
    fields = refused(proxy, m.startup_message({"user": proxy.user, "database": "appdb"}, version=2 << 16))
    assert fields is not None
    assert fields["C"] == "0A000"
    assert "2.0" in fields["M"]
    assert_serves(proxy)


def test_protocol_3_2_with_unknown_option_is_negotiated(proxy):
    with RawClient(proxy.host, proxy.port) as c:
        c.startup(proxy.user, "appdb", version=(3 << 16) | 2, **{"_pq_.foo": "bar"})
        msg_type, body = c.read_message()
        assert msg_type == p.NEGOTIATE_PROTOCOL_VERSION
        minor, options = m.decode_negotiate_protocol_version(body)
        assert minor == p.PROTOCOL_LATEST_MINOR
        assert options == ["_pq_.foo"]
        # ...and authentication goes on as usual.
        msg_type, body = c.read_message()
        assert msg_type == p.AUTHENTICATION
        assert m.decode_authentication(body)[0] == p.AUTH_SASL
        c.buffer[:0] = frame(msg_type, body)  # put it back for the SCRAM exchange
        c.authenticate(proxy.user, proxy.password)
        assert c.scalar("SELECT 40 + 2") == "42"
    assert_serves(proxy)


def test_garbage_after_login_is_08P01(proxy):
    with RawClient(proxy.host, proxy.port) as c:
        c.login(proxy.user, "appdb", proxy.password)
        assert c.scalar("SELECT 1") == "1"
        c.send(b"Q" + struct.pack("!I", 2))  # a length below 4 cannot be
        reply = c.wait_closed(CLOSE_TIMEOUT)
    fields = error_fields_of(reply)
    assert fields is not None, reply
    assert fields["S"] == "FATAL" and fields["C"] == "08P01"
    assert_serves(proxy)


def test_unknown_message_type_after_login_reaches_the_node(proxy):
    # Not the proxy's to judge: PostgreSQL answers an unknown type with FATAL 08P01 itself.
    with RawClient(proxy.host, proxy.port) as c:
        c.login(proxy.user, "appdb", proxy.password)
        c.send(b"!" + struct.pack("!I", 4))
        reply = c.wait_closed(CLOSE_TIMEOUT)
    fields = error_fields_of(reply)
    assert fields is not None and fields["C"] == "08P01", reply
    assert_serves(proxy)


def test_too_many_encryption_requests(proxy):
    with RawClient(proxy.host, proxy.port) as c:
        c.send(m.ssl_request())
        assert c.read_byte() == ord("N")
        c.send(m.gssenc_request())
        assert c.read_byte() == ord("N")
        c.send(m.ssl_request())
        reply = c.wait_closed(CLOSE_TIMEOUT)
    fields = error_fields_of(reply)
    assert reply == b"" or (fields is not None and fields["C"] == "08P01"), reply
    assert_serves(proxy)


def test_client_vanishing_mid_packet(proxy):
    for data in (b"\x00\x00", m.startup_message({"user": proxy.user, "database": "appdb"})[:12]):
        with RawClient(proxy.host, proxy.port) as c:
            c.send(data)
    # Mid-authentication, and mid-message after login.
    with RawClient(proxy.host, proxy.port) as c:
        c.startup(proxy.user, "appdb")
        assert c.read_message()[0] == p.AUTHENTICATION
        c.send(b"p\x00\x00\x01\x00partial")
    with RawClient(proxy.host, proxy.port) as c:
        c.login(proxy.user, "appdb", proxy.password)
        c.send(b"Q\x00\x00\x10\x00SELECT")
    assert_serves(proxy)


def test_message_over_max_message_size(pg_cluster, tmp_path):
    with start_proxy(pg_cluster, tmp_path, max_message_size=1024 * 1024) as px:
        with RawClient(px.host, px.port) as c:
            c.login(px.user, "appdb", px.password)
            # 512 kB passes...
            assert c.scalar("SELECT length('" + "y" * 512 * 1024 + "')") == str(512 * 1024)
            # ...a header announcing 2 MB is refused before the body comes.
            c.send(b"Q" + struct.pack("!I", 2 * 1024 * 1024))
            reply = c.wait_closed(CLOSE_TIMEOUT)
        fields = error_fields_of(reply)
        assert fields is not None and fields["C"] == "08P01", reply
        assert_serves(px)


def test_query_instead_of_password(proxy):
    with RawClient(proxy.host, proxy.port) as c:
        c.startup(proxy.user, "appdb")
        assert c.read_message()[0] == p.AUTHENTICATION
        c.send(m.query("SELECT 1"))
        reply = c.wait_closed(CLOSE_TIMEOUT)
    fields = error_fields_of(reply)
    assert fields is not None and fields["C"] == "08P01", reply
    assert_serves(proxy)


def test_unknown_sasl_mechanism(proxy):
    with RawClient(proxy.host, proxy.port) as c:
        c.startup(proxy.user, "appdb")
        assert c.read_message()[0] == p.AUTHENTICATION
        c.send(m.sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=abcdef"))
        reply = c.wait_closed(CLOSE_TIMEOUT)
    fields = error_fields_of(reply)
    assert fields is not None and fields["S"] == "FATAL" and fields["C"] == "08P01", reply
    assert "mechanism" in fields["M"]
    assert_serves(proxy)


def test_garbage_scram_messages(proxy):
    # Empty, not UTF-8, empty nonce, channel binding without TLS, oversized.
    for first in (b"", b"\xff\xfe", b"n,,n=,r=", b"p=tls-server-end-point,,n=,r=abc", b"y,,n=,r=" + b"A" * 60000):
        with RawClient(proxy.host, proxy.port) as c:
            c.startup(proxy.user, "appdb")
            assert c.read_message()[0] == p.AUTHENTICATION
            c.send(m.sasl_initial_response("SCRAM-SHA-256", first))
            reply = c.wait_closed(CLOSE_TIMEOUT)
        fields = error_fields_of(reply)
        assert fields is not None and fields["S"] == "FATAL" and fields["C"] == "08P01", (first[:20], reply)
    assert_serves(proxy)
