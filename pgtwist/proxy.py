"""The running proxy's shared state: clients, pools, cancel keys; what sessions ask of the service."""

from __future__ import annotations

import hmac
import itertools
import secrets
import struct

from twisted.logger import Logger

from pgtwist.backend import BackendFactory, CancelFactory
from pgtwist.pool import Pool
from pgtwist.server import ServerConnection
from pgtwist.server_login import ServerLogin
from pgtwist.session import ClientSession

log = Logger()


class Proxy:
    """Owned by the service; one per running pgtwist. *reactor* provides time and connections."""

    def __init__(self, config, reactor):
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        # Makes mock SCRAM salts for unknown users stable within a run but unguessable.
        self.mock_secret = secrets.token_bytes(32)
        self.clients: dict[str, ClientSession] = {}
        self.pools: dict[tuple, Pool] = {}
        self.cancel_keys: dict[int, ClientSession] = {}
        self.client_keys: dict[str, bytes] = {}
        self.pinned_sessions = 0
        self._client_ids = itertools.count(1)
        self._server_ids = itertools.count(1)

    # -- clients ---------------------------------------------------------------------------

    def new_client(self, transport) -> ClientSession:
        session = ClientSession(self, transport, f"c{next(self._client_ids)}")
        self.clients[session.id] = session
        return session

    def admit(self, session: ClientSession) -> bool:
        return len(self.clients) <= self.config.max_client_conn

    def client_closed(self, session: ClientSession) -> None:
        self.clients.pop(session.id, None)
        if self.cancel_keys.get(session.process_id) is session:
            del self.cancel_keys[session.process_id]

    def note_pinned(self, session: ClientSession, reason: str) -> None:
        """Transaction pooling gave up sharing a client's server connection: say so once, count it."""
        self.pinned_sessions += 1
        log.info("client {client} pinned to its server connection: {reason}", client=session.id, reason=reason)

    def maintain(self) -> None:
        """Janitor tick: pools close stale connections and keep warm ones."""
        for pool in self.pools.values():
            pool.maintain()

    def lookup_user(self, name: str):
        user = self.config.users.get(name)
        return user.credential if user is not None else None

    def remember_client_key(self, user: str, client_key: bytes) -> None:
        self.client_keys[user] = client_key

    # -- cancel keys -------------------------------------------------------------------------

    def register_cancel_key(self, session: ClientSession) -> tuple[int, bytes]:
        """Issue the BackendKeyData a client sees: ours, never a node's."""
        while True:
            pid = secrets.randbelow(0x7FFFFFFF) + 1
            if pid not in self.cancel_keys:
                break
        self.cancel_keys[pid] = session
        return pid, secrets.token_bytes(4)

    def cancel(self, process_id: int, secret_key: bytes) -> None:
        """A CancelRequest from a client: forward it to the server serving that client now, if any."""
        session = self.cancel_keys.get(process_id)
        if session is None or not hmac.compare_digest(session.secret_key, secret_key):
            return  # PostgreSQL ignores unknown keys silently, and so do we
        if session.server is not None:
            self.cancel_server(session.server)

    def cancel_server(self, server: ServerConnection) -> None:
        if server.backend_key is None:
            return
        pid, key = server.backend_key
        node = server.node
        self.reactor.connectTCP(node.host, node.port, CancelFactory(pid, key), timeout=self.config.server_connect_timeout)

    # -- pools and server connections ----------------------------------------------------------

    def pool_for(self, database, user: str) -> Pool:
        node = database.nodes[0]  # roles and routing arrive with cluster awareness
        key = (database.name, user, str(node))
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(
                key,
                node,
                database,
                user,
                database.pool_size,
                connect=self.connect_server,
                clock=self.clock,
                reset_query=self.config.server_reset_query,
                wait_timeout=self.config.query_wait_timeout,
                max_prepared_statements=self.config.max_prepared_statements,
                min_size=self.config.min_pool_size,
                idle_timeout=self.config.server_idle_timeout,
                lifetime=self.config.server_lifetime,
            )
        return pool

    def connect_server(self, pool: Pool):
        """Open and log in one server connection for *pool*; a Deferred firing with it."""
        user = self.config.users.get(pool.user)
        login = ServerLogin(
            pool.user,
            pool.database.dbname,
            user.credential if user is not None else None,
            client_key=self.client_keys.get(pool.user),
            node_name=str(pool.node),
        )
        conn = ServerConnection(f"s{next(self._server_ids)}", pool, login)
        ready = conn.ready
        timeout = self.config.server_connect_timeout
        connector = self.reactor.connectTCP(pool.node.host, pool.node.port, BackendFactory(conn), timeout=timeout or 30)
        if timeout:
            timer = self.clock.callLater(timeout, self._login_timed_out, conn, connector)

            def stop_timer(result):
                if timer.active():
                    timer.cancel()
                return result

            ready.addBoth(stop_timer)
        return ready

    def _login_timed_out(self, conn: ServerConnection, connector) -> None:
        conn.login_timed_out()
        connector.disconnect()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close_all()
