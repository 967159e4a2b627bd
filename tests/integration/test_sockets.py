"""Sockets as an operator sets them up: a Unix socket beside TCP, several listen addresses, nodes over Unix sockets and by name."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from tests.harness.proxy import DATABASE, RawClient, psql, start_proxy

pytestmark = pytest.mark.integration

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def free_v6_port() -> int:
    """A port below 32768 free on ::1 (free_port speaks IPv4)."""
    for _ in range(200):
        port = random.randint(20000, 32767)
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            try:
                s.bind(("::1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port on ::1")


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_unix_socket_beside_tcp(pg_cluster, tmp_path):
    """psql -h DIR and psycopg host=DIR reach pgtwist at DIR/.s.PGSQL.<port>, as they reach PostgreSQL."""
    sockets = tmp_path / "sock"
    sockets.mkdir()
    with start_proxy(pg_cluster, tmp_path, unix_socket_dir=str(sockets), unix_socket_mode="0770") as px:
        path = sockets / f".s.PGSQL.{px.port}"
        assert path.is_socket()
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o770)
        with px.connect(host=str(sockets)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.pgconn.host.decode() == str(sockets)
        out = psql(px, "SELECT current_user", host=str(sockets))
        assert out.stdout.strip() == pg_cluster.app_user
        # As on PostgreSQL, an SSLRequest on the Unix socket is answered N.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(SSL_REQUEST)
            assert s.recv(1) == b"N"
        # TCP still works beside it; the log names both.
        with px.connect() as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
        assert str(path) in px.log_text()
        assert "connected from the Unix socket" in px.log_text()
    assert not path.exists()  # removed when pgtwist stops


@pytest.mark.skipif(not ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_several_listen_addresses_ipv4_and_ipv6(pg_cluster, tmp_path):
    v6_port = free_v6_port()
    with start_proxy(pg_cluster, tmp_path, also_listen=[f"[::1]:{v6_port}"]) as px:
        with px.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with px.connect(host="::1", port=v6_port) as conn:
            assert conn.execute("SELECT inet_client_addr() IS NOT NULL").fetchone() == (True,)
        assert f"[::1]:{v6_port}" in px.log_text()


def test_node_over_its_unix_socket(pg_cluster, tmp_path):
    """A node given as DIR:PORT is reached at DIR/.s.PGSQL.PORT, as libpq's host=DIR would."""
    node = pg_cluster.nodes[0]
    sockets = pg_cluster.base / "sock"
    assert (sockets / f".s.PGSQL.{node.port}").is_socket()
    databases = {DATABASE: {"dbname": pg_cluster.app_database, "nodes": [f"{sockets}:{node.port}"]}}
    with start_proxy(pg_cluster, tmp_path, databases=databases, pool_mode="transaction") as px:
        with px.connect() as conn:
            # inet_server_addr() is NULL on a Unix-socket connection: the node was reached over it.
            assert conn.execute("SELECT inet_server_addr() IS NULL, current_user").fetchone() == (True, pg_cluster.app_user)


def test_node_by_host_name(pg_cluster, tmp_path):
    """A node named "localhost:PORT" is resolved (IPv4 first: the node listens on 127.0.0.1 only) and served."""
    node = pg_cluster.nodes[0]
    databases = {DATABASE: {"dbname": pg_cluster.app_database, "nodes": [f"localhost:{node.port}"]}}
    with start_proxy(pg_cluster, tmp_path, databases=databases, dns_max_ttl=0.5) as px:
        for _ in range(3):
            with px.connect() as conn:
                assert conn.execute("SELECT host(inet_server_addr())").fetchone() == ("127.0.0.1",)


class CountingForwarder:
    """A TCP forwarder from *listen* to the node, counting the connections that reach it (threads; test-only)."""

    def __init__(self, family: int, listen: tuple, target: tuple):
        self.target = target
        self.accepted = 0
        self.server = socket.socket(family, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(listen)
        self.server.listen(16)
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed (shutdown wakes the accept)
            self.accepted += 1
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()  # (pgtwist then sees the node refuse, and the test fails saying so)
                continue
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # (close alone leaves a thread blocked in accept)
        except OSError:
            pass
        self.server.close()
        self.thread.join(5)
        for s in self.sockets:
            s.close()


HOSTS_PREFIX = ("unshare", "-m", "--", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"')


def private_hosts_file(tmp_path) -> bool:
    """Does getaddrinfo in a process of our own read an /etc/hosts of ours? (A mount namespace:
    root and unshare; and names looked up in files, not by a daemon such as nscd or sssd.)"""
    if shutil.which("unshare") is None or shutil.which("getent") is None:
        return False
    hosts = tmp_path / "probe-hosts"
    hosts.write_text("127.0.0.9 probe.pgtwist.test\n")
    try:
        probe = subprocess.run(
            [*HOSTS_PREFIX, str(hosts), "getent", "ahostsv4", "probe.pgtwist.test"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0 and "127.0.0.9" in probe.stdout


def test_node_moved_by_dns_is_found_again_after_dns_max_ttl(pg_cluster, tmp_path):
    """A node's name is resolved again once dns_max_ttl has passed: new server connections follow the
    name from 127.0.0.1 to 127.0.0.2 and then to ::1 (IPv6), while a connection already open stays.

    The answers come from getaddrinfo reading an /etc/hosts that only pgtwist's process sees (its own
    mount namespace, the file bind-mounted over /etc/hosts), rewritten in place by the test. The
    node listens on 127.0.0.1; counting forwarders on 127.0.0.2 and [::1] lead to it.
    """
    if not private_hosts_file(tmp_path):
        pytest.skip("no private /etc/hosts here (needs root, unshare, and host names looked up in files)")
    node = pg_cluster.nodes[0]
    name = "pgnode.pgtwist.test"
    hosts = tmp_path / "hosts"

    def point(address: str) -> None:
        with open(hosts, "r+") as f:  # in place: the bind mount holds this inode
            f.truncate(0)
            f.write(f"127.0.0.1 localhost\n{address} {name}\n")

    hosts.write_text("")
    point("127.0.0.1")
    v4 = CountingForwarder(socket.AF_INET, ("127.0.0.2", node.port), ("127.0.0.1", node.port))
    v6 = CountingForwarder(socket.AF_INET6, ("::1", node.port), ("127.0.0.1", node.port)) if ipv6_loopback() else None
    prefix = (*HOSTS_PREFIX, str(hosts))
    databases = {DATABASE: {"dbname": pg_cluster.app_database, "nodes": [f"{name}:{node.port}"]}}
    held = []
    try:
        with start_proxy(pg_cluster, tmp_path, databases=databases, dns_max_ttl=0.5, command_prefix=prefix) as px:

            def new_session():
                # Session pooling, each earlier client still connected: this one needs a new server connection.
                conn = px.connect()
                held.append(conn)
                return conn.execute("SELECT 1").fetchone()

            assert new_session() == (1,)
            assert v4.accepted == 0
            point("127.0.0.2")
            time.sleep(1.0)  # past dns_max_ttl
            assert new_session() == (1,)
            assert v4.accepted == 1
            assert held[0].execute("SELECT 2").fetchone() == (2,)  # the first client's connection stays
            if v6 is not None:
                point("::1")
                time.sleep(1.0)
                assert new_session() == (1,)
                assert (v4.accepted, v6.accepted) == (1, 1)
            for conn in held:
                conn.close()
    finally:
        for conn in held:
            conn.close()
        v4.close()
        if v6 is not None:
            v6.close()


def test_listen_mistakes_are_config_errors(pg_cluster, tmp_path):
    from pgtwist import config as configmod

    base = {"auth_type": "trust", "databases": {"d": {"nodes": ["h:1"]}}}
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict({**base, "listen": ["127.0.0.1:6432", "127.0.0.1:6432"], "unix_socket_dir": "relative"})
    text = str(e.value)
    assert "listen[1]" in text and "listed twice" in text and "unix_socket_dir" in text


def test_deferred_accept_serves_late_first_bytes_and_leaves_silent_sockets_to_the_kernel(pg_cluster, tmp_path):
    """tcp_defer_accept (on by default, as PgBouncer's on Linux): a connection reaches pgtwist with
    its first bytes, however late they come; one that sends nothing costs pgtwist nothing; one that
    began a startup packet and stopped is dropped at client_login_timeout as before."""
    import time

    from pgtwist.wire import protocol as p

    with start_proxy(pg_cluster, tmp_path, client_login_timeout=1) as px:
        silent = [socket.create_connection((px.host, px.port), timeout=10) for _ in range(50)]
        try:
            with RawClient(px.host, px.port) as late:
                # Connected, then quiet past client_login_timeout and a janitor tick: the kernel
                # holds it and pgtwist has not seen it (accepted at once, it would be closed now).
                time.sleep(2.5)
                with px.connect() as conn:  # others are served meanwhile
                    assert conn.execute("SELECT 1").fetchone()[0] == 1
                late.startup(px.user, "appdb")
                msg_type, _ = late.read_message()
                assert msg_type == p.AUTHENTICATION
            with RawClient(px.host, px.port) as begun:
                begun.send(b"\x00\x00")  # half a length word: accepted, then never finished
                assert begun.wait_closed(10) == b""  # silently, as PostgreSQL
            # The 50 silent sockets never reached pgtwist (log_connections: one line per client).
            assert px.log_text().count(" connected from ") < 10, px.log_text()
        finally:
            for s in silent:
                s.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read a live socket's timers")
def test_clients_get_tcp_keepalive_as_pgbouncer_gives_them(pg_cluster, tmp_path):
    """tcp_keepalive / tcp_keepidle apply to client connections too (as in PgBouncer): a client
    whose host vanished is noticed by the kernel instead of holding its slot for good."""
    with start_proxy(pg_cluster, tmp_path, tcp_keepidle=33) as px:
        with px.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            # pgtwist's end of the client's connection runs a keepalive timer of up to 33 s (ss
            # shows it once no retransmission or delayed ACK timer is due: idle a moment first).
            out, timers = keepalive_timers(f"( sport = :{px.port} )")
            assert timers and all(unit != "min" and int(n) <= 33 for n, unit in timers), out


def keepalive_timers(ss_filter: str, mine=lambda line: True) -> tuple[list[str], list[tuple[str, str]]]:
    """The established sockets ss selects with *ss_filter* (and *mine*), and their keepalive
    timers as (number, unit): ss shows one once no retransmission or delayed ACK timer is due,
    so it is asked again for up to 10 s."""
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run(
            ["ss", "-tnopH", "state", "established", ss_filter], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        lines = [line for line in out.splitlines() if mine(line)]
        timers = re.findall(r"timer:\(keepalive,(\d+)(?:\.\d+)?(ms|sec|min)", "\n".join(lines))
        if timers or time.monotonic() > deadline:
            return lines, timers
        time.sleep(0.2)


def test_server_connections_get_tcp_keepalive(pg_cluster, tmp_path):
    """tcp_keepalive / tcp_keepidle on pgtwist's connections to the node: a node whose host
    vanished (no FIN, no RST) is noticed by the kernel instead of holding a pooled connection."""
    node_port = pg_cluster.nodes[0].port
    with start_proxy(pg_cluster, tmp_path, tcp_keepidle=37) as px:
        with px.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            pid = str(px.process.pid)
            ours, timers = keepalive_timers(f"( dport = :{node_port} )", lambda line: f"pid={pid}," in line)
            assert ours, "no connection of pgtwist's to the node"
            assert timers and all(unit != "min" and int(n) <= 37 for n, unit in timers), ours
