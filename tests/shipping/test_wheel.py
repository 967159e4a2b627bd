"""The wheel: built from this tree, installed into a clean virtualenv, its commands run from elsewhere.

Building needs setuptools and wheel (pip fetches them into an isolated build environment) and
installing needs the dependencies: both come from the package index. Without it the test
skips and says so.
"""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "NOTIFY_SOCKET")}


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=CLEAN_ENV, **kw)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(base / "dist"), str(ROOT)], timeout=600)
    if built.returncode != 0:
        pytest.skip(f"cannot build the wheel here (the build backend comes from the package index): {built.stderr.strip()[-300:]}")
    (wheel,) = (base / "dist").glob("pgtwist-*.whl")
    venv.EnvBuilder(with_pip=True, clear=True).create(base / "venv")
    python = base / "venv" / "bin" / "python"
    done = run([str(python), "-m", "pip", "install", "-q", str(wheel)], timeout=900)
    if done.returncode != 0:
        pytest.skip(f"cannot install the wheel's dependencies here (no package index?): {done.stderr.strip()[-300:]}")
    return base / "venv" / "bin"


def test_console_scripts_and_the_example_config(installed, tmp_path):
    version = run([str(installed / "pgtwist"), "--version"], cwd=tmp_path, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("pgtwist "), version
    helptext = run([str(installed / "pgtwist"), "--help"], cwd=tmp_path, timeout=60)
    site = str(installed.parent / "lib")
    assert f"  {site}/" in helptext.stdout and "examples/pgbalance.toml" in helptext.stdout, helptext.stdout  # the installed copy
    example = run([str(installed / "pgtwist"), "example-config"], cwd=tmp_path, timeout=60)
    assert example.stdout == (ROOT / "etc" / "pgbalance.toml").read_text()
    (tmp_path / "pgbalance.toml").write_text(example.stdout)
    check = run([str(installed / "pgtwist"), "check", "--config", "pgbalance.toml"], cwd=tmp_path, timeout=60)
    assert check.returncode == 0 and check.stdout == "pgbalance.toml: OK\n", check
    passwd = run([str(installed / "pgtwist-passwd")], input="pw\n", cwd=tmp_path, timeout=60)
    assert passwd.returncode == 0 and passwd.stdout.startswith("SCRAM-SHA-256$"), passwd


def test_the_twistd_plugin_is_found(installed, tmp_path):
    result = run([str(installed / "twistd"), "pgbalance", "--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "--config" in result.stdout, result
    assert "Traceback" not in result.stderr
    check = run([str(installed / "twistd"), "-n", "pgbalance", "--config", "nope.toml", "--check"], cwd=tmp_path, timeout=120)
    assert check.returncode == 78 and "cannot read" in check.stderr, check


def test_the_dockerfiles_plugin_cache_step_writes_dropin_cache(installed, tmp_path):
    # The step the Dockerfile runs at build time (no container runtime is needed to check it).
    import re

    step = re.search(r'bin/python -c "(from twisted\.plugin import[^"]+)"', (ROOT / "Dockerfile").read_text())
    assert step, "the Dockerfile builds no plugin cache"
    result = run([str(installed / "python"), "-c", step.group(1)], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result
    (cache,) = installed.parent.glob("lib/python*/site-packages/twisted/plugins/dropin.cache")
    assert cache.stat().st_size > 0 and b"pgbalance" in cache.read_bytes()


def test_the_wheel_carries_the_compiled_core_where_it_could_be_built(installed, tmp_path):
    """pip builds the compiled core into the wheel when a C compiler is there (setup.py), with the
    hash of its sources beside it: the installed copy runs it; without a compiler, the pure form."""
    import shutil

    python = installed / "python"
    form = run([str(python), "-c", "import pgtwist.compiled as c; print(c.FORM)"], cwd=tmp_path, timeout=60)
    assert form.returncode == 0, form.stderr
    expected = "compiled" if shutil.which("cc") or shutil.which("gcc") else "pure"
    assert form.stdout.strip() == expected, (form.stdout, form.stderr)
