"""Shared by the admin console, inspect, metrics and manhole tests: a real Proxy on StringTransports and a MemoryReactorClock.

Not a test module. Server connections are real ServerConnections whose node side is
played here (login answered at once); clients are real ClientSessions.
"""

from __future__ import annotations

import struct

from twisted.internet.testing import MemoryReactorClock, StringTransport

from pgtwist import config as configmod
from pgtwist.backend.connection import ServerConnection
from pgtwist.backend.login import ServerLogin
from pgtwist.service.proxy import Proxy
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.framing import pop_messages

NODE_PARAMS = {"server_version": "16.4", "client_encoding": "UTF8", "application_name": "", "DateStyle": "ISO, MDY"}

BASE = {
    "auth_type": "trust",
    "databases": {"appdb": {"dbname": "postgres", "nodes": ["db1:5432"], "pool_size": 2}},
    "users": {"app": {"password": "pw"}, "admin": {"password": "adminpw"}},
    "admin": {"users": ["admin"]},
    "client_login_timeout": 10,
    "query_wait_timeout": 30,
    "server_connect_timeout": 5,
}


def make_config(**overrides) -> configmod.Config:
    return configmod.from_dict({**BASE, **overrides})


def node_welcome() -> bytes:
    return (
        m.authentication_ok()
        + b"".join(m.parameter_status(k, v) for k, v in NODE_PARAMS.items())
        + m.backend_key_data(4242, b"NODE")
        + m.ready_for_query()
    )


class TestProxy(Proxy):
    __test__ = False  # not a pytest class

    def __init__(self, config, reactor=None):
        super().__init__(config, reactor or MemoryReactorClock())
        self.servers: list[ServerConnection] = []

    def connect_server(self, pool):
        user = self.config.users.get(pool.user)
        login = ServerLogin(pool.user, pool.database.dbname, user.credential if user else None, node_name=str(pool.node))
        conn = ServerConnection(f"s{len(self.servers) + 1}", pool, login)
        conn.connection_made(StringTransport(lenient=True))
        self.servers.append(conn)
        ready = conn.ready
        conn.got_data(node_welcome())
        conn.transport.clear()
        return ready


def client(proxy, user="app", database="appdb", **params):
    transport = StringTransport(lenient=True)
    session = proxy.new_client(transport)
    session.got_data(m.startup_message({"user": user, "database": database, **params}))
    return session, transport


def messages(data: bytes) -> list[tuple[int, bytes]]:
    buf = bytearray(data)
    out = pop_messages(buf, p.MAX_PROTOCOL_MESSAGE)
    assert not buf, f"ends inside a message: {bytes(buf)!r}"
    return out


def types(data: bytes) -> str:
    return "".join(chr(t) for t, _ in messages(data))


def row_description(body: bytes) -> list[tuple[str, int, int]]:
    """(name, type OID, format) per column."""
    (n,) = struct.unpack_from("!H", body, 0)
    pos, out = 2, []
    for _ in range(n):
        end = body.index(b"\x00", pos)
        name = body[pos:end].decode()
        _table, _attnum, oid, _len, _mod, fmt = struct.unpack_from("!IhIhih", body, end + 1)
        out.append((name, oid, fmt))
        pos = end + 1 + 18
    return out


def result_rows(data: bytes) -> tuple[list[str], list[list]]:
    """Column names and rows (text values, None for NULL) of the first result set in *data*."""
    names, rows = [], []
    for msg_type, body in messages(data):
        if msg_type == p.ROW_DESCRIPTION and not names:
            names = [c[0] for c in row_description(body)]
        elif msg_type == p.DATA_ROW:
            rows.append([None if v is None else v.decode() for v in m.decode_data_row(body)])
        elif msg_type == p.COMMAND_COMPLETE and names:
            break
    return names, rows
