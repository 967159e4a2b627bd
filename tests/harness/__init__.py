"""The one shared test harness: what unit and integration tests (and bench/) build on; no tests here.

In memory (unit tests): session (the real Proxy on StringTransports: Harness, Setup), routing (a
fake ClusterMonitor and its DatabaseRouter), admin_support (a Proxy with the admin console),
compiled (the core's form, and pure_only for tests whose stand-ins the compiled core refuses).
Real PostgreSQL (integration tests): proxy (a twistd pgtwist in front of a LocalCluster, RawClient),
txhelpers (extended-protocol bytes, threads, pgbench), ops (manhole/metrics/admin console),
tlshelpers, fuzzing, failover (clusters to kill nodes in).
"""
