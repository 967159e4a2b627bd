"""decode_startup_packet splits a well-formed packet's pairs at once: it must agree, byte for byte and
error for error, with reading the packet string by string (the Reader), whatever the bytes."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pgtwist.wire import messages as m
from pgtwist.wire.errors import WireError


def _by_strings(body: bytes):
    """The reference: every string read on its own, as the decoder did before the split."""
    r = m.Reader(body, "startup packet")
    code = r.uint32()
    params, unrecognized = {}, []
    while True:
        name = r.cstring()
        if not name:
            break
        value = r.cstring()
        if name.startswith("_pq_."):
            unrecognized.append(name)
            continue
        params[name] = value
    r.end()
    if not params.get("user"):
        raise m.ProtocolViolation("no PostgreSQL user name specified in startup packet")
    return m.StartupMessage(code >> 16, code & 0xFFFF, params, tuple(unrecognized))


def _outcome(decode, body: bytes):
    try:
        return ("decoded", decode(body))
    except WireError as e:
        return ("refused", type(e).__name__, str(e))


PIECES = st.sampled_from([b"user", b"app", b"database", b"", b"\x00", b"\x00\x00", b"\xff", b"\xc3\xa9", b"\xc3", b"_pq_.opt", b"a\x00b"])


@settings(max_examples=3000)
@given(st.lists(PIECES, max_size=12), st.sampled_from([0x30000, 0x30002]))
def test_the_split_agrees_with_reading_string_by_string(pieces, version):
    body = struct.pack("!I", version) + b"".join(pieces)
    assert _outcome(m.decode_startup_packet, body) == _outcome(_by_strings, body)


def test_a_typical_login_packet():
    body = struct.pack("!I", 0x30000) + b"user\x00app\x00database\x00shop\x00application_name\x00\x00_pq_.x\x00y\x00\x00"
    packet = m.decode_startup_packet(body)
    assert packet.parameters == {"user": "app", "database": "shop", "application_name": ""}
    assert packet.unrecognized_options == ("_pq_.x",)
