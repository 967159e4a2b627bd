"""Fixtures for integration tests: real PostgreSQL servers on loopback, pgtwist in front of them."""

import faulthandler
import signal
import sys
import threading

import psycopg
import pytest

from pgtwist.tools.localcluster import LocalCluster

from tests.harness import proxy as proxymod

# A shell without job control starts background commands with SIGINT ignored, and an ignored
# signal stays ignored across exec: pgtwist started from such a run would never see the SIGINT
# the drills send it. Tests run as if from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# No single integration test may take longer than this: a hang fails the test, never CI.
TEST_DEADLINE = 90


@pytest.fixture(scope="session")
def pg_cluster():
    """A primary (nodes[0]) + 1 streaming replica (nodes[1]) shared by the whole session.

    Tests must leave it as they found it (no promotion, no stopped nodes);
    create a private LocalCluster for destructive tests.
    """
    with LocalCluster.create(replicas=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def proxy(pg_cluster, tmp_path_factory):
    """pgtwist (session pooling, pool_size 20, scram-sha-256) in front of the primary, shared by the session.

    Tests needing other settings run their own with proxymod.start_proxy().
    """
    with proxymod.start_proxy(pg_cluster, tmp_path_factory.mktemp("proxy"), pool_size=20, auth_type="scram-sha-256") as px:
        yield px


@pytest.fixture
def admin(pg_cluster):
    """A superuser connection straight to the primary (not through pgtwist), autocommit."""
    primary = pg_cluster.nodes[0]
    dsn = pg_cluster.dsn(primary, user=pg_cluster.superuser, password=pg_cluster.superuser_password, connect_timeout=10)
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


class DeadlineExceeded(Exception):
    """The per-test deadline expired: something blocked."""


@pytest.fixture(autouse=True)
def _deadline_and_proxy_health(request):
    """Bound every integration test (SIGALRM), and fail it if a proxy it used crashed or logged a traceback."""
    use_alarm = threading.current_thread() is threading.main_thread()
    previous = None
    if use_alarm:

        def on_alarm(signum, frame):
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            raise DeadlineExceeded(f"test exceeded its {TEST_DEADLINE}s deadline")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, TEST_DEADLINE)
    offsets = {id(px): px.log_size() for px in proxymod.LIVE}
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    problems = []
    for px in list(proxymod.LIVE):
        if not px.alive():
            problems.append(f"{px} exited with status {px.process.returncode}")
        new = px.log_text(offsets.get(id(px), 0))
        if "Traceback (most recent call last)" in new or "Unhandled Error" in new:
            problems.append(f"{px} logged an error during the test:\n{new[-4000:]}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for px in proxymod.LIVE:
            px.test_failed = True
            report.sections.append((f"pgtwist log tail ({px.host}:{px.port})", px.log_tail()))
