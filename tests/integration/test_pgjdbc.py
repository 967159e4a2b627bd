"""pgjdbc (Debian's libpostgresql-jdbc-java) through pgtwist in transaction pooling mode.

tests/integration/java/PgjdbcStress.java is compiled with javac into tmp_path and run with
prepareThreshold=1 (every statement server-prepared under pgjdbc's own names S_1, S_2, ...),
from 12 threads over a pool of 4. `./dev setup` installs the JDK and the driver.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness.proxy import start_proxy
from tests.harness.txhelpers import TX_CONFIG

pytestmark = pytest.mark.integration

JDBC_JAR = Path("/usr/share/java/postgresql.jar")
SOURCE = Path(__file__).resolve().parent / "java" / "PgjdbcStress.java"
THREADS = 12
ROUNDS = 20
TABLE = "tx_pgjdbc"

_missing = [what for what, ok in (("javac", shutil.which("javac")), ("java", shutil.which("java")), (str(JDBC_JAR), JDBC_JAR.is_file())) if not ok]


@pytest.fixture(scope="module")
def stress_class(tmp_path_factory) -> Path:
    if _missing:
        pytest.skip(f"pgjdbc test needs {', '.join(_missing)}: run ./dev setup (apt-get install default-jdk-headless libpostgresql-jdbc-java)")
    out = tmp_path_factory.mktemp("pgjdbc")
    proc = subprocess.run(
        ["javac", "-nowarn", "-cp", str(JDBC_JAR), "-d", str(out), str(SOURCE)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"javac failed:\n{proc.stdout}{proc.stderr}"
    return out


def test_pgjdbc_server_prepared_statements_12_threads_over_4(pg_cluster, tmp_path, stress_class):
    with start_proxy(pg_cluster, tmp_path, **TX_CONFIG) as px:
        with px.connect() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
            conn.execute(f"CREATE TABLE {TABLE} (thread int, k int, note text)")
        try:
            url = f"jdbc:postgresql://{px.host}:{px.port}/appdb"
            proc = subprocess.run(
                [
                    "java",
                    "-Xss512k",
                    "-XX:+UseSerialGC",
                    "-XX:TieredStopAtLevel=1",
                    "-cp",
                    f"{JDBC_JAR}:{stress_class}",
                    "PgjdbcStress",
                    url,
                    px.user,
                    px.password,
                    str(THREADS),
                    str(ROUNDS),
                    TABLE,
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=75,
            )
            output = proc.stdout + proc.stderr
            summary = re.search(r"^PGJDBC-SUMMARY (.*)$", proc.stdout, re.MULTILINE)
            assert summary, f"no summary from PgjdbcStress (exit {proc.returncode}):\n{output[-4000:]}"
            fields = dict(kv.split("=") for kv in summary.group(1).split())
            counts = {k: int(v) for k, v in fields.items()}
            assert proc.returncode == 0 and counts["failed"] == 0, output[-6000:]
            assert counts["threads"] == THREADS and counts["ok"] == THREADS, counts
            assert counts["server_prepared"] == THREADS, counts  # pgjdbc really used named server statements
            assert counts["batch_rows"] == THREADS * 2 * ROUNDS, counts
            assert counts["commits"] == THREADS and counts["rollbacks"] == THREADS, counts
            assert counts["queries"] == THREADS * (ROUNDS + 3 + 5 + 1), counts
            with px.connect() as conn:
                rows = conn.execute(
                    f"SELECT count(*), count(DISTINCT thread), count(*) FILTER (WHERE note = 'rolled back') FROM {TABLE}"
                ).fetchone()
            assert rows == (THREADS * (2 * ROUNDS + 5), THREADS, 0), rows
        finally:
            with px.connect() as conn:
                conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
