"""In-memory session fixtures: the real Proxy, ClientSession, Pool and ServerConnection on StringTransports.

Proxy4Test's connect_server() builds a real ServerConnection on a StringTransport instead of
dialling a node, and (by default) plays the node's side of the login. Harness drives one
session-pooled database; Setup one transaction-pooled database, a single node or P + R1 + R2
behind a fake monitor (tests.harness.routing).
"""

from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from pgtwist import config as configmod
from pgtwist.backend.connection import ServerConnection
from pgtwist.backend.login import ServerLogin
from pgtwist.pooling.statements import INTERNAL_NAME
from pgtwist.routing.policy import NodeState
from pgtwist.routing.router import DatabaseRouter
from pgtwist.service.proxy import Proxy
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.framing import frame, pop_messages

from .routing import R1, R2, FakeMonitor, P

NODE_PID, NODE_KEY = 777, b"NODE"
NODE_PARAMS = {"server_version": "16.4", "client_encoding": "UTF8", "application_name": "", "DateStyle": "ISO, MDY"}

BASE = {
    "auth_type": "trust",
    "databases": {"appdb": {"dbname": "postgres", "nodes": ["db1:5432"], "pool_size": 2}},
    "users": {"app": {"password": "pw"}},
    "client_login_timeout": 10,
    "query_wait_timeout": 30,
    "server_connect_timeout": 5,
}
_CONFIGS: dict = {}


def make_config(**overrides):
    key = repr(sorted(overrides.items()))
    if key not in _CONFIGS:  # a plaintext password costs a PBKDF2 run: build each config once
        _CONFIGS[key] = configmod.from_dict({**BASE, **overrides})
    return _CONFIGS[key]


def node_welcome(params=NODE_PARAMS) -> bytes:
    return (
        m.authentication_ok()
        + b"".join(m.parameter_status(k, v) for k, v in params.items())
        + m.backend_key_data(NODE_PID, NODE_KEY)
        + m.ready_for_query()
    )


def messages(data: bytes) -> list[tuple[int, bytes]]:
    buf = bytearray(data)
    out = pop_messages(buf, p.MAX_PROTOCOL_MESSAGE)
    assert not buf, f"ends inside a message: {bytes(buf)!r}"
    return out


def keeps_its_server(session) -> bool:
    """The client keeps its server connection between transactions: its pool lists it as lent to it."""
    server = session.server
    return server is not None and server.pool.lent.get(server) is session


def types(data: bytes) -> str:
    return "".join(chr(t) for t, _ in messages(data))


def queries(data: bytes) -> list[str]:
    """The SQL sent: simple Queries, and the statements of the proxy's own extended batches."""
    out = []
    for t, b in messages(data):
        if t == p.QUERY:
            out.append(m.decode_query(b))
        elif t == p.PARSE and m.decode_parse(b)[0] == INTERNAL_NAME:
            out.append(m.decode_parse(b)[1])
    return out


def split_internal(msgs: list[tuple[int, bytes]]) -> tuple[list, list[str]]:
    """Messages sent -> (those before the proxy's last batch, the statements of that batch).

    The batch must be what internal_batch makes: Close P, Close S, then per statement Parse,
    Bind, Execute, Close P, Close S under the proxy's own name, then Sync.
    """
    own_close = INTERNAL_NAME.encode() + b"\x00"
    start = max(
        i
        for i, (t, b) in enumerate(msgs)
        if t == p.CLOSE and b == b"P" + own_close and (i == 0 or msgs[i - 1][0] != p.EXECUTE)
    )
    own = msgs[start:]
    assert "".join(chr(t) for t, _ in own) == "CC" + "PBECC" * ((len(own) - 3) // 5) + "S", own
    statements = [m.decode_parse(b)[1] for t, b in own if t == p.PARSE]
    assert all(m.decode_parse(b)[0] == INTERNAL_NAME for t, b in own if t == p.PARSE)
    assert all(m.decode_bind(b)[:2] == (INTERNAL_NAME, INTERNAL_NAME) for t, b in own if t == p.BIND)
    return msgs[:start], statements


def internal_answer(rows=(), params=(), statements=1) -> bytes:
    """What PostgreSQL answers to internal_batch: CloseComplete, ParseComplete, BindComplete, rows,
    CommandComplete, ParameterStatus, ReadyForQuery."""
    out = m.close_complete() * 2
    for _ in range(statements):
        out += m.parse_complete() + m.bind_complete()
        out += b"".join(m.data_row(list(r)) for r in rows)
        out += m.command_complete(f"SELECT {len(rows)}") + m.close_complete() * 2
    return out + b"".join(m.parameter_status(k, v) for k, v in params) + m.ready_for_query()


class Proxy4Test(Proxy):
    def __init__(self, config):
        super().__init__(config, MemoryReactorClock())
        self.servers: list[ServerConnection] = []
        self.auto_login = True

    def connect_server(self, pool):
        user = self.config.users.get(pool.user)
        login = ServerLogin(
            pool.user,
            pool.database.dbname,
            user.credential if user else None,
            client_key=self.client_keys.get(pool.user),
            node_name=str(pool.node),
        )
        conn = ServerConnection(f"s{len(self.servers) + 1}", pool, login)
        conn.connection_made(StringTransport(lenient=True))
        self.servers.append(conn)
        ready = conn.ready  # login clears conn.ready once it has fired
        if self.auto_login:
            conn.got_data(node_welcome())
            conn.transport.clear()
        return ready


class Harness:
    def __init__(self, **overrides):
        self.proxy = Proxy4Test(make_config(**overrides))
        self.clock = self.proxy.clock

    def client(self, user="app", database="appdb", login=True, **params):
        transport = StringTransport(lenient=True)
        session = self.proxy.new_client(transport)
        if login:
            session.got_data(m.startup_message({"user": user, "database": database, **params}))
        return session, transport

    def linked(self, **params):
        """A client logged in and linked to a server; both transports cleared."""
        session, ct = self.client(**params)
        assert session.state == "linked", (session.state, ct.value())
        server = session.server
        ct.clear()
        server.transport.clear()
        return session, ct, server, server.transport

    def lent(self, **params):
        """Transaction pooling: a client that ran SELECT 1 and keeps (is lent) its server
        connection between transactions; nothing cleared."""
        session, ct = self.client(**params)
        server = session.server
        session.got_data(m.query("SELECT 1"))
        server.got_data(RESULT + Z_IDLE)
        assert keeps_its_server(session)
        return session, ct, server

    @property
    def pool(self):
        (pool,) = self.proxy.pools.values()
        return pool


def finish_internal(server, *, params=(), error=None, status=p.TX_IDLE):
    """Play the node's answer to one internal query: a row, maybe ParameterStatus, ReadyForQuery."""
    out = b""
    if error:
        out += m.error_response("ERROR", error[0], error[1])
    else:
        out += frame(ord("T"), b"\x00\x01set_config\x00" + b"\x00" * 18) + frame(ord("D"), b"\x00\x01\x00\x00\x00\x01x")
        out += m.command_complete("SELECT 1")
    out += b"".join(m.parameter_status(k, v) for k, v in params)
    server.got_data(out + m.ready_for_query(status))


RESULT = (
    frame(ord("T"), b"\x00\x01?column?\x00" + b"\x00" * 6 + b"\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00")
    + frame(ord("D"), b"\x00\x01\x00\x00\x00\x011")
    + m.command_complete("SELECT 1")
)

ROW_DESCRIPTION = RESULT[: 1 + int.from_bytes(RESULT[1:5], "big")]
DATA_ROW = frame(ord("D"), b"\x00\x01\x00\x00\x00\x011")
Z_IDLE = m.ready_for_query(p.TX_IDLE)
Z_IN = m.ready_for_query(p.TX_IN_TRANSACTION)
Z_FAILED = m.ready_for_query(p.TX_FAILED)


class RecordingTransport(StringTransport):
    """A StringTransport that also keeps each write as it was given (to check bytes are not copied)."""

    def __init__(self):
        super().__init__(lenient=True)
        self.writes: list = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)


class Setup:
    """One database in transaction pooling: a single node, or P + R1 + R2 behind a fake monitor."""

    def __init__(self, clustered=True, pool_size=2, **overrides):
        nodes = [P, R1, R2] if clustered else ["db1:5432"]
        config = make_config(
            pool_mode="transaction",
            databases={"appdb": {"dbname": "postgres", "nodes": nodes, "pool_size": pool_size}},
            **overrides,
        )
        self.proxy = Proxy4Test(config)
        self.clock = self.proxy.clock
        self.monitor = None
        if clustered:
            states = [NodeState(P, role="primary", up=True, timeline=1, lsn=10)]
            states += [NodeState(r, role="replica", up=True, timeline=1, lsn=10, lag_bytes=0, lag_seconds=0.0) for r in (R1, R2)]
            self.monitor = FakeMonitor(states, self.clock)
            database = config.databases["appdb"]
            self.proxy.routers["appdb"] = DatabaseRouter(database, config, self.monitor)

    def client(self):
        """A logged-in client; its transport cleared."""
        transport = RecordingTransport()
        session = self.proxy.new_client(transport)
        session.got_data(m.startup_message({"user": "app", "database": "appdb"}))
        assert session.logged_in and types(transport.value()).endswith("KZ"), transport.value()
        transport.clear()
        transport.writes.clear()
        return session, transport

    def pool(self, node):
        (pool,) = [pl for pl in self.proxy.pools.values() if str(pl.node) == node]
        return pool

    def set_up(self, name, up):
        self.monitor.states[name].up = up


def lose(server):
    server.connection_lost(Failure(ConnectionLost()))


def error_fields(data: bytes) -> list[dict]:
    return [m.decode_fields(b) for t, b in messages(data) if t == p.ERROR_RESPONSE]


def sent(server) -> bytes:
    data = server.transport.value()
    server.transport.clear()
    return data


def extended(sql: str) -> bytes:
    return m.parse("", sql) + m.bind("", "") + m.execute() + m.sync()


def begin(s, session):
    session.got_data(m.query("BEGIN"))
    server = session.server
    assert queries(sent(server)) == ["BEGIN"]
    server.got_data(m.command_complete("BEGIN") + Z_IN)
    assert session.state == "linked" and session.relay.tx_status == p.TX_IN_TRANSACTION
    session.transport.clear()
    return server


# -- the settings SELECT the proxy sends, read back strictly ------------------------------------


def parse_e_literal(sql: str, pos: int) -> tuple[str, int]:
    """Read one E'...' literal the way PostgreSQL does; return (value, position after it)."""
    assert sql[pos : pos + 2] == "E'", sql[pos:]
    i, out = pos + 2, []
    while True:
        ch = sql[i]
        if ch == "\\":
            # quote_literal doubles every backslash: no other escape may ever appear.
            assert sql[i + 1] == "\\", f"stray escape at {i}: {sql!r}"
            out.append("\\")
            i += 2
        elif ch == "'":
            if i + 1 < len(sql) and sql[i + 1] == "'":
                out.append("'")
                i += 2
            else:
                return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1


def parse_settings_query(sql: str) -> dict[str, str]:
    """Parse what settings_query() builds, strictly; anything else fails the test."""
    assert sql.startswith("SELECT ")
    pos, out = len("SELECT "), {}
    while True:
        assert sql.startswith("pg_catalog.set_config(", pos), sql[pos:]
        name, pos = parse_e_literal(sql, pos + len("pg_catalog.set_config("))
        assert sql.startswith(", ", pos)
        value, pos = parse_e_literal(sql, pos + 2)
        assert sql.startswith(", false)", pos)
        pos += len(", false)")
        out[name] = value
        if pos == len(sql):
            return out
        assert sql.startswith(", ", pos)
        pos += 2


def tick(s, seconds):
    """Time passes with the janitor running each second, as the service runs it."""
    for _ in range(int(seconds)):
        s.clock.advance(1.0)
        s.proxy.maintain()
