"""auth_query's lookup on its own pool (the real Proxy on StringTransports and a MemoryReactorClock):
logins of one unknown name share one lookup, and a node that never answers it ends it in time.

(Connecting and logging in as auth_user is bounded by server_connect_timeout in Proxy.connect_server,
as for every server connection; this harness plays the node's login itself.)"""

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from pgtwist.pooling.pool import PoolSettings
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate

from tests.harness.session import Harness, messages

USERS = {"app": {"password": "pw"}, "pgtwist_auth": {"password": "auth secret"}}


def lookup_harness(**extra):
    return Harness(auth_type="md5", auth_user="pgtwist_auth", users=USERS, **extra)


def fatal_code(transport) -> str | None:
    for t, body in messages(transport.value()):
        if t == p.ERROR_RESPONSE:
            return m.decode_fields(body)["C"]
    return None


def lookups_sent(server) -> int:
    return sum(1 for t, _ in messages(server.transport.value()) if t == p.PARSE)


def test_logins_of_one_unknown_name_share_one_lookup():
    h = lookup_harness()
    (s1, t1), (s2, t2) = h.client(user="bob"), h.client(user="bob")
    (server,) = h.proxy.servers  # one auth_user connection ...
    assert lookups_sent(server) == 1  # ... asked once for both
    assert s1.state == s2.state == "login" and t1.value() == t2.value() == b""


def test_a_node_that_never_answers_the_lookup_fails_the_logins_with_08006_and_caches_nothing():
    h = lookup_harness(server_connect_timeout=5, query_timeout=0)
    (_, t1), (_, t2) = h.client(user="bob"), h.client(user="bob")
    (server,) = h.proxy.servers
    h.clock.advance(4.9)
    assert not server.transport.disconnecting and fatal_code(t1) is None
    h.clock.advance(0.1)  # server_connect_timeout, query_timeout being 0
    assert server.transport.disconnecting  # aborted
    server.connection_lost(Failure(ConnectionLost()))  # (what the reactor reports next)
    assert fatal_code(t1) == fatal_code(t2) == sqlstate.CONNECTION_FAILURE
    assert len(h.proxy.auth_cache) == 0 and "bob" not in h.proxy.fetched_credentials
    assert not h.proxy._lookups  # the next login asks again, on a new connection
    s3, t3 = h.client(user="bob")
    assert len(h.proxy.servers) == 2 and lookups_sent(h.proxy.servers[1]) == 1


def test_query_timeout_bounds_the_lookup_when_set():
    h = lookup_harness(server_connect_timeout=5, query_timeout=20)
    s1, t1 = h.client(user="bob")
    (server,) = h.proxy.servers
    h.clock.advance(19.9)
    assert not server.transport.disconnecting
    h.clock.advance(0.1)
    assert server.transport.disconnecting



def test_auth_querys_pool_has_no_reserve_and_its_53300_names_none():
    # reserve_pool_size is for clients that waited; auth_user's own pool is under the shared
    # limits but never takes the reserve, nor mentions it when a lookup waits in vain.
    dbs = {"appdb": {"dbname": "postgres", "nodes": ["db1:5432"], "pool_size": 2, "reserve_pool_size": 3}}
    h = lookup_harness(databases=dbs)
    h.client(user="bob")
    (auth_pool,) = h.proxy.auth_pools.values()
    assert auth_pool.settings.reserve == 0
    assert "reserve_pool_size" not in h.proxy.limits.describe(auth_pool)
    assert PoolSettings.from_config(h.proxy.config, auth_pool.database).reserve == 3  # (the clients' pools)
