"""ruff and mypy over the code, as configured in pyproject.toml, so that CI (./dev test) runs them.

Skipped (with the reason) where they are not installed: `pip install '.[test]'` brings both.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (it comes with the 'test' extra: pip install '.[test]')")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff():
    result = run_tool("ruff", "check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy():
    # The files to check are listed in pyproject.toml ([tool.mypy] files), to grow module by module.
    result = run_tool("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
