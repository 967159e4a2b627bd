"""Fixtures for integration tests: real PostgreSQL servers on loopback."""

import pytest

from pgtwist.localcluster import LocalCluster


@pytest.fixture(scope="session")
def pg_cluster():
    """A primary (nodes[0]) + 1 streaming replica (nodes[1]) shared by the whole session.

    Tests must leave it as they found it (no promotion, no stopped nodes);
    create a private LocalCluster for destructive tests.
    """
    with LocalCluster.create(replicas=1) as cluster:
        yield cluster
