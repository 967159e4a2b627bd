"""What a logged-in client may send: wire.frontend's checks, and the scanner enforcing them at every split.

The promise: a frontend scanner never hands out (for forwarding) any byte of a message that
PostgreSQL would refuse fatally, nor any captured message the proxy could not read; what it
refuses is a ProtocolViolation (08P01) naming what was wrong, whichever way the bytes came.
"""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgtwist.pooling.relay import CLIENT_CAPTURE
from pgtwist.wire import frontend
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.errors import ProtocolViolation
from pgtwist.wire.framing import MessageScanner, frame, pop_messages

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SESSION_CAPTURE = frozenset((p.TERMINATE,))
CAPTURES = [CLIENT_CAPTURE, SESSION_CAPTURE, frozenset((p.TERMINATE, p.QUERY, p.PARSE))]
MAX = 1 << 20

names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)
values = st.lists(st.none() | st.binary(max_size=20), max_size=5)


def function_call(oid: int, args: list, formats=(), result_format=0) -> bytes:
    body = struct.pack("!IH", oid, len(formats)) + b"".join(struct.pack("!H", f) for f in formats)
    body += struct.pack("!H", len(args))
    for a in args:
        body += struct.pack("!i", -1) if a is None else struct.pack("!i", len(a)) + a
    return frame(p.FUNCTION_CALL, body + struct.pack("!H", result_format))


@st.composite
def bind_messages(draw):
    params = draw(values)
    formats = draw(st.sampled_from([(), (1,), tuple(0 for _ in params)]))
    results = draw(st.lists(st.integers(0, 1), max_size=3))
    return m.bind(draw(names), draw(names), params, formats, results)


valid_messages = st.one_of(
    st.builds(m.query, names),
    st.builds(m.parse, names, names, st.lists(st.integers(0, 2**32 - 1), max_size=4)),
    bind_messages(),
    st.builds(m.describe, st.sampled_from("SP"), names),
    st.builds(m.close, st.sampled_from("SP"), names),
    st.builds(m.execute, names, st.integers(0, 2**31 - 1)),
    st.just(m.sync()),
    st.just(m.flush()),
    st.builds(m.copy_data, st.binary(max_size=40)),
    st.just(m.copy_done()),
    st.builds(m.copy_fail, names),
    st.builds(function_call, st.integers(0, 2**32 - 1), values),
)

# Malformed messages, each with words its refusal must contain.
BAD = [
    (frame(p.DESCRIBE, b"Xname\x00"), "unknown target type 88"),
    (frame(p.CLOSE, b"\x00\x00"), "unknown target type 0"),
    (frame(p.DESCRIBE, b""), "Describe"),
    (frame(p.CLOSE, b"Sname"), "no terminating NUL"),
    (frame(p.DESCRIBE, b"Sa\x00b\x00"), "after the name"),
    (frame(p.QUERY, b"SELECT 1"), "no terminating NUL"),
    (frame(p.QUERY, b"SELECT 1\x00x"), "after the query string"),
    (frame(p.QUERY, b""), "Query"),
    (frame(p.PARSE, b"s1\x00SELECT 1"), "query string has no terminating NUL"),
    (frame(p.PARSE, b"s1\x00SELECT 1\x00\x00\x02\x00\x00\x00\x17"), "2 parameter types announced"),
    (frame(p.PARSE, b"s1\x00SELECT 1\x00"), "parameter type count"),
    (frame(p.BIND, b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x05ab\x00\x00"), "runs past the end"),
    (frame(p.BIND, b"\x00\x00\x00\x00\x00\x03"), "truncated at parameter 1 of 3"),
    (frame(p.BIND, b"\x00\x00\x00\x02\x00\x00\x00\x00\x00\x01\xff\xff\xff\xff\x00\x00"), "2 parameter formats but 1"),
    (frame(p.BIND, b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"), "has length -2"),
    (frame(p.BIND, b"\x00\x00\x00\x00\x00\x00\x00\x00junk"), "bytes after the result format"),
    (frame(p.BIND, b"\x00\x00\x00\x00"), "parameter count"),
    (frame(p.BIND, b"portal"), "portal name has no terminating NUL"),
    (frame(p.EXECUTE, b"\x00\x00\x00"), "row limit"),
    (frame(p.SYNC, b"x"), "Sync"),
    (frame(p.FLUSH, b"xy"), "Flush"),
    (frame(p.FUNCTION_CALL, b"\x00\x00"), "function OID"),
    (b"!" + struct.pack("!I", 4), "invalid frontend message type 33"),
    (b"p" + struct.pack("!I", 9) + b"pass\x00", "invalid frontend message type 112"),
    (b"\x00" + struct.pack("!I", 4), "invalid frontend message type 0"),
    (b"D" + struct.pack("!I", 10_001) + b"S" + b"x" * 9995 + b"\x00", "limit 10000"),
    (b"S" + struct.pack("!I", 20_000), "limit 10000"),
    (b"Q" + struct.pack("!I", 3), "invalid message length 3"),
    (b"Q" + struct.pack("!I", MAX + 1), "invalid message length"),
]


def test_every_check_accepts_what_the_encoders_make():
    for data in (
        m.query("SELECT 1"),
        m.parse("", "SELECT $1", [23]),
        m.bind("", "s", [b"1", None], [0], [1]),
        m.describe("P", ""),
        m.close("S", "s1"),
        m.execute("", 0),
        m.sync(),
        m.flush(),
        m.terminate(),
        m.copy_data(b"x"),
        m.copy_done(),
        m.copy_fail("no"),
        function_call(1598, [b"\x00\x00\x00\x01", None], (1,), 1),
    ):
        ((msg_type, body),) = pop_messages(bytearray(data), MAX)
        frontend.check(msg_type, body)


@pytest.mark.parametrize("data,words", BAD, ids=[repr(b[:8]) for b, _ in BAD])
def test_check_names_what_was_wrong(data, words):
    msg_type = data[0]
    (length,) = struct.unpack_from("!I", data, 1)
    if length < 4 or length > MAX or len(data) != length + 1:
        return  # (only the framer sees these: no whole body to hand to check())
    with pytest.raises(ProtocolViolation) as e:
        frontend.check(msg_type, data[5:])
    assert words in str(e.value)
    assert e.value.sqlstate == "08P01"


def feed_all(scanner, chunks):
    """Feed until done or refused: (emitted bytes as the server would receive them, the error)."""
    out = []
    for chunk in chunks:
        try:
            items = scanner.feed(chunk)
        except ProtocolViolation as e:
            return b"".join(out), e
        out.extend(frame(*i) if isinstance(i, tuple) else i for i in items)
    return b"".join(out), None


PREFIX = m.query("SELECT 1") + m.parse("", "SELECT $1", [23]) + m.bind("", "", [b"7"]) + m.execute() + m.sync()


@pytest.mark.parametrize("data,words", BAD, ids=[repr(b[:8]) for b, _ in BAD])
@pytest.mark.parametrize("capture", CAPTURES, ids=["transaction", "session", "audit"])
def test_bad_message_is_refused_at_every_split_and_none_of_it_goes_out(data, words, capture):
    stream = PREFIX + data
    (length,) = struct.unpack_from("!I", data, 1)
    must_check = data[0] in capture or data[0] not in frontend.TYPES or length > frontend.SMALL_LIMIT
    if len(stream) > 200:
        splits = list(range(0, len(PREFIX) + 10)) + [len(stream) - 3, len(stream) - 1]
    else:
        splits = range(len(stream) + 1)
    for split in splits:
        scanner = MessageScanner(capture, MAX, frontend=True)
        emitted, error = feed_all(scanner, [stream[:split], stream[split:]])
        if not must_check and 4 <= length <= MAX:
            # A layout only the server reads (session mode): forwarded, the server answers ERROR 08P01.
            assert error is None and emitted == stream
            continue
        assert error is not None, split
        assert words in str(error), (split, str(error))
        assert PREFIX.startswith(emitted), f"bytes of the refused message went out (split {split})"
        assert not scanner.at_boundary
        with pytest.raises(ProtocolViolation):
            scanner.feed(m.sync())  # broken for good


@FAST
@given(st.lists(valid_messages, max_size=8), st.sampled_from(CAPTURES), st.data())
def test_valid_frontend_streams_pass_at_any_splits(msgs, capture, data):
    stream = b"".join(msgs)
    points = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]
    scanner = MessageScanner(capture, MAX, frontend=True)
    emitted, error = feed_all(scanner, chunks)
    assert error is None, error
    assert emitted == stream
    assert scanner.at_boundary


def test_valid_stream_one_byte_at_a_time_and_whole_for_every_capture():
    stream = b"".join(
        [PREFIX, m.describe("S", "x"), m.close("P", ""), m.copy_data(b"abc"), m.copy_done(), function_call(1, [b"a"]), m.flush()]
    )
    for capture in CAPTURES:
        for chunks in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
            scanner = MessageScanner(capture, MAX, frontend=True)
            emitted, error = feed_all(scanner, chunks)
            assert error is None and emitted == stream


@FAST
@given(st.binary(max_size=200), st.sampled_from(CAPTURES), st.lists(st.integers(0, 200), max_size=4))
def test_arbitrary_bytes_only_refused_and_what_goes_out_is_well_formed(data, capture, points):
    points = sorted(min(x, len(data)) for x in points)
    chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    scanner = MessageScanner(capture, MAX, frontend=True)
    emitted, _ = feed_all(scanner, chunks)
    # Everything that went out is whole messages (but perhaps the body of the last one, which
    # follows), of frontend types and lengths, and the captured ones are well formed.
    pos = 0
    while len(emitted) - pos >= 5:
        msg_type = emitted[pos]
        (length,) = struct.unpack_from("!I", emitted, pos + 1)
        assert msg_type in frontend.TYPES
        assert 4 <= length and (length <= frontend.SMALL_LIMIT or msg_type not in frontend.SMALL_TYPES)
        if pos + 1 + length <= len(emitted) and msg_type in capture:
            frontend.check(msg_type, emitted[pos + 5 : pos + 1 + length])
        pos += 1 + length
    assert pos >= len(emitted), "a partial header went out"


def test_hot_path_still_returns_the_read_itself():
    scanner = MessageScanner(SESSION_CAPTURE, MAX, frontend=True)
    data = m.query("SELECT 1")
    assert scanner.feed(data)[0] is data
    batch = m.bind("", "s", [b"1"]) + m.execute() + m.sync()
    assert scanner.feed(batch)[0] is batch


def test_server_side_scanner_is_unchanged_by_the_frontend_rules():
    scanner = MessageScanner(frozenset((p.READY_FOR_QUERY,)), MAX)
    data = b"!" + struct.pack("!I", 4) + b"D" + struct.pack("!I", 20_000) + b"x" * 19_996
    assert b"".join(scanner.feed(data)) == data


# -- runs ([Parse,] Bind, [Describe,] Execute, Sync, as drivers send a query with parameters or
# run a prepared statement again): walked in one pass (MessageScanner._run), a run must come
# out exactly as the general walk makes it, refusals included.


@st.composite
def runs(draw):
    """A run, or something near one: a name, a byte or a length changed, a message missing or
    added, its read cut short or run on."""
    msgs = [draw(bind_messages()) if draw(st.booleans()) else m.bind("", draw(st.sampled_from(["", "P0_1"])), draw(values))]
    if draw(st.booleans()):
        names_ = draw(st.lists(st.integers(0, 2**32 - 1), max_size=3))
        msgs.insert(0, m.parse(draw(st.sampled_from(["", "", "s1"])), draw(names), names_))
    describe = draw(st.sampled_from([None, ("P", ""), ("S", ""), ("P", "x"), ("X", "")]))
    if describe is not None:
        msgs.append(frame(p.DESCRIBE, describe[0].encode() + describe[1].encode() + b"\x00"))
    msgs += [m.execute(draw(st.sampled_from(["", "", "p"])), draw(st.integers(0, 2**31 - 1))), m.sync()]
    if draw(st.booleans()):
        msgs.insert(draw(st.integers(0, len(msgs))), draw(valid_messages))
    if draw(st.booleans()):
        del msgs[draw(st.integers(1, len(msgs) - 1))]
    data = bytearray(b"".join(msgs))
    for _ in range(draw(st.integers(0, 2))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, 3))
    return bytes(data[: len(data) - cut] if cut < len(data) else data)


_RUN_SLOTS = ("runs", "run_head", "run_size")  # (what only the one-pass walk sets)
# Its fields: __slots__ in the pure form, what mypyc lists in the compiled one (pgtwist/compiled.py).
_SCANNER_FIELDS = getattr(MessageScanner, "__slots__", None) or MessageScanner.__mypyc_attrs__


def scanned(reads: list, runs: bool):
    """What a fresh transaction-pooling scanner makes of *reads*: per read the items or the
    refusal and every slot of its state after it."""
    scanner = MessageScanner(CLIENT_CAPTURE, MAX, frontend=True)
    scanner.runs = runs
    out = []
    for data in reads:
        try:
            out.append(scanner.feed(data))
        except ProtocolViolation as e:
            out.append(("refused", type(e), str(e)))
        out.append([getattr(scanner, slot) for slot in _SCANNER_FIELDS if slot not in _RUN_SLOTS])
    return out


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs(), st.lists(st.integers(0, 200), max_size=3), runs())
def test_run_walk_agrees_with_the_general_walk(data, points, then):
    """Whole, in pieces, and followed by another read: the same items, refusals and state."""
    points = sorted(min(x, len(data)) for x in points)
    reads = [data[a:b] for a, b in zip([0] + points, points + [len(data)])] + [then]
    assert scanned(reads, runs=True) == scanned(reads, runs=False)


@pytest.mark.parametrize(
    "head",
    [m.parse("", "SELECT $1", [23]) + m.bind("", "", [b"7"], (), (1,)), m.bind("", "P0_1", [b"7", None], (1,))],
    ids=["unnamed", "prepared"],
)
@pytest.mark.parametrize(
    "tail",
    [m.describe("P", "") + m.execute() + m.sync(), m.describe("S", "") + m.execute("", 5) + m.sync(), m.execute() + m.sync()],
    ids=["describe-portal", "describe-statement", "no-describe"],
)
def test_runs_as_drivers_send_them_take_the_one_pass_walk(head, tail):
    data = head + tail
    scanner = MessageScanner(CLIENT_CAPTURE, MAX, frontend=True)
    assert scanner.runs
    assert scanner._run(data, len(data), data[0], struct.unpack_from("!I", data, 1)[0]) is not None
    items = scanner.feed(data)
    assert items[-1] == (p.SYNC, b"") and b"".join(frame(*i) for i in items) == data
    assert scanner.at_boundary and not scanner.unsynced and scanner.last_type == p.SYNC


def test_session_pooling_scanner_never_takes_the_run_walk():
    # (It counts Syncs: the one-pass walk does not.)
    assert not MessageScanner(SESSION_CAPTURE, MAX, frozenset((p.SYNC,)), frontend=True).runs
    assert not MessageScanner(CLIENT_CAPTURE, MAX).runs
