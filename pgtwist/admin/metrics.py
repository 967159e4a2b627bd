"""[metrics]: Prometheus exposition at /metrics (pgbalance_*), liveness at /healthz, readiness at /readyz.

Nothing here runs on the forwarding path: a collector reads the proxy's state and its
Counters when Prometheus scrapes, and each service instance has its own registry.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from twisted.application import internet
from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.web import resource, server

from pgtwist import __version__
from pgtwist.admin import inspect

log = Logger()

PROBE_TIMEOUT = 2.0  # /readyz: how long an unmonitored node gets to accept a TCP connection


class ProxyCollector:
    """Builds every pgbalance_* family from the service's state at scrape time."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        proxy = self.service.proxy
        counters = proxy.counters
        yield from self._clients(proxy, counters)
        yield from self._servers_and_pools(proxy, counters)
        yield from self._traffic(counters)
        yield from self._cluster(proxy, counters)
        yield from self._process(proxy, counters)

    def _clients(self, proxy, counters):
        by_state: dict[tuple, int] = {}
        for c in inspect.clients(proxy):
            key = (c["database"] or "", c["user"] or "", c["state"])
            by_state[key] = by_state.get(key, 0) + 1
        g = GaugeMetricFamily("pgbalance_clients", "Client connections by database, user and state.", labels=["database", "user", "state"])
        for labels, n in sorted(by_state.items()):
            g.add_metric(list(labels), n)
        yield g
        yield CounterMetricFamily("pgbalance_clients_accepted", "Client connections accepted since start.", value=counters.clients_accepted)

    def _servers_and_pools(self, proxy, counters):
        by_state: dict[tuple, int] = {}
        for s in inspect.servers(proxy):
            key = (s["database"], s["user"], s["node"], s["state"])
            by_state[key] = by_state.get(key, 0) + 1
        g = GaugeMetricFamily("pgbalance_servers", "Server connections by database, user, node and state.", labels=["database", "user", "node", "state"])
        for labels, n in sorted(by_state.items()):
            g.add_metric(list(labels), n)
        yield g
        labels = ["database", "user", "node"]
        families = {
            "size": GaugeMetricFamily("pgbalance_pool_size", "Server connections a pool may open (pool_size).", labels=labels),
            "connecting": GaugeMetricFamily("pgbalance_pool_connecting", "Server connections being opened.", labels=labels),
            "waiting": GaugeMetricFamily("pgbalance_pool_waiting_clients", "Clients waiting for a server connection.", labels=labels),
            "oldest_wait_s": GaugeMetricFamily("pgbalance_pool_oldest_wait_seconds", "How long the longest-waiting client has waited.", labels=labels),
            "paused": GaugeMetricFamily("pgbalance_pool_paused", "1 while the pool is PAUSEd.", labels=labels),
        }
        waits = CounterMetricFamily("pgbalance_pool_waits", "Server connection requests that had to wait.", labels=labels)
        wait_s = CounterMetricFamily("pgbalance_pool_wait_seconds", "Total time clients spent waiting for server connections.", labels=labels)
        yielded = CounterMetricFamily(
            "pgbalance_pool_yielded_connections",
            "Server connections closed to let another pool under the same max_db_connections or max_user_connections open one.",
            labels=labels,
        )
        for pool in inspect.pools(proxy):
            key = [pool["database"], pool["user"], pool["node"]]
            for name, family in families.items():
                family.add_metric(key, float(pool[name]))
            waits.add_metric(key, pool["waits"])
            wait_s.add_metric(key, pool["wait_s"])
            yielded.add_metric(key, pool["yielded"])
        yield from families.values()
        yield waits
        yield wait_s
        yield yielded

    def _traffic(self, counters):
        labels = ["node", "role"]
        queries = CounterMetricFamily("pgbalance_queries", "Query round trips (ReadyForQuery batches) relayed, by node and role.", labels=labels)
        for (node, role), n in sorted(counters.queries.items(), key=str):
            queries.add_metric([str(node), role], n)
        yield queries
        transactions = CounterMetricFamily(
            "pgbalance_transactions", "Transactions (and autocommit statements) completed, by node and role.", labels=labels
        )
        for (node, role), n in sorted(counters.transactions.items(), key=str):
            transactions.add_metric([str(node), role], n)
        yield transactions
        yield _histograms(
            "pgbalance_transaction_duration_seconds",
            "Explicit transactions: from the ReadyForQuery that reports them open to the one that reports them closed.",
            labels,
            counters.transaction_seconds,
        )
        yield _histograms(
            "pgbalance_query_duration_seconds",
            "Queries (a Query, or an extended-protocol batch up to Sync): from the client's request to ReadyForQuery.",
            labels,
            counters.query_seconds,
        )
        received = CounterMetricFamily("pgbalance_client_received_bytes", "Bytes received from clients, by database.", labels=["database"])
        sent = CounterMetricFamily("pgbalance_client_sent_bytes", "Bytes relayed from server connections to clients, by database.", labels=["database"])
        for name, stats in sorted(counters.databases.items()):
            received.add_metric([name], stats.received)
            sent.add_metric([name], stats.sent)
        yield received
        yield sent
        logins = CounterMetricFamily(
            "pgbalance_server_logins",
            "Server connections opened, by node and result (ok, connect_failed, login_failed).",
            labels=["node", "result"],
        )
        for (node, result), n in sorted(counters.server_logins.items()):
            logins.add_metric([node, result], n)
        yield logins
        errors = CounterMetricFamily("pgbalance_errors", "Errors pgtwist sent to clients itself, by SQLSTATE.", labels=["sqlstate"])
        for code, n in sorted(counters.errors.items()):
            errors.add_metric([code], n)
        yield errors

    def _cluster(self, proxy, counters):
        routes = CounterMetricFamily("pgbalance_routing_decisions", "Routing decisions by reason.", labels=["reason"])
        for reason, n in sorted(counters.routes.items()):
            routes.add_metric([reason], n)
        yield routes
        labels = ["database", "node", "role"]
        up = GaugeMetricFamily("pgbalance_node_up", "1 when the node is healthy as the cluster monitor sees it.", labels=labels)
        lag_bytes = GaugeMetricFamily("pgbalance_node_lag_bytes", "Replication lag of a replica, in bytes of WAL.", labels=labels)
        lag_s = GaugeMetricFamily("pgbalance_node_lag_seconds", "Replication lag of a replica, in seconds.", labels=labels)
        excluded = GaugeMetricFamily(
            "pgbalance_node_excluded",
            "1 for the reason a node gets no reads now (down, fenced, old_timeline, no_upstream, lag_bytes, lag_seconds).",
            labels=["database", "node", "reason"],
        )
        for node in inspect.nodes(proxy):
            key = [node["database"], node["node"], node["role"]]
            if node["up"] is not None:
                up.add_metric(key, 1.0 if node["up"] else 0.0)
            if node["lag_bytes"] is not None:
                lag_bytes.add_metric(key, float(node["lag_bytes"]))
            if node["lag_s"] is not None:
                lag_s.add_metric(key, float(node["lag_s"]))
            if node["excluded"] is not None:
                excluded.add_metric([node["database"], node["node"], node["excluded"]], 1.0)
        yield up
        yield lag_bytes
        yield lag_s
        yield excluded
        yield CounterMetricFamily("pgbalance_failovers", "Primary changes seen by the cluster monitor.", value=counters.failovers)

    def _process(self, proxy, counters):
        reloads = CounterMetricFamily("pgbalance_reloads", "Configuration reloads, by result.", labels=["result"])
        reloads.add_metric(["ok"], counters.reloads)
        reloads.add_metric(["error"], counters.reload_failures)
        yield reloads
        yield CounterMetricFamily("pgbalance_pinned_sessions", "Transaction-mode clients pinned to a server connection.", value=proxy.pinned_sessions)
        yield GaugeMetricFamily("pgbalance_draining", "1 while shutting down gracefully.", value=1.0 if proxy.draining else 0.0)
        yield GaugeMetricFamily("pgbalance_start_time_seconds", "When this pgtwist started (Unix time).", value=counters.started)
        info = GaugeMetricFamily("pgbalance_info", "pgtwist version and pooling mode.", labels=["version", "pool_mode"])
        info.add_metric([__version__, proxy.config.pool_mode], 1.0)
        yield info


def make_registry(service) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(service))
    return registry


# -- readiness ---------------------------------------------------------------------------------


class _Probe(Protocol):
    def connectionMade(self):
        self.factory.done(True)
        self.transport.loseConnection()


class _ProbeFactory(ClientFactory):
    protocol = _Probe
    noisy = False

    def __init__(self):
        self.result = defer.Deferred()

    def done(self, ok: bool) -> None:
        if not self.result.called:
            self.result.callback(ok)

    def clientConnectionFailed(self, connector, reason):
        self.done(False)


def readiness(service, reactor) -> defer.Deferred:
    """Fires with (ready, reason): the listener is open, not draining, and some node can serve reads.

    Readiness is what Kubernetes uses to keep a pod in a Service, and every pgtwist pod sees
    the same cluster: failing it when the primary is down (while replicas still answer reads)
    would empty the Service and turn a failover into a full outage. So a missing primary is a
    metric (pgbalance_node_up) and a log line, and the reason text below, not a 503.

    A database with a cluster monitor is ready when its monitor reports a node that may serve
    reads (the primary, or a replica read_exclusions() lets through). A database with one
    node and no monitor counts as ready when a server connection to it is open, or else when
    a TCP probe of it connects (PROBE_TIMEOUT s).
    """
    proxy = service.proxy
    if not service.accepting:
        return defer.succeed((False, "not accepting clients (starting or shutting down)"))
    routers = getattr(proxy, "routers", {})
    unmonitored = []
    down: list[str] = []
    for database in proxy.config.databases.values():
        router = routers.get(database.name)
        if router is None or not router.clustered:
            unmonitored.append(database.nodes[0])
            continue
        serving = _serving(router)
        if serving:
            return defer.succeed((True, f"database {database.name}: {serving}"))
        down.append(f"database {database.name}: no node up")
    for pool in list(proxy.pools.values()):
        if pool.node in unmonitored and (pool.idle or pool.busy):
            return defer.succeed((True, f"node {pool.node} connected"))
    if not unmonitored:
        return defer.succeed((False, "; ".join(down) or "no database configured"))
    probes = []
    for node in dict.fromkeys(unmonitored):
        factory = _ProbeFactory()
        proxy.dialer.connect(node.host, node.port, factory, timeout=PROBE_TIMEOUT)
        probes.append(factory.result.addCallback(lambda ok, node=node: (ok, node)))

    def decided(results):
        for _, (ok, node) in results:
            if ok:
                return True, f"node {node} reachable"
        return False, "; ".join(down + ["no node reachable: " + ", ".join(str(node) for _, (_, node) in results)])

    return defer.DeferredList(probes).addCallback(decided)


def _serving(router) -> str | None:
    """What serves *router*'s database now ("primary X" / "reads only, on replica Y"), or None."""
    primary = router.primary()
    if primary is not None:
        return f"primary {primary} up"
    exclusions = router.read_exclusions()
    for state in router.states():
        if state.role == "replica" and exclusions.get(state.name) is None:
            return f"no primary (writes fail with 08006), reads on replica {state.name}"
    return None


# -- HTTP ----------------------------------------------------------------------------------------


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class HealthResource(resource.Resource):
    """/healthz: the process and its reactor answer."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"ok\n"


class ReadyResource(resource.Resource):
    """/readyz: 200 when clients can be served, 503 (with the reason) when not."""

    isLeaf = True

    def __init__(self, service, reactor):
        super().__init__()
        self.service = service
        self.reactor = reactor

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")

        def answer(result):
            ready, reason = result
            request.setResponseCode(200 if ready else 503)
            request.write((("ready: " if ready else "not ready: ") + reason + "\n").encode())
            request.finish()

        def failed(failure):
            log.failure("readiness check failed", failure)
            request.setResponseCode(503)
            request.write(b"not ready: internal error\n")
            request.finish()

        readiness(self.service, self.reactor).addCallbacks(answer, failed)
        return server.NOT_DONE_YET


class QuietSite(server.Site):
    """No access log: Prometheus and kubelet would fill the proxy's log with their polling."""

    def log(self, request):
        pass


def make_root(service, reactor) -> resource.Resource:
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(make_registry(service)))
    root.putChild(b"healthz", HealthResource())
    root.putChild(b"readyz", ReadyResource(service, reactor))
    return root


def make_service(service, config, reactor):
    """The HTTP listener as a child service of *service*."""
    site = QuietSite(make_root(service, reactor))
    site.noisy = False
    log.info("metrics: /metrics, /healthz and /readyz on http://{listen}", listen=str(config.listen))
    server_ = internet.TCPServer(config.listen.port, site, interface=config.listen.host, reactor=reactor)
    server_.setName("metrics")
    return server_


def _histograms(name: str, documentation: str, labels: list[str], table: dict) -> HistogramMetricFamily:
    """One histogram family from counters' {(node, role): Histogram} table."""
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for (node, role), histogram in sorted(table.items(), key=str):
        family.add_metric([str(node), role], histogram.buckets(), sum_value=histogram.sum)
    return family
