"""Message encoders and decoders of the sans-IO codec.

Encoders are checked byte for byte against the layouts in the PostgreSQL protocol docs and
round-tripped through the decoders; every decoder is fuzzed: for any bytes it returns or
raises a WireError subclass, never IndexError, struct.error, UnicodeDecodeError, ValueError...
(decode_fields never raises at all: it reads what servers send).
"""

import inspect
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import MessageTooLarge, ProtocolViolation, UnsupportedProtocol, WireError
from pgtwist.wire.framing import frame, pop_messages, pop_startup_packet

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

no_nul_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"))
names = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1)
uint32 = st.integers(0, 2**32 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
cancel_keys = st.binary(min_size=4, max_size=m.MAX_CANCEL_KEY)


def one(encoded: bytes) -> tuple[int, bytes]:
    """The single typed message in *encoded* (checking its framing on the way)."""
    buf = bytearray(encoded)
    msgs = pop_messages(buf, p.MAX_PROTOCOL_MESSAGE)
    assert len(msgs) == 1 and buf == b""
    return msgs[0]


def startup_body(packet: bytes) -> bytes:
    buf = bytearray(packet)
    body = pop_startup_packet(buf, 1 << 30)
    assert body is not None and buf == b""
    return body


def packet(code: int, payload: bytes = b"") -> bytes:
    """A startup-phase packet body (code included)."""
    return struct.pack("!I", code) + payload


# -- cstring and Reader ----------------------------------------------------------------------


@FAST
@given(no_nul_text)
def test_cstring_encodes_utf8_with_terminator(s):
    assert m.cstring(s) == s.encode("utf-8") + b"\x00"


@FAST
@given(no_nul_text, no_nul_text)
def test_cstring_refuses_nul_inside(a, b):
    with pytest.raises(ValueError):
        m.cstring(a + "\x00" + b)


@FAST
@given(st.lists(no_nul_text, max_size=5), st.binary(max_size=20))
def test_reader_cstrings_roundtrip(strings, tail):
    r = m.Reader(b"".join(m.cstring(s) for s in strings) + tail, "test")
    assert [r.cstring() for _ in strings] == strings
    assert r.rest() == tail
    assert r.at_end()
    r.end()


@pytest.mark.parametrize(
    "data, call",
    [
        (b"", "int32"),
        (b"\x00\x00\x00", "int32"),
        (b"\x00\x00\x00", "uint32"),
        (b"\x00", "int16"),
        (b"", "byte"),
        (b"abc", "cstring"),
        (b"\xff\xfe\x00", "cstring"),
    ],
)
def test_reader_overruns_are_protocol_violations(data, call):
    with pytest.raises(ProtocolViolation, match="invalid test message"):
        getattr(m.Reader(data, "test"), call)()


def test_reader_bytes_and_end():
    r = m.Reader(b"\xff\xff\xff\xfe\x00\x07abc", "test")
    assert r.int32() == -2
    assert r.int16() == 7
    with pytest.raises(ProtocolViolation):
        r.bytes(4)
    with pytest.raises(ProtocolViolation):
        r.bytes(-1)
    with pytest.raises(ProtocolViolation, match="trailing"):
        r.end()
    assert r.bytes(3) == b"abc"
    r.end()
    assert m.Reader(b"\xff\xff\xff\xff", "test").uint32() == 2**32 - 1


# -- startup packets ---------------------------------------------------------------------------


def test_startup_message_layout():
    pkt = m.startup_message({"user": "alice", "database": "db"})
    body = b"\x00\x03\x00\x00user\x00alice\x00database\x00db\x00\x00"
    assert pkt == struct.pack("!I", len(body) + 4) + body


@FAST
@given(
    st.dictionaries(names.filter(lambda s: not s.startswith("_pq_.")), no_nul_text, max_size=6),
    names,
    st.lists(no_nul_text.map(lambda s: "_pq_." + s), unique=True, max_size=3),
    st.sampled_from([p.PROTOCOL_3_0, (3 << 16) | 2]) | st.integers(0, 0xFFFF).map(lambda minor: (3 << 16) | minor),
    st.randoms(use_true_random=False),
)
def test_startup_message_roundtrip(params, user, options, version, rnd):
    params = dict(params, user=user)
    items = list(params.items()) + [(o, "value") for o in options]
    rnd.shuffle(items)
    msg = m.decode_startup_packet(startup_body(m.startup_message(dict(items), version)))
    assert isinstance(msg, m.StartupMessage)
    assert (msg.major, msg.minor) == (3, version & 0xFFFF)
    assert msg.parameters == params
    assert list(msg.parameters) == [k for k, _ in items if not k.startswith("_pq_.")]
    assert msg.unrecognized_options == tuple(k for k, _ in items if k.startswith("_pq_."))
    assert msg.user == user
    assert msg.database == (params.get("database") or user)


def test_startup_only_pq_dot_prefix_is_a_protocol_option():
    body = startup_body(m.startup_message({"user": "u", "_pq_x": "1", "_pq": "2", "_pq_.": "3", "_PQ_.y": "4"}))
    msg = m.decode_startup_packet(body)
    assert msg.parameters == {"user": "u", "_pq_x": "1", "_pq": "2", "_PQ_.y": "4"}
    assert msg.unrecognized_options == ("_pq_.",)


def test_startup_protocol_3_2_records_minor():
    body = startup_body(m.startup_message({"user": "u", "_pq_.foo": "1"}, 196610))
    msg = m.decode_startup_packet(body)
    assert (msg.major, msg.minor) == (3, 2)
    assert msg.unrecognized_options == ("_pq_.foo",)
    assert msg.parameters == {"user": "u"}


@pytest.mark.parametrize("major", [0, 1, 2, 4, 5, 1233, 1235, 0xFFFF])
@pytest.mark.parametrize("minor", [0, 2])
def test_startup_unsupported_major(major, minor):
    body = startup_body(m.startup_message({"user": "u"}, (major << 16) | minor))
    with pytest.raises(UnsupportedProtocol) as info:
        m.decode_startup_packet(body)
    assert info.value.sqlstate == sqlstate.FEATURE_NOT_SUPPORTED == "0A000"
    assert f"{major}.{minor}" in str(info.value)
    assert not isinstance(info.value, ProtocolViolation)


def test_startup_unknown_1234_code_is_unsupported():
    with pytest.raises(UnsupportedProtocol):
        m.decode_startup_packet(packet((1234 << 16) | 5681, b"\x00"))


@pytest.mark.parametrize("params", [{}, {"database": "db"}, {"user": ""}, {"_pq_.user": "x"}])
def test_startup_without_user(params):
    with pytest.raises(ProtocolViolation) as info:
        m.decode_startup_packet(startup_body(m.startup_message(params)))
    assert info.value.sqlstate == sqlstate.INVALID_AUTHORIZATION_SPECIFICATION == "28000"


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # no terminator at all
        b"user\x00",  # name without value
        b"user\x00u\x00",  # no final terminator
        b"user\x00u\x00\x00junk",  # trailing bytes after the terminator
        b"user\x00u",  # unterminated value
        b"us\xffer\x00u\x00\x00",  # invalid UTF-8
    ],
)
def test_startup_malformed(payload):
    with pytest.raises(ProtocolViolation) as info:
        m.decode_startup_packet(packet(p.PROTOCOL_3_0, payload))
    assert info.value.sqlstate == "08P01"


def test_startup_message_refuses_unencodable_parameters():
    with pytest.raises(ValueError):
        m.startup_message({"user": "a\x00b"})
    with pytest.raises(ValueError):
        m.startup_message({"us\x00er": "a"})
    # An empty name is the list terminator: encoding it would yield a packet that decodes differently.
    with pytest.raises(ValueError):
        m.startup_message({"": "x", "user": "u"})


def test_ssl_and_gssenc_requests():
    assert m.ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert m.gssenc_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert m.decode_startup_packet(startup_body(m.ssl_request())) == m.SSLRequest()
    assert m.decode_startup_packet(startup_body(m.gssenc_request())) == m.GSSENCRequest()
    for code in (p.SSL_REQUEST_CODE, p.GSSENC_REQUEST_CODE):
        with pytest.raises(ProtocolViolation):
            m.decode_startup_packet(packet(code, b"\x00"))


@FAST
@given(uint32, cancel_keys)
@example(0, b"\x00" * 4)
@example(2**32 - 1, b"\xff" * 256)
def test_cancel_request_roundtrip(pid, key):
    pkt = m.cancel_request(pid, key)
    assert pkt == struct.pack("!III", 12 + len(key), p.CANCEL_REQUEST_CODE, pid) + key
    req = m.decode_startup_packet(startup_body(pkt))
    assert req == m.CancelRequest(pid, key)
    assert key.hex() not in repr(req).replace(str(pid), "")  # the secret stays out of logs (a pid may spell it)


@pytest.mark.parametrize("key_length", [0, 1, 3, 257, 1000])
def test_cancel_request_bad_key_length(key_length):
    with pytest.raises(ProtocolViolation):
        m.decode_startup_packet(startup_body(m.cancel_request(42, b"k" * key_length)))


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x00"])
def test_cancel_request_truncated(payload):
    with pytest.raises(ProtocolViolation):
        m.decode_startup_packet(packet(p.CANCEL_REQUEST_CODE, payload))


# -- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoded, code, data",
    [
        (m.authentication_ok(), p.AUTH_OK, b""),
        (m.authentication_cleartext_password(), p.AUTH_CLEARTEXT_PASSWORD, b""),
        (m.authentication_md5_password(b"salt"), p.AUTH_MD5_PASSWORD, b"salt"),
        (m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]), p.AUTH_SASL, b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"),
        (m.authentication_sasl_continue(b"r=abc,s=xyz,i=4096"), p.AUTH_SASL_CONTINUE, b"r=abc,s=xyz,i=4096"),
        (m.authentication_sasl_final(b"v=sig"), p.AUTH_SASL_FINAL, b"v=sig"),
    ],
)
def test_authentication_messages(encoded, code, data):
    assert encoded == b"R" + struct.pack("!II", 8 + len(data), code) + data
    msg_type, body = one(encoded)
    assert msg_type == p.AUTHENTICATION
    assert m.decode_authentication(body) == (code, data)


@FAST
@given(int32, st.binary(max_size=100))
def test_authentication_roundtrip(code, data):
    body = struct.pack("!i", code) + data
    assert one(frame(p.AUTHENTICATION, body)) == (p.AUTHENTICATION, body)
    assert m.decode_authentication(body) == (code, data)
    if code >= 0:
        assert one(m.authentication(code, data)) == (p.AUTHENTICATION, body)


@FAST
@given(st.lists(names, max_size=5))
def test_sasl_mechanisms_roundtrip(mechs):
    code, data = m.decode_authentication(one(m.authentication_sasl(mechs))[1])
    assert code == p.AUTH_SASL
    assert m.decode_sasl_mechanisms(data) == mechs


@pytest.mark.parametrize("data", [b"", b"SCRAM-SHA-256", b"SCRAM-SHA-256\x00", b"\xff\x00\x00"])
def test_sasl_mechanisms_malformed(data):
    with pytest.raises(ProtocolViolation):
        m.decode_sasl_mechanisms(data)


def test_authentication_sasl_refuses_empty_mechanism():
    with pytest.raises(ValueError):
        m.authentication_sasl(["SCRAM-SHA-256", ""])


@pytest.mark.parametrize("body", [b"", b"\x00", b"\x00\x00\x00"])
def test_authentication_truncated(body):
    with pytest.raises(ProtocolViolation):
        m.decode_authentication(body)


@FAST
@given(names, st.binary(max_size=300))
def test_sasl_initial_response_roundtrip(mech, data):
    encoded = m.sasl_initial_response(mech, data)
    msg_type, body = one(encoded)
    assert msg_type == p.PASSWORD
    assert body == mech.encode() + b"\x00" + struct.pack("!i", len(data)) + data
    assert m.decode_sasl_initial_response(body) == (mech, data)


def test_sasl_initial_response_without_data():
    assert m.decode_sasl_initial_response(b"SCRAM-SHA-256\x00\xff\xff\xff\xff") == ("SCRAM-SHA-256", b"")
    assert m.decode_sasl_initial_response(b"SCRAM-SHA-256\x00\x00\x00\x00\x00") == ("SCRAM-SHA-256", b"")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"SCRAM-SHA-256",  # unterminated
        b"SCRAM-SHA-256\x00",  # no length
        b"SCRAM-SHA-256\x00\x00\x00",  # short length
        b"SCRAM-SHA-256\x00\xff\xff\xff\xfe",  # -2
        b"SCRAM-SHA-256\x00\x80\x00\x00\x00",  # INT32_MIN
        b"SCRAM-SHA-256\x00\x00\x00\x00\x05abcd",  # data shorter than announced
        b"SCRAM-SHA-256\x00\x00\x00\x00\x02abc",  # data longer than announced
        b"SCRAM-SHA-256\x00\xff\xff\xff\xffx",  # -1 but data follows
        b"\xc3\x28\x00\x00\x00\x00\x00",  # invalid UTF-8 mechanism
    ],
)
def test_sasl_initial_response_malformed(body):
    with pytest.raises(ProtocolViolation):
        m.decode_sasl_initial_response(body)


@FAST
@given(st.binary(max_size=100).filter(lambda b: b"\x00" not in b))
def test_password_message_roundtrip(secret):
    msg_type, body = one(m.password_message(secret + b"\x00"))
    assert msg_type == p.PASSWORD
    assert m.decode_password(body) == secret


@pytest.mark.parametrize("body", [b"", b"secret", b"sec\x00ret\x00", b"\x00\x00"])
def test_password_malformed(body):
    with pytest.raises(ProtocolViolation):
        m.decode_password(body)


# -- session start ----------------------------------------------------------------------------


@FAST
@given(names, no_nul_text)
def test_parameter_status_roundtrip(name, value):
    msg_type, body = one(m.parameter_status(name, value))
    assert msg_type == p.PARAMETER_STATUS
    assert body == name.encode() + b"\x00" + value.encode() + b"\x00"
    assert m.decode_parameter_status(body) == (name, value)


@pytest.mark.parametrize("body", [b"", b"name", b"name\x00", b"name\x00value", b"na\xffme\x00v\x00"])
def test_parameter_status_malformed(body):
    with pytest.raises(ProtocolViolation):
        m.decode_parameter_status(body)


@FAST
@given(uint32, cancel_keys)
@example(0, b"\x00" * 4)
@example(2**32 - 1, b"\xff" * 256)
def test_backend_key_data_roundtrip(pid, key):
    msg_type, body = one(m.backend_key_data(pid, key))
    assert msg_type == p.BACKEND_KEY_DATA
    assert body == struct.pack("!I", pid) + key
    assert m.decode_backend_key_data(body) == (pid, key)


@pytest.mark.parametrize("key_length", [0, 3, 257])
def test_backend_key_data_bad_key(key_length):
    with pytest.raises(ProtocolViolation):
        m.decode_backend_key_data(struct.pack("!I", 7) + b"k" * key_length)
    with pytest.raises(ProtocolViolation):
        m.decode_backend_key_data(b"\x00\x00")


@FAST
@given(st.integers(0, 2**31 - 1), st.lists(names, max_size=5))
def test_negotiate_protocol_version_roundtrip(minor, options):
    msg_type, body = one(m.negotiate_protocol_version(minor, tuple(options)))
    assert msg_type == p.NEGOTIATE_PROTOCOL_VERSION
    assert body[:8] == struct.pack("!II", minor, len(options))
    assert m.decode_negotiate_protocol_version(body) == (minor, options)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00\x00\x00\x02",
        struct.pack("!Ii", 2, -1),
        struct.pack("!II", 2, 2**31 - 1),
        struct.pack("!II", 2, 2) + b"_pq_.a\x00",
        struct.pack("!II", 2, 1) + b"_pq_.a",
    ],
)
def test_negotiate_protocol_version_malformed(body):
    with pytest.raises(ProtocolViolation):
        m.decode_negotiate_protocol_version(body)


def test_ready_for_query_and_simple_messages():
    assert m.ready_for_query() == b"Z\x00\x00\x00\x05I"
    assert m.ready_for_query(p.TX_IN_TRANSACTION) == b"Z\x00\x00\x00\x05T"
    assert m.ready_for_query(p.TX_FAILED) == b"Z\x00\x00\x00\x05E"
    assert m.terminate() == b"X\x00\x00\x00\x04"
    assert m.sync() == b"S\x00\x00\x00\x04"
    assert m.flush() == b"H\x00\x00\x00\x04"
    assert m.copy_done() == b"c\x00\x00\x00\x04"
    assert m.copy_data(b"1\t2\n") == b"d\x00\x00\x00\x081\t2\n"
    assert m.copy_fail("boom") == b"f\x00\x00\x00\x09boom\x00"
    assert m.command_complete("SELECT 1") == b"C\x00\x00\x00\x0dSELECT 1\x00"


def test_extended_query_messages():
    assert m.parse("s1", "select $1", [23]) == frame(ord("P"), b"s1\x00select $1\x00\x00\x01\x00\x00\x00\x17")
    assert m.parse("", "select 1") == frame(ord("P"), b"\x00select 1\x00\x00\x00")
    assert m.bind("p", "s", [b"42", None], [0, 1], [1]) == frame(
        ord("B"),
        b"p\x00s\x00" + b"\x00\x02\x00\x00\x00\x01" + b"\x00\x02\x00\x00\x00\x0242\xff\xff\xff\xff" + b"\x00\x01\x00\x01",
    )
    assert m.bind("", "") == frame(ord("B"), b"\x00\x00\x00\x00\x00\x00\x00\x00")
    assert m.describe("S", "s1") == frame(ord("D"), b"Ss1\x00")
    assert m.execute() == frame(ord("E"), b"\x00\x00\x00\x00\x00")
    assert m.execute("p", 10) == frame(ord("E"), b"p\x00\x00\x00\x00\x0a")
    assert m.close("P", "p") == frame(ord("C"), b"Pp\x00")


# -- errors and notices ---------------------------------------------------------------------


def test_error_response_layout():
    encoded = m.error_response("FATAL", "28P01", 'password authentication failed for user "u"')
    body = b"SFATAL\x00VFATAL\x00C28P01\x00Mpassword authentication failed for user \"u\"\x00\x00"
    assert encoded == frame(ord("E"), body)


@FAST
@given(names, st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5), no_nul_text, no_nul_text | st.none(), no_nul_text | st.none())
def test_error_response_roundtrip(severity, code, message, detail, hint):
    msg_type, body = one(m.error_response(severity, code, message, detail, hint))
    assert msg_type == p.ERROR_RESPONSE
    fields = m.decode_fields(body)
    assert fields == m.error_fields(severity, code, message, detail, hint)
    assert fields["C"] == code and fields["M"] == message and fields["S"] == fields["V"] == severity
    assert fields.get("D") == (detail or None) and fields.get("H") == (hint or None)


@FAST
@given(no_nul_text, no_nul_text, no_nul_text | st.none())
def test_notice_response_roundtrip(code, message, detail):
    msg_type, body = one(m.notice_response(code, message, detail=detail))
    assert msg_type == p.NOTICE_RESPONSE
    assert m.decode_fields(body) == m.error_fields("NOTICE", code, message, detail)


@pytest.mark.parametrize(
    "body, fields",
    [
        (b"", {}),
        (b"\x00", {}),
        (b"\x00SERROR\x00", {}),  # nothing after the terminator is read
        (b"SERROR\x00Mno sqlstate\x00\x00", {"S": "ERROR", "M": "no sqlstate"}),
        (b"SERROR\x00Mno terminator", {"S": "ERROR", "M": "no terminator"}),
        (b"SERROR\x00M", {"S": "ERROR", "M": ""}),
        (b"M\xff\xfebad utf-8\x00\x00", {"M": "\ufffd\ufffdbad utf-8"}),
        (b"\xffweird field type\x00\x00", {"\xff": "weird field type"}),
        (b"C12345\x00C54321\x00\x00", {"C": "54321"}),
    ],
)
def test_decode_fields_tolerates_broken_servers(body, fields):
    assert m.decode_fields(body) == fields


@FAST
@given(st.binary(max_size=300))
@example(b"C")
@example(b"\xff")
@example(b"S\xc3")
def test_decode_fields_never_raises(body):
    fields = m.decode_fields(body)
    assert isinstance(fields, dict)
    assert all(isinstance(k, str) and len(k) == 1 and isinstance(v, str) for k, v in fields.items())


# -- queries -------------------------------------------------------------------------------------


@FAST
@given(no_nul_text)
def test_query_roundtrip(sql):
    msg_type, body = one(m.query(sql))
    assert msg_type == p.QUERY
    assert body == sql.encode() + b"\x00"
    assert m.decode_query(body) == sql


def test_query_decode_edge_cases():
    assert m.decode_query(b"\x00") == ""
    assert m.decode_query(b"select '\xff'\x00") == "select '\ufffd'"
    for body in (b"", b"select 1"):
        with pytest.raises(ProtocolViolation):
            m.decode_query(body)
    with pytest.raises(ValueError):
        m.query("select 1\x00; drop table t")


# -- every decoder, fed anything ----------------------------------------------------------------

DECODERS = sorted(name for name, fn in inspect.getmembers(m, inspect.isfunction) if name.startswith("decode_"))


def test_decoder_list_is_complete():
    assert set(DECODERS) >= {
        "decode_authentication",
        "decode_backend_key_data",
        "decode_fields",
        "decode_negotiate_protocol_version",
        "decode_parameter_status",
        "decode_password",
        "decode_query",
        "decode_sasl_initial_response",
        "decode_sasl_mechanisms",
        "decode_startup_packet",
    }


# Prefixes that get a fuzzed body past the first checks of each decoder.
_PREFIXES = [
    b"",
    struct.pack("!I", p.PROTOCOL_3_0),
    struct.pack("!I", (3 << 16) | 2),
    struct.pack("!I", p.CANCEL_REQUEST_CODE),
    struct.pack("!I", p.SSL_REQUEST_CODE),
    struct.pack("!I", p.GSSENC_REQUEST_CODE),
    struct.pack("!I", p.PROTOCOL_3_0) + b"user\x00",
    b"SCRAM-SHA-256\x00",
    b"SCRAM-SHA-256\x00\xff\xff\xff\xff",
    struct.pack("!II", 0, 1),
    struct.pack("!Ii", 0, -1),
    b"\xff\xff\xff\xff",
    b"\x80\x00\x00\x00",
]

fuzz_bodies = st.binary(max_size=300) | st.builds(bytes.__add__, st.sampled_from(_PREFIXES), st.binary(max_size=64))


def _fuzz_decoder(name):
    """One hypothesis test per decoder, all alike (a stand-in for ``parametrize``, which
    pytest-twisted breaks when combined with ``@given``: it rewraps the shared function's
    ``hypothesis.inner_test`` for every parameter, nesting the wrappers)."""

    @FAST
    @given(body=fuzz_bodies)
    @example(body=b"")
    @example(body=b"\x00")
    @example(body=b"\xff" * 9)
    @example(body=b"\xc3\x28\x00")
    def test(body):
        decode = getattr(m, name)
        try:
            decode(body)
        except WireError as exc:
            assert isinstance(exc.sqlstate, str) and len(exc.sqlstate) == 5
            assert name != "decode_fields", "decode_fields must never raise"

    test.__name__ = test.__qualname__ = f"test_{name}_only_raises_wire_errors"
    return test


for _name in DECODERS:
    globals()[f"test_{_name}_only_raises_wire_errors"] = _fuzz_decoder(_name)
del _name


# -- errors ------------------------------------------------------------------------------------


def test_error_classes_and_sqlstates():
    assert ProtocolViolation("x").sqlstate == sqlstate.PROTOCOL_VIOLATION == "08P01"
    assert MessageTooLarge("x").sqlstate == "08P01"
    assert UnsupportedProtocol("x").sqlstate == "0A000"
    assert ProtocolViolation("x", "28000").sqlstate == "28000"
    assert ProtocolViolation("x").sqlstate == "08P01"  # an override does not leak to the class
    assert str(ProtocolViolation("bad thing")) == "bad thing"
    for cls in (ProtocolViolation, MessageTooLarge, UnsupportedProtocol):
        assert issubclass(cls, WireError)


def test_bind_statement_span_finds_the_statement_name_without_decoding_the_rest():
    body = m.bind("portal", "stmt", [b"1", None], [0], [1])[5:]
    start, end = m.bind_statement_span(body)
    assert body[start:end] == b"stmt" and body[:start] == b"portal\x00" and body[end:end + 1] == b"\x00"
    unnamed = m.bind("", "")[5:]
    assert m.bind_statement_span(unnamed) == (1, 1)
    for cut in range(len(b"portal\x00stmt")):
        assert m.bind_statement_span(body[:cut]) == (-1, -1)  # a name without its NUL


@given(st.lists(st.none() | st.binary(max_size=40), max_size=8))
def test_data_row_round_trips_and_every_truncation_is_a_protocol_violation(values):
    body = m.data_row(values)[5:]
    assert m.decode_data_row(body) == values
    assert m.decode_data_row(bytearray(body)) == values and all(type(v) is bytes for v in m.decode_data_row(bytearray(body)) if v is not None)
    for cut in range(len(body)):
        if values or cut < 2:
            with pytest.raises(ProtocolViolation):
                m.decode_data_row(body[:cut])


def test_data_row_with_a_negative_length_other_than_null_is_a_protocol_violation():
    with pytest.raises(ProtocolViolation):
        m.decode_data_row(struct.pack("!Hi", 1, -2))
