"""In-memory routing fixtures: a three-node cluster's states behind a fake ClusterMonitor, and its DatabaseRouter."""

from twisted.internet import defer, task

from pgtwist import config as configmod
from pgtwist.cluster.catalog import NOT_FETCHED
from pgtwist.routing.policy import NodeState
from pgtwist.routing.router import DatabaseRouter

P, R1, R2 = "p:5432", "r1:5432", "r2:5432"


def make_config(nodes=(P, R1, R2), route="auto", **overrides):
    raw = {
        "auth_type": "trust",
        "databases": {"appdb": {"dbname": "postgres", "nodes": list(nodes), "route": route}},
        "users": {"app": {"password": "pw"}},
        **overrides,
    }
    return configmod.from_dict(raw)


class FakeMonitor:
    """What DatabaseRouter uses of a ClusterMonitor: states, functions, mark_down, verify, functions_changed."""

    def __init__(self, states, clock=None):
        self.states = {s.name: s for s in states}
        self.reactor = clock or task.Clock()
        self.marked: list[tuple[str, str]] = []
        self.verified: list[tuple[str, str]] = []  # probe-now requests (the node stays up)
        self.functions = NOT_FETCHED
        self.functions_changes = 0
        self.probes: list = []  # (name, Deferred) of probe_now calls

    def mark_down(self, name, reason):
        self.marked.append((name, reason))
        self.states[name].up = False

    def verify(self, name, reason):
        self.verified.append((name, reason))

    def functions_changed(self):
        self.functions_changes += 1

    def probe_now(self, name):
        """A probe of *name*: a Deferred the test fires (with a NodeState) from self.probes."""
        d = defer.Deferred()
        self.probes.append((name, d))
        return d


def cluster_states(replicas=(R1, R2), primary_up=True, lsn=1000):
    states = [NodeState(P, role="primary", up=primary_up, timeline=1, lsn=lsn)]
    states += [NodeState(r, role="replica", up=True, timeline=1, lsn=lsn, lag_bytes=0, lag_seconds=0.0) for r in replicas]
    return states


def clustered(hook=None, states=None, route="auto", **overrides):
    config = make_config(route=route, **overrides)
    database = config.databases["appdb"]
    monitor = FakeMonitor(states if states is not None else cluster_states())
    return DatabaseRouter(database, config, monitor, hook), monitor
