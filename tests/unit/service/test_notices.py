"""Notices between workers (workers = N): DDL's hold on replica reads and its position, a schema
change, databases to free; real unix datagram sockets in a temporary directory, MemoryReactorClock."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.testing import MemoryReactorClock

from pgtwist import config as configmod
from pgtwist.service import notices, workers
from pgtwist.service.proxy import Proxy
from pgtwist.session.lease import Lease

from tests.harness.admin_support import BASE

CLUSTERED = {"appdb": {"dbname": "postgres", "nodes": ["db1:5432", "db2:5432"]}}


def link(tmp_path, index=0, count=3, reactor=None):
    return workers.WorkerLink(workers.WorkerSpec(index, count, 3, str(tmp_path)), reactor or MemoryReactorClock())


def listening(spec, index):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(spec.notice_socket(index))
    s.setblocking(False)
    return s


def drain(s) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(s.recv(4096))
        except BlockingIOError:
            return out


class Told:
    """A proxy's side of what a Receiver calls, recorded."""

    def __init__(self):
        self.calls = []

    def schema_changed_elsewhere(self, name):
        self.calls.append(("committed", name))

    def free_databases(self, names, client, node, tell_others=True):
        self.calls.append(("free", node, names, tell_others))


def test_every_notice_reaches_every_other_worker_at_once_in_order(tmp_path):
    # Sent in the DDL's own reactor turn (no connection to set up first), so they are queued on
    # the other workers before the DDL's client can have read its answer.
    sender = link(tmp_path)
    receivers = [listening(sender.spec, i) for i in (1, 2)]
    token = sender.ddl_hold("appdb")
    sender.ddl_hold_again("appdb", token)
    sender.ddl_settle("appdb", token, 0x3001DA8)
    sender.schema_changed("appdb")
    sender.free(("scratch", "other"), "127.0.0.1:5432")
    for s in receivers:
        seen = []

        class Waits:
            def hold(self, token, name):
                seen.append(("hold", token, name))

            def settle(self, token, position, name):
                seen.append(("settle", token, position, name))

        told = Told()
        r = notices.Receiver(told)
        r.waits = Waits()
        for data in drain(s):
            r.datagramReceived(data, None)
        assert seen == [("hold", token, "appdb"), ("hold", token, "appdb"), ("settle", token, 0x3001DA8, "appdb")]
        assert told.calls == [("committed", "appdb"), ("free", "127.0.0.1:5432", ("scratch", "other"), False)]
        s.close()


def test_tokens_differ_between_processes_and_are_never_zero(tmp_path):
    # A restarted worker must not reuse a token another worker still holds for its predecessor.
    a, b = link(tmp_path).notices, link(tmp_path).notices
    tokens = {a.token() for _ in range(100)} | {b.token() for _ in range(100)}
    assert len(tokens) == 200 and 0 not in tokens


def test_a_notice_to_a_worker_not_listening_is_let_go(tmp_path):
    sender = link(tmp_path, count=2)
    sender.ddl_settle("appdb", sender.ddl_hold("appdb"), 5)  # (no socket there: a worker being restarted)
    assert sender.notices._queued == {}


def test_notices_a_busy_worker_cannot_take_yet_wait_and_go_in_order(tmp_path):
    # The kernel queues few datagrams per socket (net.unix.max_dgram_qlen): dropped, a hold or a
    # position would be lost while the other worker was busy for a moment.
    reactor = MemoryReactorClock()
    sender = link(tmp_path, count=2, reactor=reactor)
    s = listening(sender.spec, 1)
    names = [f"db{i}" for i in range(300)]
    for name in names:
        sender.schema_changed(name)
    got = drain(s)
    assert 0 < len(got) < 300 and sender.notices._queued  # (the rest waits)
    for _ in range(100):
        reactor.advance(notices.RETRY)
        got += drain(s)
    assert [d[notices._HEAD.size :].decode() for d in got] == names
    assert sender.notices._queued == {} and sender.notices.dropped == 0
    s.close()


def test_short_or_unknown_datagrams_are_dropped():
    r = notices.Receiver(Told())
    r.datagramReceived(b"\x01\x00", None)
    r.datagramReceived(b"\x09" + b"\x00" * 16 + b"appdb", None)
    r.datagramReceived(notices._HEAD.pack(notices.FREE, 0, 0) + b"nodeonly", None)
    assert r.proxy.calls == [] and r.waits.held == {}


def clustered_worker(index: int = 1):
    reactor = MemoryReactorClock()
    proxy = Proxy(configmod.from_dict({**BASE, "databases": CLUSTERED, "read_your_writes": True}), reactor)
    proxy.worker = workers.WorkerLink(workers.WorkerSpec(index, 2, 3, "/nonexistent"), reactor)
    return proxy, reactor, notices.Receiver(proxy)


def test_another_workers_ddl_holds_replica_reads_here_until_its_position_comes():
    proxy, reactor, r = clustered_worker()
    r.waits.hold(7, "appdb")
    router = proxy.routers["appdb"]
    assert router.ddl_pending == 1
    r.waits.settle(7, 0x5000, "appdb")
    assert router.ddl_pending == 0 and router.schema_lsn == 0x5000 and r.waits.held == {}


def test_a_hold_renewed_lasts_as_long_as_its_ddl_and_one_not_renewed_ends():
    # A migration's transaction may run for minutes; a worker that died renews nothing.
    proxy, reactor, r = clustered_worker()
    r.waits.hold(7, "appdb")
    router = proxy.routers["appdb"]
    for _ in range(10):
        reactor.advance(r.waits.HOLD_FOR - 1)
        r.waits.hold(7, "appdb")  # (renewed each janitor tick by its sender)
    assert router.ddl_pending == 1
    reactor.advance(r.waits.HOLD_FOR + 0.1)
    assert router.ddl_pending == 0 and router.schema_lsn == 0 and r.waits.held == {}


def test_another_workers_ddl_position_read_before_a_promotion_here_is_cut_to_the_new_timeline():
    proxy, _, r = clustered_worker()
    r.waits.hold(7, "appdb")
    router = proxy.routers["appdb"]
    router.new_primary(0x7000)  # (this worker's monitor saw the promotion first)
    r.waits.settle(7, 0x9000, "appdb")
    assert router.ddl_pending == 0 and router.schema_lsn == 0x7000


def test_a_position_that_comes_before_its_hold_is_applied_and_the_hold_skipped():
    proxy, _, r = clustered_worker()
    r.waits.settle(7, 0x5000, "appdb")
    r.waits.hold(7, "appdb")
    router = proxy.routers["appdb"]
    assert router.ddl_pending == 0 and router.schema_lsn == 0x5000


def test_a_notice_of_a_database_not_configured_here_is_ignored():
    proxy, _, r = clustered_worker()
    r.waits.hold(7, "gone")
    r.waits.settle(8, 5, "gone")
    proxy.schema_changed_elsewhere("gone")
    assert "gone" not in proxy.routers and r.waits.held == {}


def test_another_workers_committed_ddl_makes_this_workers_shared_statements_stale():
    proxy, _, r = clustered_worker()
    schema = proxy.schema_for(proxy.config.databases["appdb"])
    before = schema.ddl_at
    r.datagramReceived(notices._HEAD.pack(notices.COMMITTED, 0, 0) + b"appdb", None)
    assert schema.ddl_at > before


# -- the sending worker's router ------------------------------------------------------------------


class Link:
    def __init__(self):
        self.told = []
        self.schema = []
        self.next = 41

    def ddl_hold(self, name):
        self.next += 1
        self.told.append(("hold", name, self.next))
        return self.next

    def ddl_hold_again(self, name, token):
        self.told.append(("again", name, token))

    def ddl_settle(self, name, token, position):
        self.told.append(("settle", name, token, position))

    def schema_changed(self, name):
        self.schema.append(name)


class Session:
    state = "linked"

    def __init__(self):
        self.lease = Lease()


def sending_router():
    proxy, reactor, _ = clustered_worker(0)
    router = proxy.router_for(proxy.config.databases["appdb"])
    assert router.elsewhere is proxy.worker
    router.elsewhere = Link()
    return proxy, router


def test_ddl_sent_is_told_at_once_renewed_while_it_lasts_and_settled_by_its_read_back():
    proxy, router = sending_router()
    session = Session()
    token = router.ddl_sent(session, session.lease)
    assert router.elsewhere.told == [("hold", "appdb", 42)]
    proxy.maintain()  # (the janitor: its transaction goes on)
    assert router.elsewhere.told[-1] == ("again", "appdb", 42)
    settle = router.ddl_reading_back(token=token)
    session.lease = Lease()  # (the connection went back: the read-back's wait is its own now)
    proxy.maintain()
    assert router.elsewhere.told[-1] == ("again", "appdb", 42)
    settle(0x9000)
    settle(0xA000)  # (only the first settles)
    assert router.elsewhere.told[-1] == ("settle", "appdb", 42, 0x9000) and router.told == {}
    router.ddl_reading_back()(0xB000)  # (none told of: a wait of its own)
    assert router.elsewhere.told[-2:] == [("hold", "appdb", 43), ("settle", "appdb", 43, 0xB000)]


@pytest.mark.parametrize("how", ["closed", "lost", "idle", "lent"])
def test_a_told_wait_no_read_back_will_settle_ends(how):
    # The client gone, its server connection lost mid-transaction (a new lease), or (a backstop:
    # a session hands its wait over in the turn its transaction ends) between transactions.
    proxy, router = sending_router()
    session = Session()
    router.ddl_sent(session, session.lease)
    if how in ("closed", "idle"):
        session.state = how
    elif how == "lost":
        session.lease = Lease()
    else:
        session.lease.lent = True
    proxy.maintain()
    assert router.elsewhere.told[-1] == ("settle", "appdb", 42, None) and router.told == {}


def test_ddl_by_probe_without_a_primary_ends_its_told_wait():
    proxy, router = sending_router()
    session = Session()
    token = router.ddl_sent(session, session.lease)
    router.ddl_by_probe(token)  # (no primary known: nothing to probe)
    assert router.elsewhere.told[-1] == ("settle", "appdb", 42, None)


def test_a_read_back_after_another_claimed_the_wait_tells_its_own():
    # A pinned session's second migration while the first one's probes still run.
    proxy, router = sending_router()
    session = Session()
    token = router.ddl_sent(session, session.lease)
    first = router.ddl_reading_back(token=token)
    second = router.ddl_reading_back(token=token)
    first(0x3000)
    second(0x4000)
    assert router.elsewhere.told[-3:] == [("hold", "appdb", 43), ("settle", "appdb", 42, 0x3000), ("settle", "appdb", 43, 0x4000)]


def test_a_settle_after_a_reload_rebuilt_the_router_bounds_the_new_one():
    proxy, _, r = clustered_worker()
    r.waits.hold(7, "appdb")
    old = proxy.routers.pop("appdb")
    r.waits.settle(7, 0x5000, "appdb")
    assert old.ddl_pending == 0 and proxy.routers["appdb"].schema_lsn == 0x5000
