"""Framing layer of the sans-IO codec: frame, pop_startup_packet, pop_messages and MessageScanner.

The scanner is checked against a model: for any stream of typed messages, any capture set
and any way of cutting the stream into reads, what it emits (bytes runs verbatim, captured
messages re-framed) must rebuild the stream exactly, in order, with every captured message
handed out whole and nothing else held back longer than necessary.
"""

import bisect
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgtwist.wire import protocol as p
from pgtwist.wire.errors import MessageTooLarge, ProtocolViolation, WireError
from pgtwist.wire.framing import MessageScanner, frame, pop_messages, pop_startup_packet

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- strategies and the model ------------------------------------------------------------------


@st.composite
def message_streams(draw, max_msgs=8, max_body=300):
    """(messages, capture set, max_length): a small type alphabet so captured types recur."""
    alphabet = draw(st.lists(st.integers(0, 255), min_size=1, max_size=4, unique=True))
    msg_type = st.sampled_from(alphabet) | st.integers(0, 255)
    msgs = draw(st.lists(st.tuples(msg_type, st.binary(max_size=max_body)), max_size=max_msgs))
    capture = draw(
        st.frozensets(st.sampled_from(alphabet))
        | st.frozensets(st.integers(0, 255), max_size=8)
        | st.just(frozenset(alphabet))
    )
    biggest = max((len(body) for _, body in msgs), default=0) + 4
    max_length = biggest + draw(st.sampled_from([0, 0, 1, 1000, p.MAX_PROTOCOL_MESSAGE]))
    return msgs, capture, max_length


class Model:
    """What the scanner must do with a given stream."""

    def __init__(self, msgs, capture):
        self.stream = b"".join(frame(t, b) for t, b in msgs)
        self.boundaries = {0}
        self.captured = []  # (start, end, type, body) of each captured message, in order
        offset = 0
        for t, body in msgs:
            end = offset + 5 + len(body)
            if t in capture:
                self.captured.append((offset, end, t, body))
            offset = end
            self.boundaries.add(offset)
        self.cap_starts = [c[0] for c in self.captured]

    def captured_at(self, pos):
        """The captured message that *pos* lies strictly inside of (its start excluded), or None."""
        i = bisect.bisect_left(self.cap_starts, pos) - 1
        if i >= 0 and self.captured[i][0] < pos < self.captured[i][1]:
            return self.captured[i]
        return None

    def touches_capture(self, lo, hi):
        """Whether any byte in stream[lo:hi] belongs to a captured message."""
        i = bisect.bisect_right(self.cap_starts, lo) - 1
        if i >= 0 and self.captured[i][1] > lo:
            return True
        j = bisect.bisect_left(self.cap_starts, lo)
        return j < len(self.cap_starts) and self.cap_starts[j] < hi

    def expected_emitted(self, fed):
        """How far the emitted output must reach once *fed* bytes went in: everything except a
        captured message still incomplete (held back whole, header included)."""
        inside = self.captured_at(fed)
        return inside[0] if inside else fed


def run_scanner(model, capture, max_length, chunks):
    """Feed *chunks* through a fresh scanner, checking every invariant after every read."""
    scanner = MessageScanner(capture, max_length)
    assert scanner.at_boundary
    stream = model.stream
    fed = 0  # bytes fed in
    emitted = 0  # stream offset the output has reached
    ci = 0  # next captured message expected
    for chunk in chunks:
        out = scanner.feed(chunk)
        assert isinstance(out, list)
        for item in out:
            if isinstance(item, tuple):
                assert ci < len(model.captured), "captured a message of a type not in the capture set"
                start, end, t, body = model.captured[ci]
                assert emitted == start, "captured message out of order"
                msg_type, got = item
                assert type(got) is bytes
                assert (msg_type, got) == (t, body)
                emitted = end
                ci += 1
            else:
                assert type(item) is bytes
                assert item or (out == [chunk] and out[0] is chunk), "empty bytes run"
                assert stream.startswith(item, emitted), "bytes run does not match the stream here"
                nxt = model.cap_starts[ci] if ci < len(model.cap_starts) else len(stream)
                assert emitted + len(item) <= nxt, "a captured message leaked into a bytes run"
                emitted += len(item)
        lo, fed = fed, fed + len(chunk)
        assert emitted == model.expected_emitted(fed), "output lags behind (or runs ahead of) the input"
        assert scanner.at_boundary == (fed in model.boundaries)
        if chunk and not model.touches_capture(lo, fed):
            # The hot path: nothing captured in this read means the read itself, uncopied.
            assert len(out) == 1 and out[0] is chunk
    assert fed == len(stream)
    assert ci == len(model.captured)
    assert emitted == len(stream)
    assert scanner.at_boundary


def rebuild(items):
    return b"".join(frame(*i) if isinstance(i, tuple) else i for i in items)


def split_at(data, points):
    points = sorted(points)
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


# -- frame -----------------------------------------------------------------------------------


def test_frame_layout():
    assert frame(ord("Q"), b"select 1\x00") == b"Q\x00\x00\x00\x0dselect 1\x00"
    assert frame(ord("S")) == b"S\x00\x00\x00\x04"
    assert frame(0, b"") == b"\x00\x00\x00\x00\x04"
    assert frame(255, b"x" * 300) == b"\xff" + struct.pack("!I", 304) + b"x" * 300


@FAST
@given(st.integers(0, 255), st.binary(max_size=300))
def test_frame_roundtrips_through_pop_messages(msg_type, body):
    buf = bytearray(frame(msg_type, body))
    assert pop_messages(buf, len(body) + 4) == [(msg_type, body)]
    assert buf == b""


# -- MessageScanner: the model, split every possible way --------------------------------------


@SLOW
@given(message_streams())
def test_scanner_single_split_at_every_byte(case):
    msgs, capture, max_length = case
    model = Model(msgs, capture)
    stream = model.stream
    for k in range(len(stream) + 1):
        run_scanner(model, capture, max_length, [stream[:k], stream[k:]])


@FAST
@given(message_streams())
def test_scanner_one_byte_at_a_time(case):
    msgs, capture, max_length = case
    model = Model(msgs, capture)
    stream = model.stream
    run_scanner(model, capture, max_length, [stream[i : i + 1] for i in range(len(stream))])


@FAST
@given(message_streams(), st.data())
def test_scanner_random_split_points(case, data):
    msgs, capture, max_length = case
    model = Model(msgs, capture)
    stream = model.stream
    # Split points drawn freely (repeats give empty reads) plus points near boundaries, where bugs live.
    near = sorted({min(max(b + d, 0), len(stream)) for b in model.boundaries for d in (-1, 0, 1, 2, 4, 5)})
    points = data.draw(st.lists(st.integers(0, len(stream)) | st.sampled_from(near), max_size=20))
    run_scanner(model, capture, max_length, split_at(stream, points))


@FAST
@given(message_streams())
def test_scanner_whole_stream_in_one_read(case):
    msgs, capture, max_length = case
    model = Model(msgs, capture)
    run_scanner(model, capture, max_length, [model.stream])
    out = MessageScanner(capture, max_length).feed(model.stream)
    assert rebuild(out) == model.stream
    assert [i for i in out if isinstance(i, tuple)] == [(t, b) for t, b in msgs if t in capture]


@given(message_streams())
def test_scanner_one_message_per_read(case):
    """A read holding exactly one message, from a boundary, takes feed()'s shortcut."""
    msgs, capture, max_length = case
    model = Model(msgs, capture)
    run_scanner(model, capture, max_length, [frame(t, b) for t, b in msgs])


def test_scanner_one_message_read_counts_watched_types_and_notes_the_type():
    scanner = MessageScanner({ord("Q")}, 100, watch={ord("S")})
    query, sync = frame(ord("Q"), b"SELECT 1\x00"), frame(ord("S"))
    assert scanner.feed(query) == [(ord("Q"), b"SELECT 1\x00")] and scanner.last_type == ord("Q")
    out = scanner.feed(sync)
    assert out == [sync] and out[0] is sync and scanner.watched == 1 and scanner.last_type == ord("S")


@pytest.mark.parametrize("length", [0, 3, 101])
def test_scanner_one_message_read_with_a_bad_length_still_raises(length):
    data = b"Q" + struct.pack("!I", length) + b"x" * max(0, length - 4)
    with pytest.raises(ProtocolViolation):
        MessageScanner({ord("Q")}, 100).feed(data)


_Z = p.READY_FOR_QUERY


@given(message_streams(), st.integers(0, 255), st.booleans())
def test_whole_reply_agrees_with_feed(case, status, ends_ready):
    msgs, capture, max_length = case
    capture = capture | {_Z}
    max_length = max(max_length, 5)  # (room for the ReadyForQuery)
    stream = b"".join(frame(t, b) for t, b in msgs) + (frame(_Z, bytes([status])) if ends_ready else b"")
    fast, slow = MessageScanner(capture, max_length), MessageScanner(capture, max_length)
    got = fast.whole_reply(stream)
    plain = all(t not in capture for t, _ in msgs)
    if ends_ready and plain:
        assert got == status
        assert fast.at_boundary and fast.last_type == _Z
        before = stream[: -6]
        assert slow.feed(stream) == ([before] if before else []) + [(_Z, bytes([status]))]
    else:
        assert got == -1
        assert fast.feed(stream) == slow.feed(stream)  # nothing was consumed


def test_whole_reply_declines_what_it_cannot_vouch_for():
    reply = frame(ord("C"), b"SELECT 1\x00") + frame(_Z, b"I")
    # Not from a boundary: the start of the read continues an earlier message.
    scanner = MessageScanner({_Z}, 100)
    scanner.feed(frame(ord("D"), b"x" * 10)[:7])
    assert scanner.whole_reply(b"x" * 8 + reply) == -1
    # A ReadyForQuery whose read goes on, or a longer one.
    assert MessageScanner({_Z}, 100).whole_reply(reply + b"D") == -1
    assert MessageScanner({_Z}, 100).whole_reply(frame(ord("C"), b"x\x00") + frame(_Z, b"II")) == -1
    # A counting scanner counts in feed() only.
    assert MessageScanner({_Z}, 100, watch={ord("C")}).whole_reply(reply) == -1
    # A bad length is feed()'s to report.
    bad = b"D" + struct.pack("!I", 2) + reply
    scanner = MessageScanner({_Z}, 100)
    assert scanner.whole_reply(bad) == -1
    with pytest.raises(ProtocolViolation):
        scanner.feed(bad)
    assert MessageScanner({_Z}, 100).whole_reply(reply) == ord("I")


def test_scanner_identity_on_hot_path():
    data = frame(ord("D"), b"row 1") + frame(ord("D"), b"row 2") + frame(ord("C"), b"SELECT 2\x00")
    scanner = MessageScanner({ord("E"), ord("Z")}, 1 << 20)
    out = scanner.feed(data)
    assert out == [data] and out[0] is data
    assert scanner.at_boundary


def test_scanner_identity_when_read_ends_inside_a_header():
    """A read ending inside a passed-through header is still returned whole and uncopied."""
    first = frame(ord("D"), b"row 1") + b"D\x00\x00"
    second = b"\x00\x09row 2" + frame(ord("Z"), b"I")
    scanner = MessageScanner({ord("Z")}, 1 << 20)
    out = scanner.feed(first)
    assert out == [first] and out[0] is first
    assert not scanner.at_boundary
    out = scanner.feed(second)
    assert out == [b"\x00\x09row 2", (ord("Z"), b"I")]
    assert scanner.at_boundary


def test_scanner_identity_inside_a_long_message():
    body = bytes(range(256)) * 40
    data = frame(ord("d"), body)
    scanner = MessageScanner({ord("Q")}, 1 << 20)
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    for i, chunk in enumerate(chunks):
        out = scanner.feed(chunk)
        assert len(out) == 1 and out[0] is chunk
        assert scanner.at_boundary == (i == len(chunks) - 1)


def test_scanner_captured_message_held_back_whole():
    data = frame(ord("D"), b"x") + frame(ord("E"), b"SERROR\x00\x00") + frame(ord("Z"), b"I")
    scanner = MessageScanner({ord("E")}, 1 << 20)
    out = []
    for i in range(len(data)):
        out += scanner.feed(data[i : i + 1])
    assert [i for i in out if isinstance(i, tuple)] == [(ord("E"), b"SERROR\x00\x00")]
    assert rebuild(out) == data
    assert b"".join(i for i in out if isinstance(i, bytes)) == frame(ord("D"), b"x") + frame(ord("Z"), b"I")


def test_scanner_empty_reads():
    scanner = MessageScanner({ord("E")}, 100)
    assert rebuild(scanner.feed(b"")) == b""
    assert scanner.at_boundary
    data = frame(ord("E"), b"abc")
    assert scanner.feed(data[:3]) == []
    assert scanner.feed(b"") == []
    assert not scanner.at_boundary
    assert scanner.feed(data[3:]) == [(ord("E"), b"abc")]
    assert scanner.at_boundary


def test_scanner_empty_bodies_and_exact_limit():
    data = frame(ord("1")) + frame(ord("2")) + frame(ord("E"), b"x" * 96) + frame(ord("3"), b"y" * 96)
    scanner = MessageScanner({ord("2"), ord("E")}, 100)
    out = scanner.feed(data)
    assert out == [frame(ord("1")), (ord("2"), b""), (ord("E"), b"x" * 96), frame(ord("3"), b"y" * 96)]


# -- MessageScanner: bad lengths --------------------------------------------------------------


def _bad_stream(prefix_msgs, msg_type, length):
    return b"".join(frame(t, b) for t, b in prefix_msgs) + bytes((msg_type,)) + struct.pack("!I", length) + b"z" * 8


@SLOW
@given(
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4),
    st.integers(0, 255),
    st.one_of(st.integers(0, 3), st.integers(101, 2**32 - 1)),
    st.frozensets(st.integers(0, 255)) | st.just(frozenset(range(256))),
)
def test_scanner_bad_length_at_every_split(prefix, msg_type, length, capture):
    max_length = 100
    prefix = [(t, b) for t, b in prefix]
    data = _bad_stream(prefix, msg_type, length)
    header_end = sum(5 + len(b) for _, b in prefix) + 5  # the read completing this offset must fail
    expected = MessageTooLarge if length > max_length else ProtocolViolation
    for points in [[k] for k in range(len(data) + 1)] + [list(range(1, len(data)))]:
        scanner = MessageScanner(capture, max_length)
        fed = 0
        for chunk in split_at(data, points):
            if fed + len(chunk) >= header_end:
                with pytest.raises(expected) as info:
                    scanner.feed(chunk)
                assert type(info.value) is expected
                assert info.value.sqlstate == "08P01"
                # A broken stream is never at a boundary again, and the scanner stays broken.
                assert not scanner.at_boundary
                with pytest.raises(ProtocolViolation):
                    scanner.feed(frame(ord("Z"), b"I"))
                assert not scanner.at_boundary
                break
            scanner.feed(chunk)
            fed += len(chunk)
        else:
            pytest.fail("bad length not detected")


def test_scanner_not_at_boundary_after_error_mid_message():
    """Part of a message went out before the error: the scanner must not claim a boundary."""
    scanner = MessageScanner(set(), 100)
    msg = frame(ord("D"), b"x" * 50)
    assert scanner.feed(msg[:20]) == [msg[:20]]
    with pytest.raises(MessageTooLarge):
        scanner.feed(msg[20:] + b"D" + struct.pack("!I", 101))
    assert not scanner.at_boundary


def test_message_too_large_is_a_protocol_violation():
    assert issubclass(MessageTooLarge, ProtocolViolation)
    assert issubclass(ProtocolViolation, WireError)
    assert MessageTooLarge("x").sqlstate == ProtocolViolation("x").sqlstate == "08P01"


@FAST
@given(st.binary(max_size=200), st.frozensets(st.integers(0, 255)), st.lists(st.integers(0, 200), max_size=5))
def test_scanner_arbitrary_bytes_only_raise_wire_errors(data, capture, points):
    scanner = MessageScanner(capture, 64)
    out = []
    try:
        for chunk in split_at(data, [min(x, len(data)) for x in points]):
            out += scanner.feed(chunk)
    except WireError:
        return
    assert data.startswith(rebuild(out))


# -- pop_messages -------------------------------------------------------------------------------


def _pop_all(chunks, max_length):
    buf = bytearray()
    got = []
    fed = b""
    for chunk in chunks:
        buf += chunk
        fed += chunk
        got += pop_messages(buf, max_length)
        # Leftover is exactly the incomplete tail.
        assert bytes(buf) == fed[len(b"".join(frame(t, b) for t, b in got)) :]
        assert len(buf) < 5 or len(buf) < 1 + struct.unpack_from("!I", buf, 1)[0]
    return got, buf


@SLOW
@given(message_streams(max_msgs=6, max_body=120))
def test_pop_messages_split_at_every_byte(case):
    msgs, _, max_length = case
    stream = b"".join(frame(t, b) for t, b in msgs)
    for k in range(len(stream) + 1):
        got, buf = _pop_all([stream[:k], stream[k:]], max_length)
        assert got == msgs
        assert buf == b""


@FAST
@given(message_streams(), st.data())
def test_pop_messages_random_splits(case, data):
    msgs, _, max_length = case
    stream = b"".join(frame(t, b) for t, b in msgs)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    got, buf = _pop_all(split_at(stream, points), max_length)
    assert got == msgs and buf == b""
    assert all(type(body) is bytes for _, body in got)
    got, buf = _pop_all([stream[i : i + 1] for i in range(len(stream))], max_length)
    assert got == msgs and buf == b""


def test_pop_messages_keeps_leftover():
    buf = bytearray(frame(ord("Q"), b"a\x00") + b"Q\x00\x00\x00")
    assert pop_messages(buf, 100) == [(ord("Q"), b"a\x00")]
    assert buf == b"Q\x00\x00\x00"
    buf += b"\x06b"
    assert pop_messages(buf, 100) == []
    assert buf == b"Q\x00\x00\x00\x06b"
    buf += b"\x00" + b"X"
    assert pop_messages(buf, 100) == [(ord("Q"), b"b\x00")]
    assert buf == b"X"


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_pop_messages_length_below_four(length):
    data = frame(ord("S")) + b"Q" + struct.pack("!I", length)
    with pytest.raises(ProtocolViolation) as info:
        pop_messages(bytearray(data), 100)
    assert type(info.value) is ProtocolViolation


@pytest.mark.parametrize("length", [101, 1 << 20, 2**32 - 1])
def test_pop_messages_length_above_limit(length):
    header = b"Q" + struct.pack("!I", length)
    buf = bytearray(header[:4])
    assert pop_messages(buf, 100) == []  # header incomplete: nothing known yet
    buf += header[4:]
    with pytest.raises(MessageTooLarge):
        pop_messages(buf, 100)


def test_pop_messages_exact_limit_and_empty_body():
    data = frame(ord("d"), b"x" * 96) + frame(ord("c"))
    assert pop_messages(bytearray(data), 100) == [(ord("d"), b"x" * 96), (ord("c"), b"")]
    with pytest.raises(MessageTooLarge):
        pop_messages(bytearray(data), 99)


@FAST
@given(st.binary(max_size=200))
def test_pop_messages_arbitrary_bytes_only_raise_wire_errors(data):
    buf = bytearray(data)
    try:
        got = pop_messages(buf, 64)
    except WireError:
        return
    assert b"".join(frame(t, b) for t, b in got) + bytes(buf) == data


# -- pop_startup_packet -------------------------------------------------------------------------


def _packet(body):
    return struct.pack("!I", len(body) + 4) + body


@FAST
@given(st.binary(min_size=4, max_size=300), st.binary(max_size=20))
def test_pop_startup_packet_split_at_every_byte(body, trailer):
    data = _packet(body) + trailer
    for k in range(len(data) + 1):
        buf = bytearray()
        got = None
        for chunk in (data[:k], data[k:]):
            buf += chunk
            if got is None:
                got = pop_startup_packet(buf, p.MAX_STARTUP_PACKET)
                if got is None:
                    assert bytes(buf) == data[: len(buf)]
        assert got == body and type(got) is bytes
        assert buf == trailer  # whatever follows the packet stays for the next step


def test_pop_startup_packet_one_byte_at_a_time():
    data = _packet(struct.pack("!I", p.PROTOCOL_3_0) + b"user\x00u\x00\x00") + b"rest"
    buf = bytearray()
    results = []
    for i in range(len(data)):
        buf += data[i : i + 1]
        if not results or results[-1] is None:
            results.append(pop_startup_packet(buf, p.MAX_STARTUP_PACKET))
    assert len(results) == len(data) - 4
    assert results[:-1] == [None] * (len(data) - 5)
    assert results[-1] == data[4:-4]
    assert buf == b"rest"


@pytest.mark.parametrize("length", [0, 1, 4, 7])
def test_pop_startup_packet_too_short(length):
    with pytest.raises(ProtocolViolation) as info:
        pop_startup_packet(bytearray(struct.pack("!I", length) + b"\x00" * 20), p.MAX_STARTUP_PACKET)
    assert type(info.value) is ProtocolViolation
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize("length", [p.MAX_STARTUP_PACKET + 1, 1 << 24, 2**32 - 1])
def test_pop_startup_packet_too_long_detected_from_length_alone(length):
    with pytest.raises(MessageTooLarge):
        pop_startup_packet(bytearray(struct.pack("!I", length)), p.MAX_STARTUP_PACKET)


def test_pop_startup_packet_bounds_inclusive():
    assert p.MAX_STARTUP_PACKET == 10_000
    big = _packet(b"\x00\x03\x00\x00" + b"a" * (p.MAX_STARTUP_PACKET - 8))
    assert len(big) == 10_000
    buf = bytearray(big + b"next")
    assert pop_startup_packet(buf, p.MAX_STARTUP_PACKET) == big[4:]
    assert buf == b"next"
    buf = bytearray(_packet(b"\x04\xd2\x16\x2f"))  # length 8: just the code
    assert pop_startup_packet(buf, p.MAX_STARTUP_PACKET) == b"\x04\xd2\x16\x2f"
    assert buf == b""


def test_pop_startup_packet_incomplete():
    assert pop_startup_packet(bytearray(), 100) is None
    assert pop_startup_packet(bytearray(b"\x00\x00\x00"), 100) is None
    buf = bytearray(b"\x00\x00\x00\x10abc")
    assert pop_startup_packet(buf, 100) is None
    assert buf == b"\x00\x00\x00\x10abc"


@FAST
@given(st.binary(max_size=64))
def test_pop_startup_packet_arbitrary_bytes_only_raise_wire_errors(data):
    buf = bytearray(data)
    try:
        got = pop_startup_packet(buf, 32)
    except WireError:
        return
    if got is None:
        assert buf == data
    else:
        assert _packet(got) + bytes(buf) == data


def test_scanners_share_their_frozen_type_sets_rather_than_copy_them():
    # One scanner per client and per server connection: a copied frozenset is 216 bytes each
    # (mypyc's frozenset() copies even a frozenset), a third of an idle client's memory.
    from pgtwist.pooling.relay import CLIENT_CAPTURE

    a, b = (MessageScanner(CLIENT_CAPTURE, 100, frontend=True) for _ in range(2))
    assert a.capture is CLIENT_CAPTURE and a.closes is b.closes and a.watch is b.watch
    server = MessageScanner(frozenset({ord("Z")}), 100)
    assert server.opens is a.watch and server.small is a.watch  # (the one empty set)
    watched = MessageScanner({ord("Q")}, 100, watch={ord("S")})
    assert watched.capture == {ord("Q")} and type(watched.capture) is frozenset and watched.watch == {ord("S")}
