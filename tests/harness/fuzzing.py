"""Fuzzing a live pgtwist: frame generators (valid, truncated, mutated, random types, bad lengths) and the clients that judge it.

Not a test module. Shared by tests/integration/test_fuzz.py (hypothesis draws the choices) and
bench/fuzz.py (random.Random draws them, a million frames at a time). The generators take a
Chooser, so one description of the frames serves both.

What the judge holds pgtwist to, batch by batch: a batch of frames, then Sync and a sentinel
Query, either gets the sentinel's answer (the session went on) or ends with the connection closed
after at most one FATAL, which must be 08P01; never XX000, never an error saying a node's
connection was lost (the client's bytes must not end server connections), never a hang.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.framing import frame

from .proxy import RawClient

# Statements the fuzzer may send as they are: harmless, quick, some failing, some opening
# transactions or changing settings (the sentinel batch ends whatever they leave open).
SQL = [
    "SELECT 1",
    "SELECT $1::int",
    "SELECT $1::text, $2::int",
    "BEGIN",
    "BEGIN READ ONLY",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT s",
    "SET application_name = 'fuzz'",
    "RESET ALL",
    "SELECT * FROM no_such_table",
    "SELEC 1",
    "",
    ";",
    "SELECT 1; SELECT 2",
    "SELECT pg_catalog.current_setting('search_path')",
    "SELECT generate_series(1, 50)",
    "COPY (SELECT 1) TO STDOUT",
    "DEALLOCATE ALL",
    "DISCARD ALL",
    "PREPARE q AS SELECT 1",
    "EXECUTE q",
    "SELECT pg_is_in_recovery()",
    "SELECT 1/0",
    "SELECT nextval('fuzz_seq')",
]
NAMES = ["", "s1", "s2", "p1", "pgtwist_0123", "x" * 70]
FRONTEND_TYPES = b"BCDEFHPQSXcdf"


class Chooser:
    """The primitive choices a generator makes; subclassed for hypothesis and for random."""

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def binary(self, max_size: int) -> bytes:
        raise NotImplementedError

    def choice(self, seq):
        return seq[self.integer(0, len(seq) - 1)]

    def coin(self, p_true: float = 0.5) -> bool:
        return self.integer(0, 999) < p_true * 1000


class RandomChooser(Chooser):
    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def binary(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))


class HypothesisChooser(Chooser):
    def __init__(self, data):
        from hypothesis import strategies as st

        self.data = data
        self.st = st

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def binary(self, max_size: int) -> bytes:
        return self.data.draw(self.st.binary(max_size=max_size))


def valid_frame(ch: Chooser) -> bytes:
    kind = ch.integer(0, 11)
    if kind <= 2:
        return m.query(ch.choice(SQL))
    if kind == 3:
        return m.parse(ch.choice(NAMES), ch.choice(SQL), [ch.choice([0, 23, 25])] * ch.integer(0, 2))
    if kind == 4:
        params = [ch.choice([None, b"1", b"42", b"abc", b""]) for _ in range(ch.integer(0, 2))]
        return m.bind(ch.choice(NAMES[:4]), ch.choice(NAMES), params, ch.choice([(), (0,), (1,)]), ch.choice([(), (0,), (1,)]))
    if kind == 5:
        return m.describe(ch.choice("SP"), ch.choice(NAMES))
    if kind == 6:
        return m.execute(ch.choice(NAMES[:4]), ch.choice([0, 1, 5]))
    if kind == 7:
        return m.close(ch.choice("SP"), ch.choice(NAMES))
    if kind == 8:
        return ch.choice([m.sync(), m.flush()])
    if kind == 9:
        return ch.choice([m.copy_data(ch.binary(20)), m.copy_done(), m.copy_fail("fuzz")])
    if kind == 10:  # FunctionCall: int4pl(1, 2), or an OID that is nothing
        args = [struct.pack("!i", 1), struct.pack("!i", 2)]
        body = struct.pack("!IHHH", ch.choice([177, 1, 0xFFFFFFFF]), 1, 1, 2)
        body += b"".join(struct.pack("!i", len(a)) + a for a in args) + struct.pack("!H", 1)
        return frame(p.FUNCTION_CALL, body)
    return m.terminate() if ch.coin(0.2) else m.sync()


def mutated_frame(ch: Chooser) -> bytes:
    """A valid frame whose body has bytes flipped, cut or added; the length stays consistent."""
    data = bytearray(valid_frame(ch))
    body = data[5:]
    how = ch.integer(0, 3)
    if how == 0 and body:
        for _ in range(ch.integer(1, 3)):
            body[ch.integer(0, len(body) - 1)] = ch.integer(0, 255)
    elif how == 1 and body:
        del body[ch.integer(0, len(body) - 1) :]
    elif how == 2:
        body[ch.integer(0, len(body)) : 0] = ch.binary(8)
    else:
        body = bytearray(ch.binary(24))
    return frame(data[0], bytes(body))


def random_type_frame(ch: Chooser) -> bytes:
    msg_type = ch.integer(0, 255) if ch.coin(0.6) else ch.choice(FRONTEND_TYPES)
    return frame(msg_type, ch.binary(32))


def bad_length_frame(ch: Chooser, max_message_size: int) -> bytes:
    """A header the framer must refuse at once: length below 4, above the limit, or a small type above 10,000."""
    msg_type = ch.choice(FRONTEND_TYPES)
    length = ch.choice([0, 1, 2, 3, max_message_size + 1, 0xFFFFFFFF, 0x7FFFFFFF])
    if ch.coin(0.3):
        msg_type, length = ch.choice(b"CDEHSXcf"), ch.choice([10_001, 65_536, 1_000_000])
        length = min(length, max_message_size)
        if length <= 10_000:
            length = 10_001
    return bytes((msg_type,)) + struct.pack("!I", length) + ch.binary(8)


def truncated_frame(ch: Chooser) -> bytes:
    data = valid_frame(ch)
    return data[: ch.integer(0, len(data) - 1)]


def batch(ch: Chooser, max_message_size: int, max_frames: int = 6) -> tuple[list[bytes], bool]:
    """(frames, ends_truncated): what one client sends before its sentinel (or before it vanishes)."""
    frames = []
    for _ in range(ch.integer(1, max_frames)):
        kind = ch.integer(0, 9)
        if kind <= 3:
            frames.append(valid_frame(ch))
        elif kind <= 5:
            frames.append(mutated_frame(ch))
        elif kind <= 7:
            frames.append(random_type_frame(ch))
        elif kind == 8:
            frames.append(bad_length_frame(ch, max_message_size))
            break  # (nothing after it is read)
        else:
            frames.append(truncated_frame(ch))
            return frames, True
    return frames, False


# --------------------------------------------------------------------------- judging


@dataclass
class Verdicts:
    batches: int = 0
    frames: int = 0
    answered: int = 0
    closed: int = 0
    vanished: int = 0
    logins: int = 0
    errors: Counter = field(default_factory=Counter)  # (severity, SQLSTATE) -> count
    violations: list = field(default_factory=list)

    def summary(self) -> str:
        top = ", ".join(f"{s} {c}: {n}" for (s, c), n in self.errors.most_common(12))
        return (
            f"{self.batches} batches, {self.frames} frames: {self.answered} answered, {self.closed} closed, "
            f"{self.vanished} vanished mid-message; {self.logins} logins; errors {top}"
        )


class FuzzClient:
    """One logged-in client at a time, sending batches and judging each answer; logs in again after a close."""

    def __init__(self, host: str, port: int, user: str, password: str, database: str = "appdb", timeout: float = 10):
        self.host, self.port, self.user, self.password, self.database = host, port, user, password, database
        self.timeout = timeout
        self.client: RawClient | None = None
        self.local_port = 0
        self.verdicts = Verdicts()
        self._n = 0

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _login(self) -> RawClient:
        if self.client is None:
            c = RawClient(self.host, self.port, timeout=self.timeout)
            self.local_port = c.sock.getsockname()[1]  # (the proxy logs it: "connected from")
            c.login(self.user, self.database, self.password)
            self.client = c
            self.verdicts.logins += 1
        return self.client

    def _violation(self, what: str, frames: list[bytes]) -> None:
        when = time.strftime("%H:%M:%S")
        self.verdicts.violations.append((f"{what} (at {when}, port {self.local_port})", [bytes(f[:80]) for f in frames]))

    def send(self, frames: list[bytes], truncated: bool) -> None:
        v = self.verdicts
        v.batches += 1
        v.frames += len(frames)
        self._n += 1
        c = self._login()
        if truncated:
            # It vanishes mid-message: the proxy must just let go.
            try:
                c.send(b"".join(frames))
            except OSError:
                pass
            self.close()
            v.vanished += 1
            return
        tag = f"fz{self._n}"
        try:
            c.send(b"".join(frames) + m.sync() + m.query(f"ROLLBACK; SELECT '{tag}'"))
        except OSError:
            pass  # closed under us: read what came
        errors = []
        got_tag = False
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                if time.monotonic() > deadline:
                    self._violation("no answer and no close within the timeout (a hang)", frames)
                    self.close()
                    return
                msg_type, body = c.read_message()
                if msg_type == p.ERROR_RESPONSE:
                    fields = m.decode_fields(body)
                    errors.append(fields)
                    v.errors[(fields.get("S"), fields.get("C"))] += 1
                elif msg_type == p.DATA_ROW and body.endswith(tag.encode()):
                    got_tag = True
                elif msg_type == p.READY_FOR_QUERY and got_tag:
                    break
        except (TimeoutError, ConnectionError, OSError) as e:
            if isinstance(e, socket.timeout):
                self._violation("read timed out (a hang)", frames)
            self.close()
            self._judge(errors, frames, closed=True)
            v.closed += 1
            return
        self._judge(errors, frames, closed=False)
        v.answered += 1

    def _judge(self, errors: list[dict], frames: list[bytes], closed: bool) -> None:
        fatals = [e for e in errors if e.get("S") in ("FATAL", "PANIC")]
        for e in errors:
            code = e.get("C")
            if code == "XX000" and ("R" not in e or "pgtwist" in e.get("M", "")):
                # (PostgreSQL's own XX000s, which name their source routine, are relayed as they
                # are: "cache lookup failed for type 0" answers a Parse declaring type 0 directly too.)
                self._violation(f"XX000 from pgtwist: {e.get('M')}", frames)
            if code in ("08006", "08000", "57P01") or "lost the connection" in e.get("M", ""):
                self._violation(f"a server connection ended under the client: {code} {e.get('M')}", frames)
        if fatals:
            if not closed:
                self._violation(f"FATAL but the session went on: {fatals}", frames)
            if len(fatals) > 1:
                self._violation(f"more than one FATAL: {fatals}", frames)
            if fatals[0].get("C") != "08P01":
                self._violation(f"FATAL {fatals[0].get('C')} {fatals[0].get('M')}", frames)
        elif closed and not any(f[:1] == b"X" for f in frames):
            self._violation(f"closed without a FATAL or a Terminate (errors: {errors})", frames)


class HealthyClient(threading.Thread):
    """A well-behaved client beside the fuzzing: it must keep getting right answers throughout."""

    def __init__(self, connect, table: str):
        super().__init__(daemon=True)
        self.connect = connect  # () -> psycopg.Connection (autocommit)
        self.table = table
        self.stop_event = threading.Event()
        self.checks = 0
        self.failures: list[str] = []
        self.last_ok = time.monotonic()
        self.doing = ""

    def run(self) -> None:
        rng = random.Random(7)
        try:
            with self.connect() as conn:
                while not self.stop_event.is_set():
                    n = rng.randint(-10**6, 10**6)
                    self.doing = "SELECT"
                    got = conn.execute("SELECT %s::int * 2", (n,)).fetchone()[0]
                    if got != 2 * n:
                        self.failures.append(f"SELECT {n} * 2 gave {got}")
                    self.doing = "INSERT"
                    with conn.transaction():
                        row_id = conn.execute(f"INSERT INTO {self.table} (v) VALUES (%s) RETURNING id", (n,)).fetchone()[0]
                        self.doing = "SELECT after INSERT"
                        back = conn.execute(f"SELECT v FROM {self.table} WHERE id = %s", (row_id,)).fetchone()
                        self.doing = "COMMIT"
                    if back != (n,):
                        self.failures.append(f"wrote {n}, read {back}")
                    self.checks += 1
                    self.last_ok = time.monotonic()
                    time.sleep(0.005)
        except Exception as e:  # noqa: BLE001 (any failure of the healthy client is the finding)
            self.failures.append(f"{type(e).__name__}: {e}")

    def finish(self) -> None:
        self.stop_event.set()
        self.join(15)
        if self.is_alive():
            self.failures.append(f"stuck: no answer for {time.monotonic() - self.last_ok:.0f} s (at: {self.doing})")
