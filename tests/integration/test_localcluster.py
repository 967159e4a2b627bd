"""pgtwist.tools.localcluster against real PostgreSQL binaries."""

import uuid
from pathlib import Path

import psycopg
import pytest

from pgtwist.tools.localcluster import LocalCluster, LocalClusterError

pytestmark = pytest.mark.integration


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def test_app_user_logs_in_with_scram(pg_cluster):
    primary = pg_cluster.nodes[0]
    with psycopg.connect(pg_cluster.dsn(primary), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == pg_cluster.app_user
        assert conn.execute("SHOW password_encryption").fetchone()[0] == "scram-sha-256"
    stored = pg_cluster.psql(
        primary, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{pg_cluster.app_user}'"
    )
    assert stored.startswith("SCRAM-SHA-256$")


def test_wrong_or_missing_password_is_rejected(pg_cluster):
    primary = pg_cluster.nodes[0]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_cluster.dsn(primary, password="wrong"), connect_timeout=10)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            pg_cluster.dsn(primary, password=None, passfile="/nonexistent"), connect_timeout=10
        )


def test_listens_on_loopback_below_ephemeral_range(pg_cluster):
    for node in pg_cluster.nodes:
        assert node.host == "127.0.0.1"
        assert 1024 < node.port < 32768
        assert node.addr == f"127.0.0.1:{node.port}"
    assert len({n.port for n in pg_cluster.nodes}) == len(pg_cluster.nodes)


def test_replica_streams_and_is_read_only(pg_cluster):
    primary, replica = pg_cluster.nodes
    assert pg_cluster.psql(primary, "SELECT pg_is_in_recovery()") == "f"
    assert pg_cluster.psql(replica, "SELECT pg_is_in_recovery()") == "t"
    assert pg_cluster.psql(replica, "SELECT status FROM pg_stat_wal_receiver") == "streaming"

    table = f"t_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_cluster.dsn(primary), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (v int)")
        conn.execute(f"INSERT INTO {table} VALUES (42)")
    try:
        pg_cluster.wait_replicas_caught_up()
        with psycopg.connect(pg_cluster.dsn(replica), autocommit=True) as conn:
            assert conn.execute(f"SELECT v FROM {table}").fetchone()[0] == 42
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute(f"INSERT INTO {table} VALUES (1)")
    finally:
        pg_cluster.psql(primary, f"DROP TABLE {table}")


def test_psql_raises_with_server_error(pg_cluster):
    with pytest.raises(LocalClusterError, match="no_such_table"):
        pg_cluster.psql(pg_cluster.nodes[0], "SELECT * FROM no_such_table")


def test_promote_stop_start_and_destroy():
    cluster = LocalCluster.create(replicas=1, app_password="s3cret pass'word")
    base = cluster.base
    try:
        primary, replica = cluster.nodes
        pids = _pids(cluster)
        assert pids and all(_alive(p) for p in pids)

        cluster.promote(replica)
        assert cluster.psql(replica, "SELECT pg_is_in_recovery()") == "f"
        with psycopg.connect(cluster.dsn(replica), autocommit=True) as conn:
            conn.execute("CREATE TABLE after_promote (v int)")
            conn.execute("INSERT INTO after_promote VALUES (1)")

        # Crash and restart the old primary.
        cluster.stop(primary, mode="immediate")
        assert not cluster.is_running(primary)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(cluster.dsn(primary), connect_timeout=5)
        cluster.start(primary)
        assert cluster.psql(primary, "SELECT 1", user=cluster.app_user) == "1"
        cluster.stop(replica)
        cluster.stop(replica)  # stopping a stopped node is a no-op
    finally:
        cluster.destroy()
    cluster.destroy()  # idempotent
    assert not base.exists()
    assert [(p, Path(f"/proc/{p}/stat").read_text()) for p in pids if _alive(p)] == []
    assert _processes_mentioning(str(base)) == []


def test_create_cleans_up_after_failure():
    base = Path("/tmp") / f"pgtwist-fail-{uuid.uuid4().hex[:8]}"
    with pytest.raises(LocalClusterError, match="bogus_setting"):
        LocalCluster.create(replicas=1, base=base, settings={"shared_buffers": "bogus_setting"})
    assert not base.exists()
    assert _processes_mentioning(str(base)) == []


def _pids(cluster: LocalCluster) -> list[int]:
    return [
        int((n.datadir / "postmaster.pid").read_text().split("\n", 1)[0]) for n in cluster.nodes
    ]


def _alive(pid: int) -> bool:
    """True if *pid* is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
