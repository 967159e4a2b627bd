"""Malformed and hostile bytes from clients: each gets a clear refusal (or a silent close), and the proxy lives on."""

import struct
import time

import pytest

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.framing import frame

from tests.harness.ops import ADMIN, ADMIN_PASSWORD, show_nodes
from tests.harness.proxy import RawClient, error_fields_of, start_proxy, wait_for

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


def closed_silently(proxy, data: bytes) -> None:
    """As PostgreSQL: bytes that are no startup packet get no answer, only a line in the log."""
    offset = proxy.log_size()
    assert refused(proxy, data) is None
    wait_for(lambda: "invalid length of startup packet" in proxy.log_text(offset), 5, "the refusal in the log")


NOT_A_STARTUP_PACKET = [
    pytest.param(lambda px: struct.pack("!I", 3), id="length-3"),
    pytest.param(
        lambda px: m.startup_message({"user": px.user, "database": "appdb", "application_name": "x" * 12000}),
        id="over-10000-bytes",
    ),
    # Only the announced length, without the body: refused at once, not waited for.
    pytest.param(lambda px: struct.pack("!II", 10001, p.PROTOCOL_3_0), id="announcing-10001-bytes"),
    pytest.param(lambda px: b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="http-request"),
]


@pytest.mark.parametrize("make", NOT_A_STARTUP_PACKET)
def test_not_a_startup_packet_is_closed_silently(proxy, make):
    closed_silently(proxy, make(proxy))
    assert_serves(proxy)


def test_terminate_as_first_message_closes_silently(proxy):
    # node-postgres sends Terminate at once when a connection it has just opened is ended.
    closed_silently(proxy, m.terminate())
    # ...and the same when the client goes away right after sending it.
    with RawClient(proxy.host, proxy.port) as c:
        c.send(m.terminate())
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


@pytest.mark.parametrize(
    "data, words",
    [
        (b"Q" + struct.pack("!I", 2), "invalid message length 2"),  # a length below 4 cannot be
        # PostgreSQL would answer FATAL and end its connection: the proxy says it instead, and
        # the server connection (which never saw the bytes) stays in the pool.
        (b"!" + struct.pack("!I", 4), "invalid frontend message type 33 ('!')"),
    ],
    ids=["length-below-4", "unknown-type"],
)
def test_garbage_after_login_is_refused_before_the_node_with_08P01(proxy, data, words):
    with RawClient(proxy.host, proxy.port) as c:
        c.login(proxy.user, "appdb", proxy.password)
        assert c.scalar("SELECT 1") == "1"
        c.send(data)
        reply = c.wait_closed(CLOSE_TIMEOUT)
    fields = error_fields_of(reply)
    assert fields is not None, reply
    assert fields["S"] == "FATAL" and fields["C"] == "08P01"
    assert words in fields["M"], fields["M"]
    assert_serves(proxy)


def test_session_mode_layout_errors_are_the_nodes_own(proxy):
    # Forwarded as bytes in session mode: PostgreSQL judges the layout itself, with an ERROR, as
    # on a direct connection, and the session goes on.
    with RawClient(proxy.host, proxy.port) as c:
        c.login(proxy.user, "appdb", proxy.password)
        c.send(frame(p.DESCRIBE, b"Xs1\x00") + m.sync())
        msg_type, body = c.read_message()
        fields = m.decode_fields(body)
        assert (msg_type, fields["S"], fields["C"]) == (p.ERROR_RESPONSE, "ERROR", "08P01"), fields
        assert "DESCRIBE" in fields["M"]
        assert c.read_message()[0] == p.READY_FOR_QUERY
        assert c.scalar("SELECT 42") == "42"


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


@pytest.mark.parametrize(
    "answer, words",
    [
        (m.query("SELECT 1"), ""),
        (m.sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=abcdef"), "mechanism"),
        # Empty, not UTF-8, empty nonce, channel binding without TLS, oversized.
        (m.sasl_initial_response("SCRAM-SHA-256", b""), ""),
        (m.sasl_initial_response("SCRAM-SHA-256", b"\xff\xfe"), ""),
        (m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r="), ""),
        (m.sasl_initial_response("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc"), ""),
        (m.sasl_initial_response("SCRAM-SHA-256", b"y,,n=,r=" + b"A" * 60000), ""),
    ],
    ids=["query-instead", "unknown-mechanism", "scram-empty", "scram-not-utf8", "scram-empty-nonce", "scram-binding-without-tls", "scram-oversized"],
)
def test_bad_answer_to_the_authentication_request_is_fatal_08P01(proxy, answer, words):
    with RawClient(proxy.host, proxy.port) as c:
        c.startup(proxy.user, "appdb")
        assert c.read_message()[0] == p.AUTHENTICATION
        c.send(answer)
        reply = c.wait_closed(CLOSE_TIMEOUT)
    fields = error_fields_of(reply)
    assert fields is not None and fields["S"] == "FATAL" and fields["C"] == "08P01", reply[:200]
    assert words in fields["M"], fields["M"]
    assert_serves(proxy)


# --------------------------------------------------------------------------- malformed, in every state

# (bytes, words the FATAL 08P01 must contain)
MALFORMED = [
    (frame(p.DESCRIBE, b"Xs1\x00"), "Describe message: unknown target type 88"),
    (frame(p.CLOSE, b"\x00\x00"), "Close message: unknown target type 0"),
    (frame(p.QUERY, b"SELECT 1"), "Query message: the query string has no terminating NUL"),
    (frame(p.BIND, b"\x00\x00\x00\x00\x00\x03\x00\x00\x00\x01x"), "Bind message: truncated at parameter 2 of 3"),
    (frame(p.BIND, b"\x00\x00\x00\x02\x00\x00\x00\x00\x00\x01\xff\xff\xff\xff\x00\x00"), "2 parameter formats but 1 parameters"),
    (b"Q" + struct.pack("!I", 3), "invalid message length 3"),
    (b"!" + struct.pack("!I", 4), "invalid frontend message type 33"),
    (b"D" + struct.pack("!I", 50_000), "invalid message length 50000 for a Describe message"),
    (b"Q" + struct.pack("!I", 64 * 1024 * 1024), "invalid message length"),
]
MALFORMED_IDS = [words.split(":")[0].replace(" ", "-")[:28] for _, words in MALFORMED]


@pytest.fixture(scope="module")
def tx_proxy(pg_cluster, tmp_path_factory):
    """Transaction pooling in front of the primary and its replica (routing on), pool_size 1, an admin console."""
    from tests.harness.ops import start_ops_proxy

    with start_ops_proxy(
        pg_cluster,
        tmp_path_factory.mktemp("bad-input-tx"),
        {"admin": {"users": [ADMIN]}},
        pool_mode="transaction",
        pool_size=1,
        query_wait_timeout=20,
        max_message_size=16 * 1024 * 1024,
        health_check_interval=0.5,
        databases={"appdb": {"dbname": pg_cluster.app_database, "nodes": [n.addr for n in pg_cluster.nodes]}},
        users={pg_cluster.app_user: {"password": pg_cluster.app_password}, ADMIN: {"password": ADMIN_PASSWORD}},
    ) as px:
        px.log_offset_at_start = px.log_size()
        yield px
        text = px.log_text()
        assert "marked down" not in text and "is down" not in text, "a client's bad bytes changed a node's health"
        assert "XX000" not in text


def assert_fatal_08p01(c: RawClient, words: str) -> None:
    reply = c.wait_closed(CLOSE_TIMEOUT)
    fields = None
    pos = 0
    while len(reply) - pos >= 5:  # the last ErrorResponse (answers to earlier messages may precede it)
        (length,) = struct.unpack_from("!I", reply, pos + 1)
        if reply[pos] == p.ERROR_RESPONSE:
            fields = m.decode_fields(reply[pos + 5 : pos + 1 + length])
        pos += 1 + length
    assert fields is not None, reply[:300]
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01"), fields
    assert words in fields["M"], fields["M"]


def logged_in(px, c: RawClient) -> None:
    c.login(px.user, "appdb", px.password)


@pytest.mark.parametrize("data,words", MALFORMED, ids=MALFORMED_IDS)
def test_tx_mode_right_after_login(tx_proxy, data, words):
    with RawClient(tx_proxy.host, tx_proxy.port) as c:
        logged_in(tx_proxy, c)
        c.send(data)
        assert_fatal_08p01(c, words)
    assert_serves(tx_proxy)


@pytest.mark.parametrize("data,words", MALFORMED, ids=MALFORMED_IDS)
def test_tx_mode_between_transactions(tx_proxy, data, words):
    with RawClient(tx_proxy.host, tx_proxy.port) as c:
        logged_in(tx_proxy, c)
        assert c.scalar("SELECT 1") == "1"
        c.query("BEGIN")
        c.query("CREATE TEMP TABLE IF NOT EXISTS nothing_here (x int) ON COMMIT DROP")
        c.query("COMMIT")
        c.send(data)
        assert_fatal_08p01(c, words)
    assert_serves(tx_proxy)


@pytest.mark.parametrize("data,words", MALFORMED, ids=MALFORMED_IDS)
def test_tx_mode_inside_a_transaction(tx_proxy, data, words):
    with RawClient(tx_proxy.host, tx_proxy.port) as c:
        logged_in(tx_proxy, c)
        c.query("BEGIN")
        assert c.scalar("SELECT 2") == "2"
        c.send(data)
        assert_fatal_08p01(c, words)
    assert_serves(tx_proxy)


@pytest.mark.parametrize("data,words", MALFORMED, ids=MALFORMED_IDS)
def test_tx_mode_waiting_for_a_server(tx_proxy, data, words):
    with RawClient(tx_proxy.host, tx_proxy.port) as holder, RawClient(tx_proxy.host, tx_proxy.port) as c:
        logged_in(tx_proxy, holder)
        holder.query("BEGIN")
        holder.query("SELECT txid_current()")  # the primary's only server connection, held
        logged_in(tx_proxy, c)
        c.send(m.query("BEGIN"))  # waits for the primary (and is not read from meanwhile)
        c.send(data)
        time.sleep(0.2)
        holder.query("COMMIT")
        assert_fatal_08p01(c, words)
    assert_serves(tx_proxy)


@pytest.mark.parametrize("data,words", MALFORMED, ids=MALFORMED_IDS)
def test_admin_console(tx_proxy, data, words):
    with RawClient(tx_proxy.host, tx_proxy.port) as c:
        c.login(ADMIN, "pgbalance", ADMIN_PASSWORD)
        assert c.query("SHOW NODES")
        c.send(data)
        if data[:1] == b"D" and len(data) == 5:
            c.send(b"S" + b"\x00" * (50_000 - 5))  # the console reads whole messages
        assert_fatal_08p01(c, words)


def test_xx000_reproduction_no_server_connection(tx_proxy):
    # The reproduction: Describe 'X', Close 0, a Query without NUL from a client holding no
    # server connection gave FATAL XX000 and a critical traceback in the log.
    for data in (frame(p.DESCRIBE, b"Xs1\x00") + m.sync(), frame(p.CLOSE, b"\x00\x00") + m.sync(), frame(p.QUERY, b"SELECT 1")):
        with RawClient(tx_proxy.host, tx_proxy.port) as c:
            logged_in(tx_proxy, c)
            c.send(data)
            assert_fatal_08p01(c, "invalid")
    assert "internal error" not in tx_proxy.log_text(tx_proxy.log_offset_at_start)
    assert_serves(tx_proxy)


def test_nodes_stay_up_after_all_that(tx_proxy, pg_cluster):
    nodes = show_nodes(tx_proxy)
    assert set(nodes) == {str(n.addr) for n in pg_cluster.nodes}
    assert all(row["up"] in ("t", "true", "True") for row in nodes.values()), nodes


# --------------------------------------------------------------------------- max_client_conn, floods


def test_max_client_conn_refused_at_the_startup_packet(pg_cluster, tmp_path):
    with start_proxy(pg_cluster, tmp_path, max_client_conn=2) as px:
        with RawClient(px.host, px.port) as a, RawClient(px.host, px.port) as b:
            a.login(px.user, "appdb", px.password)
            b.login(px.user, "appdb", px.password)
            with RawClient(px.host, px.port) as c:
                c.startup(px.user, "appdb")
                # Not an authentication request first: the refusal itself, before any SCRAM work.
                msg_type, body = c.read_message()
                fields = m.decode_fields(body)
                assert msg_type == p.ERROR_RESPONSE, (msg_type, body)
                assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "53300", "sorry, too many clients already")
            # A driver sees the same.
            with pytest.raises(Exception) as e:
                px.connect()
            assert "too many clients" in str(e.value)
        # Room again once they left.
        wait_for(lambda: _can_connect(px), 10, "a login after the others left")


def _can_connect(px) -> bool:
    try:
        with px.connect() as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except Exception:
        return False


def test_two_thousand_silent_connections_stay_cheap(pg_cluster, tmp_path):
    import socket

    # tcp_defer_accept off: pgtwist itself holds the silent sockets (with it, the kernel does until
    # their first bytes come; test_sockets.py covers that).
    with start_proxy(pg_cluster, tmp_path, max_client_conn=50, client_login_timeout=4, tcp_defer_accept=False) as px:
        assert_serves(px)
        before = px.rss_kib()
        socks = []
        try:
            for _ in range(2000):
                socks.append(socket.create_connection((px.host, px.port), timeout=10))
            started = time.monotonic()
            # They do not count against max_client_conn, and others are served meanwhile.
            for _ in range(3):
                assert_serves(px)
            grown = px.rss_kib() - before
            assert grown < 2000 * 8, f"{grown} KiB for 2,000 silent connections"
            # Dropped at client_login_timeout, without a word.
            for s in socks:
                s.settimeout(max(0.1, 15 - (time.monotonic() - started)))
                assert s.recv(100) == b""
            assert time.monotonic() - started >= 3
        finally:
            for s in socks:
                s.close()
        assert_serves(px)
