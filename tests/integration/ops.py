"""Helpers for the operations tests: proxies with [manhole]/[metrics]/[admin] tables, config rewrites, ssh, HTTP.

Not a test module. Builds on proxy.py (whose write_config only knows top-level keys,
[databases.*] and [users.*]): the extra tables are appended to the file it writes.
"""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import proxy as proxymod

SSH_TIMEOUT = 30
HTTP_TIMEOUT = 10
_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")


def render_tables(tables: dict[str, dict]) -> str:
    lines = []
    for name, table in tables.items():
        lines.append("")
        lines.append(f"[{name}]")
        lines += [f"{proxymod._toml_key(k)} = {proxymod._toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write_config(path: Path, cluster, port: int, tables: dict[str, dict], overrides: dict[str, Any]) -> None:
    proxymod.write_config(path, *proxymod.proxy_config(cluster, port, overrides))
    with open(path, "a") as f:
        f.write(render_tables(tables))


@contextmanager
def start_ops_proxy(cluster, tmp_path: Path, tables: dict[str, dict], **overrides: Any) -> Iterator[proxymod.RunningProxy]:
    """start_proxy() with extra TOML tables ({"manhole": {...}, "admin": {...}}) in its config."""
    original = proxymod.write_config

    def write(path, top, databases, users):
        original(path, top, databases, users)
        with open(path, "a") as f:
            f.write(render_tables(tables))

    with ExitStack() as stack:
        proxymod.write_config = write
        try:
            px = stack.enter_context(proxymod.start_proxy(cluster, tmp_path, **overrides))
        finally:
            proxymod.write_config = original
        yield px


def rewrite_config(px: proxymod.RunningProxy, tables: dict[str, dict], **overrides: Any) -> None:
    """Replace the running proxy's config file (same listen port) with new settings."""
    write_config(px.config_path, px.cluster, px.port, tables, overrides)


# --------------------------------------------------------------------------- ssh


def ssh_keygen(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=SSH_TIMEOUT,
    )
    return path


def ssh_repl(port: int, key: Path, lines: list[str], user: str = "admin") -> subprocess.CompletedProcess:
    """Type *lines* into the manhole REPL over real OpenSSH (a pty, as a person would), then Ctrl-D."""
    cmd = [
        "ssh", "-tt", "-F", "/dev/null",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
        "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
        "-i", str(key), "-p", str(port), f"{user}@{proxymod.HOST}",
    ]  # fmt: skip
    typed = "".join(line + "\r" for line in lines) + "\x04"
    return subprocess.run(cmd, input=typed.encode(), capture_output=True, timeout=SSH_TIMEOUT)


def screen_text(output: bytes) -> str:
    """What the terminal showed, without its escape sequences."""
    return _ANSI.sub("", output.decode("utf-8", "replace"))


# --------------------------------------------------------------------------- HTTP


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{proxymod.HOST}:{port}{path}", timeout=HTTP_TIMEOUT) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
