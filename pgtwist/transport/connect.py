"""Reaching a node and being reached: node addresses over TCP (IPv4, IPv6, names re-resolved) or Unix sockets, and the listeners."""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import UNIXAddress
from twisted.python.failure import Failure

from pgtwist.transport.accept import listen_tcp

SOCKET_NAME = ".s.PGSQL.{port}"  # what libpq looks for in a directory given as host


def is_unix_host(host: str) -> bool:
    """A node "host" that is a directory holds PostgreSQL's Unix socket, as in libpq (host=/var/run/postgresql)."""
    return host.startswith("/")


def socket_path(directory: str, port: int) -> str:
    return os.path.join(directory, SOCKET_NAME.format(port=port))


def is_local_peer(transport) -> bool:
    """A client on a Unix socket: PostgreSQL answers its SSLRequest with N, and so do we."""
    try:
        return isinstance(transport.getPeer(), UNIXAddress)
    except Exception:  # noqa: BLE001 - a transport that cannot say is not local
        return False


class NodeDialer:
    """Opens connections to nodes: a Unix socket, an IP literal, or a host name resolved again after *ttl* seconds.

    Twisted's connectTCP resolves a name itself, on every attempt, but to IPv4 only. Once
    started (the Service starts it), the dialer resolves names with getaddrinfo (IPv4 and
    IPv6, in the reactor's resolver threads) and keeps each answer *ttl* seconds
    (PgBouncer's dns_max_ttl), so a node moved by DNS (a Kubernetes Service, a failover
    record) is found again without a restart. ttl = 0 resolves on every connection.
    Until started (a Proxy used on its own, as unit tests do), names go to connectTCP as
    they are.
    """

    def __init__(self, reactor, ttl=lambda: 15.0):
        self.reactor = reactor
        self.ttl = ttl  # a callable: the running config's dns_max_ttl, reloadable
        self.started = False
        self._cache: dict[str, tuple[float, str]] = {}  # name -> (expires, address)

    def start(self) -> None:
        self.started = True

    def connect(self, host: str, port: int, factory, timeout: float):
        """Like reactor.connectTCP; returns something with disconnect() and stopConnecting()."""
        if is_unix_host(host):
            return self.reactor.connectUNIX(socket_path(host, port), factory, timeout=timeout)
        if not self.started or isIPAddress(host) or isIPv6Address(host):
            return self.reactor.connectTCP(host, port, factory, timeout=timeout)
        cached = self._cache.get(host)
        if cached is not None and cached[0] > self.reactor.seconds():
            return self.reactor.connectTCP(cached[1], port, factory, timeout=timeout)
        pending = _Resolving(self, host, port, factory, timeout)
        pending.start()
        return pending

    def resolve(self, host: str) -> defer.Deferred:
        """An address of *host* (its first IPv4 one, else its first IPv6 one), cached."""
        d = defer.Deferred()
        receiver = _FirstAddress(d, host)
        self.reactor.nameResolver.resolveHostName(receiver, host, 0, addressTypes=None, transportSemantics="TCP")

        def remember(address: str) -> str:
            ttl = self.ttl()
            if ttl > 0:
                self._cache[host] = (self.reactor.seconds() + ttl, address)
            return address

        return d.addCallback(remember)


class _FirstAddress:
    """IResolutionReceiver keeping the first address of a resolution."""

    def __init__(self, d: defer.Deferred, host: str):
        self.d = d
        self.host = host
        self.address: str | None = None

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        # IPv4 first, as Twisted's own resolution (and so pgtwist before) did: "localhost" then
        # still reaches a node listening on 127.0.0.1 only. A name with only IPv6 gets IPv6.
        if self.address is None or (":" in self.address and ":" not in address.host):
            self.address = address.host

    def resolutionComplete(self) -> None:
        if self.address is None:
            self.d.errback(error.DNSLookupError(f"could not resolve {self.host}"))
        else:
            self.d.callback(self.address)


class _Resolving:
    """A connection attempt waiting for its name: a connector until the real one exists."""

    def __init__(self, dialer: NodeDialer, host: str, port: int, factory, timeout: float):
        self.dialer = dialer
        self.host = host
        self.port = port
        self.factory = factory
        self.timeout = timeout
        self.connector = None
        self.stopped = False

    def start(self) -> None:
        self.dialer.resolve(self.host).addCallbacks(self._resolved, self._failed)

    def _resolved(self, address: str) -> None:
        if not self.stopped:
            self.connector = self.dialer.reactor.connectTCP(address, self.port, self.factory, timeout=self.timeout)

    def _failed(self, failure: Failure) -> None:
        if not self.stopped:
            self.stopped = True
            self.factory.clientConnectionFailed(self, failure)

    def stopConnecting(self) -> None:
        if self.connector is not None:
            self.connector.stopConnecting()
        elif not self.stopped:
            self.stopped = True
            self.factory.clientConnectionFailed(self, Failure(error.UserError(string="connection attempt stopped")))

    def disconnect(self) -> None:
        if self.connector is not None:
            self.connector.disconnect()
        else:
            self.stopConnecting()


def all_interfaces() -> str:
    """What "*" listens on: IPv6's any address when this host has IPv6 (Linux then takes IPv4 too), else IPv4's."""
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
                s.bind(("::", 0))
            return "::"
        except OSError:
            pass
    return "0.0.0.0"


def listen(reactor, factory, addresses, unix_socket_dir: str = "", unix_socket_mode: int = 0o777, defer_accept: bool = False) -> list:
    """Open every listener; returned as each TCP address, then the Unix socket (named for the first address's port).

    The Unix socket opens first: whoever waits for the TCP port (a probe, a test, a script
    running psql -h DIR next) then finds the socket there too.
    """
    ports = []
    unix = []
    try:
        if unix_socket_dir:
            path = socket_path(unix_socket_dir, addresses[0].port)
            # wantPID leaves a lock file beside the socket and removes a stale socket a dead
            # process left (PostgreSQL does the same with .s.PGSQL.PORT.lock).
            unix.append(reactor.listenUNIX(path, factory, backlog=4096, mode=unix_socket_mode, wantPID=True))
        for address in addresses:
            host = all_interfaces() if address.host == "*" else address.host
            ports.append(listen_tcp(reactor, address.port, factory, backlog=4096, interface=host, defer_accept=defer_accept))
    except Exception:
        for port in ports + unix:
            port.stopListening()
        raise
    return ports + unix
