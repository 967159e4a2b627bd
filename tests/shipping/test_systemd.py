"""etc/pgbalance.service: what it promises (checked in Python), and systemd-analyze's verdict where systemd is installed."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "etc" / "pgbalance.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)")


def service_section() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section == "[Service]":
            out.setdefault(key, []).append(value)
    return out


def test_notify_no_restart_loop_and_no_exec_start_pre():
    service = service_section()
    assert service["Type"] == ["notify"]
    assert service["RestartPreventExitStatus"] == ["78"]  # EX_CONFIG: pgtwist's exit for any config mistake
    assert "ExecStartPre" not in service  # its failure would not honour RestartPreventExitStatus
    assert service["ExecStart"][0].split()[1:3] == ["run", "--config"]
    assert any(v.startswith("userlist.txt:") for v in service["LoadCredential"])


def _runnable_copy(tmp_path) -> Path:
    # verify checks that ExecStart's binary exists; /opt/pgtwist is where the unit says to install.
    copy = tmp_path / "pgbalance.service"
    copy.write_text(UNIT.read_text().replace("/opt/pgtwist/bin/pgtwist", "/bin/true"))
    return copy


@needs_analyze
def test_systemd_analyze_verify(tmp_path):
    result = subprocess.run([ANALYZE, "verify", "--man=no", str(_runnable_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result


@needs_analyze
def test_systemd_analyze_security_scores_ok(tmp_path):
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(_runnable_copy(tmp_path))], capture_output=True, text=True, timeout=60
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip(f"this systemd-analyze has no --offline (systemd < 250): {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result
    assert float(match.group(1)) <= 2.0, result.stdout  # 1.4 when written; 10 is an unhardened service
