"""Helpers for the operations tests: proxies with [manhole]/[metrics]/[admin] tables, config rewrites, ssh, HTTP, SHOW.

Not a test module. Builds on proxy.py (whose write_config only knows top-level keys,
[databases.*] and [users.*]): the extra tables are appended to the file it writes.
"""

from __future__ import annotations

import re
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pgtwist.wire import protocol as p

from . import proxy as proxymod
from .proxy import RawClient, wait_for
from .txhelpers import data_row_values

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


# -- the admin console, as the operations and fuzzing tests read it -------------------------------

ADMIN, ADMIN_PASSWORD = "admin", "admin-secret-9"


def admin_show(px, what: str) -> list[dict]:
    """SHOW *what* on the admin console: its rows, as dicts of text values."""
    with RawClient(px.host, px.port) as c:
        c.login(ADMIN, "pgbalance", ADMIN_PASSWORD)
        out = c.query(f"SHOW {what}")
    names = [f[0] for f in _columns(next(b for t, b in out if t == p.ROW_DESCRIPTION))]
    return [dict(zip(names, data_row_values(b))) for t, b in out if t == p.DATA_ROW]


def show_nodes(px) -> dict[str, dict]:
    """SHOW NODES on the admin console: node -> its row."""
    return {row["node"]: row for row in admin_show(px, "NODES")}


def _columns(body: bytes) -> list[tuple[str]]:
    (n,) = struct.unpack_from("!H", body, 0)
    pos, out = 2, []
    for _ in range(n):
        end = body.index(b"\x00", pos)
        out.append((body[pos:end].decode(),))
        pos = end + 1 + 18
    return out


def nodes_up(px) -> dict[str, str]:
    """node -> SHOW NODES's up column, once the monitor has seen every node up."""
    return wait_for(
        lambda: (up := {name: row["up"] for name, row in show_nodes(px).items()}) and all(v == "t" for v in up.values()) and up,
        20,
        "every node up in SHOW NODES",
    )


def pools_at_rest(px) -> bool:
    """No server connection busy and nobody waiting, in any pool (once every client has left)."""
    return all(row["busy"] == "0" and row["waiting"] == "0" for row in admin_show(px, "NODE_POOLS"))
