"""transport.connect: how nodes are dialled (Unix socket, IP literal, names re-resolved with a TTL) and listeners opened."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport

from pgtwist.config import Address
from pgtwist.transport import connect


class Resolver:
    """An IHostnameResolver answering from a table, counting lookups."""

    def __init__(self, table):
        self.table = table
        self.lookups = []

    def resolveHostName(self, receiver, host, port=0, addressTypes=None, transportSemantics="TCP"):
        self.lookups.append(host)
        receiver.resolutionBegan(None)
        for address in self.table.get(host, ()):
            receiver.addressResolved(IPv6Address("TCP", address, port) if ":" in address else IPv4Address("TCP", address, port))
        receiver.resolutionComplete()


class Factory(ClientFactory):
    def __init__(self):
        self.failures = []

    def clientConnectionFailed(self, connector, reason):
        self.failures.append(reason)


def dialer(table, ttl=15.0):
    reactor = MemoryReactorClock()
    reactor.nameResolver = Resolver(table)
    d = connect.NodeDialer(reactor, lambda: ttl)
    d.start()
    return reactor, d


def test_a_directory_host_is_the_nodes_unix_socket():
    reactor, d = dialer({})
    d.connect("/var/run/postgresql", 5433, Factory(), timeout=5)
    assert reactor.unixClients[0][0] == "/var/run/postgresql/.s.PGSQL.5433"
    assert reactor.tcpClients == []


def test_ip_literals_are_dialled_as_they_are():
    reactor, d = dialer({})
    d.connect("10.0.0.1", 5432, Factory(), timeout=5)
    d.connect("::1", 5432, Factory(), timeout=5)
    assert [(c[0], c[1]) for c in reactor.tcpClients] == [("10.0.0.1", 5432), ("::1", 5432)]
    assert reactor.nameResolver.lookups == []


def test_names_resolve_ipv4_first_and_are_kept_for_the_ttl():
    reactor, d = dialer({"db": ["2001:db8::1", "10.0.0.7"], "v6only": ["2001:db8::2"]}, ttl=15.0)
    d.connect("db", 5432, Factory(), timeout=5)
    d.connect("v6only", 5432, Factory(), timeout=5)
    assert [c[0] for c in reactor.tcpClients] == ["10.0.0.7", "2001:db8::2"]
    d.connect("db", 5432, Factory(), timeout=5)
    assert reactor.nameResolver.lookups == ["db", "v6only"]  # the answer was kept
    reactor.advance(15.0)
    reactor.nameResolver.table["db"] = ["10.0.0.8"]  # the node moved
    d.connect("db", 5432, Factory(), timeout=5)
    assert reactor.tcpClients[-1][0] == "10.0.0.8"


def test_ttl_zero_resolves_every_time():
    reactor, d = dialer({"db": ["10.0.0.7"]}, ttl=0.0)
    for _ in range(3):
        d.connect("db", 5432, Factory(), timeout=5)
    assert reactor.nameResolver.lookups == ["db"] * 3


def test_a_name_that_does_not_resolve_fails_the_attempt():
    reactor, d = dialer({})
    factory = Factory()
    d.connect("nosuch", 5432, factory, timeout=5)
    assert reactor.tcpClients == []
    assert "could not resolve nosuch" in factory.failures[0].getErrorMessage()


def test_until_started_names_go_to_twisted_as_they_are():
    reactor = MemoryReactorClock()
    d = connect.NodeDialer(reactor)
    d.connect("db1", 5432, Factory(), timeout=5)
    assert reactor.tcpClients[0][0] == "db1"


def test_local_peer():
    unix, tcp = StringTransport(), StringTransport()
    unix.getPeer = lambda: UNIXAddress(None)
    assert connect.is_local_peer(unix)
    assert not connect.is_local_peer(tcp)


def test_listen_opens_every_address_then_the_unix_socket(tmp_path):
    reactor = MemoryReactorClock()
    opened = []
    listen_tcp, listen_unix = reactor.listenTCP, reactor.listenUNIX

    def tcp(*a, **kw):
        opened.append(("tcp", listen_tcp(*a, **kw)))
        return opened[-1][1]

    def unix(*a, **kw):
        opened.append(("unix", listen_unix(*a, **kw)))
        return opened[-1][1]

    reactor.listenTCP, reactor.listenUNIX = tcp, unix
    ports = connect.listen(reactor, object(), (Address("127.0.0.1", 6432), Address("::1", 6432)), str(tmp_path), 0o770)
    assert len(ports) == 3
    # The Unix socket is there before anything listens on TCP (which is what callers wait for),
    # and comes last among the listeners returned, the first TCP one being the main port.
    assert [kind for kind, _ in opened] == ["unix", "tcp", "tcp"]
    assert ports == [opened[1][1], opened[2][1], opened[0][1]]
    assert [(s[0], s[3]) for s in reactor.tcpServers] == [(6432, "127.0.0.1"), (6432, "::1")]
    path, _, _, mode, _ = reactor.unixServers[0][:5]
    assert path == f"{tmp_path}/.s.PGSQL.6432" and mode == 0o770
