"""The Dockerfile and compose.yaml: what can be checked without a container runtime always is;
the image is built and smoke-tested (read-only root, non-root, SIGTERM drains) where Docker runs."""

import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from pgtwist import config as configmod

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.splitlines() if not ln.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def docker_unavailable() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no container runtime: docker is not installed"
    info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"no container runtime: docker's daemon does not answer ({info.stderr.strip().splitlines()[-1] if info.stderr.strip() else info.returncode})"
    return None


def test_dockerfile_is_multi_stage_non_root_with_tini_and_a_plugin_cache():
    steps = instructions()
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) == 2 and all("-slim" in f for f in froms), froms
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    (entrypoint,) = [arg for op, arg in final if op == "ENTRYPOINT"]
    assert '"/usr/bin/tini", "--"' in entrypoint
    assert any(op == "RUN" and "getPlugins(IPlugin)" in arg and "dropin.cache" in arg for op, arg in steps)
    assert any(op == "STOPSIGNAL" and arg.strip() == "SIGTERM" for op, arg in final)
    # Everything the build copies exists (the example config is package data through a symlink).
    for op, arg in steps:
        if op == "COPY" and "--from" not in arg:
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), source


def test_compose_file_names_what_exists_and_its_config_passes_check():
    yaml = pytest.importorskip("yaml", reason="PyYAML is a test dependency (pip install '.[test]')")
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert {"primary", "replica", "pgtwist"} <= compose["services"].keys()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), source
    pgtwist = compose["services"]["pgtwist"]
    assert pgtwist["read_only"] is True
    config = configmod.load(ROOT / "etc" / "compose" / "pgbalance.toml")
    nodes = [str(n) for n in config.databases["appdb"].nodes]
    assert nodes == ["primary:5432", "replica:5432"]  # compose's service names


@pytest.fixture(scope="module")
def image():
    why = docker_unavailable()
    if why:
        pytest.skip(why)
    tag = f"pgtwist-test:{uuid.uuid4().hex[:8]}"
    build = subprocess.run(["docker", "build", "-q", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=1200)
    if build.returncode != 0 and ("pull" in build.stderr or "resolve" in build.stderr or "registry" in build.stderr):
        pytest.skip(f"the base image cannot be pulled here: {build.stderr.strip()[-300:]}")
    assert build.returncode == 0, build.stderr
    yield tag
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)


def test_image_version_and_check(image):
    version = subprocess.run(["docker", "run", "--rm", image, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("pgtwist "), version
    whoami = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", image, "-u"], capture_output=True, text=True, timeout=120)
    assert whoami.stdout.strip() == "10001"


def test_image_runs_read_only_and_sigterm_drains(image, tmp_path):
    config = tmp_path / "pgbalance.toml"
    config.write_text('listen = "0.0.0.0:6432"\nauth_type = "trust"\nshutdown_timeout = 5.0\n'
                      '[databases.appdb]\nnodes = ["127.0.0.1:1"]\n[users.app]\npassword = "x"\n'
                      '[metrics]\nlisten = "0.0.0.0:9127"\n')
    config.chmod(0o644)
    name = f"pgtwist-test-{uuid.uuid4().hex[:8]}"
    run = subprocess.run(
        ["docker", "run", "-d", "--name", name, "--read-only", "--cap-drop", "ALL", "-p", "127.0.0.1::9127",
         "-v", f"{config}:/etc/pgtwist/pgbalance.toml:ro", image],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    try:
        port = int(subprocess.run(["docker", "port", name, "9127"], capture_output=True, text=True, timeout=30).stdout.split(":")[-1])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=30)
        assert "pgtwist listening on 0.0.0.0:6432" in logs.stdout + logs.stderr
        assert "dropin" not in logs.stdout + logs.stderr  # the plugin cache was built with the image
        started = time.monotonic()
        subprocess.run(["docker", "stop", "-t", "30", name], capture_output=True, timeout=60, check=True)
        assert time.monotonic() - started < 20  # SIGTERM reached pgtwist through tini: no 30 s kill
        status = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True, text=True, timeout=30)
        assert status.stdout.strip() == "0"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def test_compose_primary_init_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    result = subprocess.run([bash, "-n", str(ROOT / "etc" / "compose" / "primary-init.sh")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
