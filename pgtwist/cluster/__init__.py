"""Cluster awareness: node health, roles, WAL positions and failover support (ClusterMonitor)."""

from pgtwist.cluster.health import PROBE_SQL, ClusterMonitor, ProbeError, PromoteError

__all__ = ["PROBE_SQL", "ClusterMonitor", "ProbeError", "PromoteError"]
