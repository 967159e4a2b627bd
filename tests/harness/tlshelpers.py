"""Helpers for the TLS integration tests (not a test module): a throwaway PKI, [tls] tables, raw TLS clients.

Every wait is bounded: sockets carry timeouts, subprocesses run with a limit.
"""

from __future__ import annotations

import os
import pwd
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgtwist.tools import testcerts
from pgtwist.tools.localcluster import LocalCluster

from . import proxy as proxymod
from .proxy import RawClient

SUBPROCESS_TIMEOUT = 20


@dataclass
class Pki:
    """Where the throwaway certificates are (all PEM; keys 0600)."""

    dir: Path
    ca: Path  # signs pgtwist's certificate and the clients'
    server_cert: Path  # pgtwist's: DNS localhost, IP 127.0.0.1
    server_key: Path
    client_cert: Path  # CN = the app user
    client_key: Path
    stranger_cert: Path  # CN = someone else, signed by ca
    stranger_key: Path
    nodes_ca: Path  # signs the node's certificate and pgtwist's client certificate for nodes
    node_cert: Path  # the node's: DNS localhost only (no IP)
    node_key: Path
    proxy_client_cert: Path  # pgtwist's certificate towards the nodes, CN pgtwist
    proxy_client_key: Path
    other_ca: Path  # trusts nothing here


def make_pki(directory: Path, app_user: str) -> Pki:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = testcerts.make_ca("pgtwist test CA")
    nodes_ca = testcerts.make_ca("pgtwist test nodes CA")
    other_ca = testcerts.make_ca("some other CA")
    for name, issued in (("ca", ca), ("nodes-ca", nodes_ca), ("other-ca", other_ca)):
        (directory / f"{name}.crt").write_bytes(issued.cert_pem)
    server = testcerts.issue(ca, "localhost", dns=("localhost",), ips=("127.0.0.1",)).write(directory, "server")
    client = testcerts.issue(ca, app_user, client=True).write(directory, "client")
    stranger = testcerts.issue(ca, "stranger", client=True).write(directory, "stranger")
    node = testcerts.issue(nodes_ca, "localhost", dns=("localhost",)).write(directory, "node")
    proxy_client = testcerts.issue(nodes_ca, "pgtwist", client=True).write(directory, "proxy-client")
    return Pki(
        directory,
        directory / "ca.crt",
        *server,
        *client,
        *stranger,
        directory / "nodes-ca.crt",
        *node,
        *proxy_client,
        directory / "other-ca.crt",
    )


@contextmanager
def tls_cluster(pki: Pki, replicas: int = 0) -> Iterator[LocalCluster]:
    """A primary with ssl = on, its certificate from pki.nodes_ca, client certificates from there accepted.

    PostgreSQL wants its key owned by the user it runs as (postgres, under root) with mode 0600:
    the node's files get a copy in a directory of their own.
    """
    node_dir = Path(tempfile.mkdtemp(prefix="pgtwist-nodetls-", dir="/tmp"))
    owner = None
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        owner = (pw.pw_uid, pw.pw_gid)
    try:
        for src in (pki.node_cert, pki.node_key, pki.nodes_ca):
            dst = node_dir / src.name
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o600)
            if owner:
                os.chown(dst, *owner)
        if owner:
            os.chown(node_dir, *owner)
        os.chmod(node_dir, 0o700)
        settings = {
            "ssl": "on",
            "ssl_cert_file": str(node_dir / pki.node_cert.name),
            "ssl_key_file": str(node_dir / pki.node_key.name),
            "ssl_ca_file": str(node_dir / pki.nodes_ca.name),
        }
        with LocalCluster.create(replicas=replicas, settings=settings) as cluster:
            yield cluster
    finally:
        shutil.rmtree(node_dir, ignore_errors=True)


def _table(name: str, values: dict[str, Any]) -> list[str]:
    return ["", f"[{name}]"] + [f"{k} = {proxymod._toml_value(str(v) if isinstance(v, Path) else v)}" for k, v in values.items()]


@contextmanager
def start_tls_proxy(
    cluster: LocalCluster,
    tmp_path: Path,
    *,
    tls: dict[str, Any] | None = None,
    server_tls: dict[str, Any] | None = None,
    node_host: str | None = None,
    **overrides: Any,
) -> Iterator[proxymod.RunningProxy]:
    """proxymod.start_proxy plus [tls] / [server_tls] tables; *node_host* replaces the node's host as written in nodes."""
    if node_host is not None and "databases" not in overrides:
        node = cluster.nodes[0]
        overrides["databases"] = {
            proxymod.DATABASE: {"dbname": cluster.app_database, "nodes": [f"{node_host}:{node.port}"]}
        }
    original = proxymod.write_config

    def write_config(path, top, databases, users):
        original(path, top, databases, users)
        extra = []
        if tls is not None:
            extra += _table("tls", tls)
        if server_tls is not None:
            extra += _table("server_tls", server_tls)
        with open(path, "a") as f:
            f.write("\n".join(extra) + "\n")

    proxymod.write_config = write_config  # start_proxy looks it up at call time
    try:
        with proxymod.start_proxy(cluster, tmp_path, **overrides) as px:
            proxymod.write_config = original
            yield px
    finally:
        proxymod.write_config = original


# --------------------------------------------------------------------------- clients


def s_client(port: int, *args: str) -> subprocess.CompletedProcess:
    """`openssl s_client -starttls postgres` against 127.0.0.1:port; its output (stdout + stderr)."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-starttls", "postgres", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


def direct_tls_client(px, ca: Path, *, alpn: list[str] | None = ("postgresql",), **context: Any) -> RawClient:
    """A RawClient that starts with a TLS ClientHello (sslnegotiation=direct), no SSLRequest."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if "cert" in context:
        ctx.load_cert_chain(str(context["cert"]), str(context["key"]))
    client = RawClient(px.host, px.port)
    client.sock = ctx.wrap_socket(client.sock, server_hostname="localhost")
    return client


def starttls_client(px, ca: Path) -> RawClient:
    """A RawClient after SSLRequest, 'S' and a verified handshake (sslnegotiation=postgres)."""
    from pgtwist.wire import messages as m

    client = RawClient(px.host, px.port)
    client.send(m.ssl_request())
    assert client.sock.recv(1) == b"S"
    ctx = ssl.create_default_context(cafile=str(ca))
    client.sock = ctx.wrap_socket(client.sock, server_hostname="localhost")
    return client

