"""[metrics] under workers = N: one /metrics for the process tree, made of every worker's, labelled worker="I".

Each worker serves its own /metrics on a unix socket in the supervisor's run directory; at scrape
time the supervisor asks them all and merges the families (one HELP/TYPE each, a worker label on
every sample). Nothing is shared between processes, so a worker that is restarted starts its
counters over, as one restarted pgtwist would.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.application import internet
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from pgtwist.service import peers

log = Logger()

FETCH_TIMEOUT = 5.0


def fetch(reactor, socket_path: str, path: str) -> defer.Deferred:
    """(status, body) of GET *path* from a worker; (0, b"") when it does not answer within
    FETCH_TIMEOUT (a frozen worker: its socket takes the connection and nobody reads it, so a
    scrape, or a /readyz probe, would wait for ever)."""
    return peers.ask(reactor, socket_path, "GET", path, FETCH_TIMEOUT).addErrback(lambda _: (0, b""))


def merge(texts: dict[int, str]) -> list[Metric]:
    """Workers' exposition texts -> one list of families, each sample labelled with its worker."""
    families: dict[str, Metric] = {}
    for index in sorted(texts):
        for family in text_string_to_metric_families(texts[index]):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                merged.samples.append(Sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp, s.exemplar))
    return list(families.values())


class _Collected:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def exposition(supervisor, texts: dict[int, str]) -> bytes:
    families = merge(texts)
    up = GaugeMetricFamily("pgbalance_workers_up", "Workers running now (of pgbalance_workers).")
    up.add_metric([], len(supervisor.alive()))
    families.append(up)
    total = GaugeMetricFamily("pgbalance_workers", "Worker processes configured (workers).")
    total.add_metric([], supervisor.count)
    families.append(total)
    restarts = CounterMetricFamily("pgbalance_worker_restarts", "Workers restarted after they died.", value=supervisor.restarts)
    families.append(restarts)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(families))
    return generate_latest(registry)


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, supervisor, reactor):
        super().__init__()
        self.supervisor = supervisor
        self.reactor = reactor

    def render_GET(self, request):
        sup = self.supervisor
        indexes = sup.alive()
        ds = [fetch(self.reactor, sup.spec_for(sup.workers[i]).http_socket(i), "/metrics") for i in indexes]

        def answer(results):
            texts = {i: body.decode("utf-8", "replace") for i, (status, body) in zip(indexes, results) if status == 200}
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
            request.write(exposition(sup, texts))
            request.finish()

        def failed(f):
            log.failure("metrics: merging the workers' metrics failed", f)
            request.setResponseCode(500)
            request.finish()

        defer.gatherResults(ds).addCallback(answer).addErrback(failed)
        return server.NOT_DONE_YET


class ProbeResource(resource.Resource):
    """/healthz: every worker runs. /readyz: some worker says it is ready (its own /readyz)."""

    isLeaf = True

    def __init__(self, supervisor, reactor, ready: bool):
        super().__init__()
        self.supervisor = supervisor
        self.reactor = reactor
        self.ready = ready

    def render_GET(self, request):
        sup = self.supervisor
        alive = sup.alive()
        if not self.ready:
            ok = len(alive) == sup.count and not sup._stopping
            request.setResponseCode(200 if ok else 503)
            return f"{'ok' if ok else 'down'}: {len(alive)} of {sup.count} workers running\n".encode()
        ds = [fetch(self.reactor, sup.spec_for(sup.workers[i]).http_socket(i), "/readyz") for i in alive]

        def answer(results):
            ready = sum(1 for status, _ in results if status == 200)
            request.setResponseCode(200 if ready and not sup._stopping else 503)
            request.write(f"{'ready' if ready else 'not ready'}: {ready} of {sup.count} workers ready\n".encode())
            request.finish()

        defer.gatherResults(ds).addCallback(answer)
        return server.NOT_DONE_YET


def make_service(supervisor, config, reactor):
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(supervisor, reactor))
    root.putChild(b"healthz", ProbeResource(supervisor, reactor, ready=False))
    root.putChild(b"readyz", ProbeResource(supervisor, reactor, ready=True))
    site = server.Site(root)
    site.noisy = False
    log.info("metrics: /metrics, /healthz and /readyz of every worker on http://{listen}", listen=str(config.listen))
    return internet.TCPServer(config.listen.port, site, interface=config.listen.host, reactor=reactor)
