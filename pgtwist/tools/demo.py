"""`twistd pgbalance --demo`: a throwaway local primary + replica fronted by pgtwist, removed on exit."""

from __future__ import annotations

import sys

from twisted.application import service

from pgtwist import config as configmod


class ClusterService(service.Service):
    """Owns the throwaway cluster: destroyed when twistd stops (the service tree stops it last)."""

    def __init__(self, cluster):
        self.cluster = cluster

    def stopService(self):
        super().stopService()
        self.cluster.destroy()


def demo_config(cluster, listen: str, database: str = "appdb") -> configmod.Config:
    return configmod.from_dict(
        {
            "listen": listen,
            "pool_mode": "transaction",  # so the demo shows reads going to the replica
            "auth_type": "scram-sha-256",
            "databases": {database: {"dbname": cluster.app_database, "nodes": [n.addr for n in cluster.nodes]}},
            "users": {cluster.app_user: {"password": cluster.app_password}},
        },
        "<demo>",
    )


def make_demo_service(options, reactor=None):
    from pgtwist.service.lifecycle import PgBalanceService
    from pgtwist.tools.localcluster import LocalCluster, LocalClusterError

    try:
        cluster = LocalCluster.create(replicas=options["demo-replicas"])
    except LocalClusterError as e:
        sys.stderr.write(f"pgtwist demo: {e}\n")
        raise SystemExit(1) from None
    try:
        config = demo_config(cluster, options["demo-listen"])
    except BaseException:
        cluster.destroy()
        raise
    top = service.MultiService()
    ClusterService(cluster).setServiceParent(top)  # started first, stopped last
    PgBalanceService(config, reactor).setServiceParent(top)
    listen = config.listen
    db = next(iter(config.databases))
    roles = ", ".join(f"{n.name} {n.addr}" for n in cluster.nodes)
    sys.stdout.write(
        "\n"
        f"pgtwist demo: PostgreSQL nodes {roles} in {cluster.base}\n"
        f"pgtwist demo: connect with\n\n"
        f"    psql 'postgresql://{cluster.app_user}:{cluster.app_password}@{listen.host}:{listen.port}/{db}'\n\n"
        "pgtwist demo: Ctrl-C stops pgtwist and removes the cluster.\n\n"
    )
    sys.stdout.flush()
    return top
