"""Helpers for integration tests: run pgtwist under twistd against a LocalCluster, poll, talk raw protocol.

Not a test module. Every wait here is bounded: sockets carry timeouts, subprocesses are
waited on with a limit, and conditions are polled against a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from pgtwist.auth import ScramClientExchange
from pgtwist.tools.localcluster import LocalCluster, free_port
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where the proxy process imports pgtwist and finds the twistd plugin from (default: this work tree).
PROXY_SOURCE = Path(os.environ.get("PGTWIST_PROXY_SOURCE") or REPO_ROOT)
HOST = "127.0.0.1"
DATABASE = "appdb"  # what clients ask for; the config maps it to cluster.app_database

# `python -m twisted.scripts.twistd` does nothing (that module has no __main__ block);
# this is what the `twistd` console script runs.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

# Proxies alive right now: conftest adds their log tails to failing tests' reports.
LIVE: list[RunningProxy] = []


class ProxyStartError(Exception):
    pass


# --------------------------------------------------------------------------- polling


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll *predicate* until it returns something truthy (returned); fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
        except Exception as e:  # noqa: BLE001 - remembered for the failure message
            last_error, result = e, None
        if result:
            return result
        if time.monotonic() >= deadline:
            note = f" (last error: {last_error!r})" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{note}")
        time.sleep(interval)


def clients_waiting(console, database: str = DATABASE) -> int:
    """SHOW POOLS' cl_waiting of *database* (every user added up), on a psycopg connection to the
    admin console: clients whose work waits in pgtwist for a server connection."""
    cur = console.execute("SHOW POOLS")
    names = [d.name for d in cur.description]
    at, db = names.index("cl_waiting"), names.index("database")
    return sum(row[at] for row in cur.fetchall() if row[db] == database)


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def rss_kib(pid: int) -> int:
    """VmRSS of *pid* in KiB (from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------- config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table ([metrics] listen = ...)
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def write_config(path: Path, top: dict[str, Any], databases: dict[str, dict], users: dict[str, dict]) -> None:
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in top.items()]
    for section, tables in (("databases", databases), ("users", users)):
        for name, table in tables.items():
            lines.append("")
            lines.append(f"[{section}.{_toml_key(name)}]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the proxy


class RunningProxy:
    """A pgtwist process under twistd: where it listens, its log, its pid."""

    def __init__(self, cluster: LocalCluster, process: subprocess.Popen, port: int, log_path: Path, config_path: Path):
        self.cluster = cluster
        self.process = process
        self.host = HOST
        self.port = port
        self.log_path = log_path
        self.config_path = config_path
        self.test_failed = False  # set by conftest when a test using it fails

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def user(self) -> str:
        return self.cluster.app_user

    @property
    def password(self) -> str:
        return self.cluster.app_password

    def dsn(self, **overrides: Any) -> str:
        """Keyword DSN for the app user through the proxy; overrides replace keys, None removes one."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "dbname": DATABASE,
            "user": self.cluster.app_user,
            "password": self.cluster.app_password,
            "connect_timeout": 10,
        }
        params.update(overrides)
        return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})

    def asyncpg_kwargs(self, **overrides: Any) -> dict[str, Any]:
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "database": DATABASE,
            "user": self.cluster.app_user,
            "password": self.cluster.app_password,
            "timeout": 10,
            "command_timeout": 30,
        }
        params.update(overrides)
        return {k: v for k, v in params.items() if v is not None}

    def connect(self, **overrides: Any) -> psycopg.Connection:
        """A psycopg connection through the proxy (autocommit unless told otherwise)."""
        autocommit = overrides.pop("autocommit", True)
        return psycopg.connect(self.dsn(**overrides), autocommit=autocommit)

    def log_text(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, wait (bounded), SIGKILL as a last resort; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode

    def __repr__(self) -> str:
        return f"<RunningProxy pid={self.pid} {self.host}:{self.port}>"


def proxy_config(cluster: LocalCluster, port: int, overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(top-level keys, databases, users) for a proxy in front of the cluster's primary."""
    overrides = dict(overrides)
    databases = overrides.pop("databases", None)
    if databases is None:
        databases = {DATABASE: {"dbname": overrides.pop("dbname", cluster.app_database), "nodes": [cluster.nodes[0].addr]}}
    users = overrides.pop("users", None)
    if users is None:
        users = {cluster.app_user: {"password": cluster.app_password}}
    # also_listen: addresses beyond the one the harness picks (and waits for), as listen's list.
    also_listen = overrides.pop("also_listen", [])
    listen = [f"{HOST}:{port}", *also_listen] if also_listen else f"{HOST}:{port}"
    top = {"listen": listen, "pool_size": 20, "auth_type": "scram-sha-256", **overrides}
    return top, databases, users


@contextmanager
def start_proxy(
    cluster: LocalCluster,
    tmp_path: Path,
    *,
    start_timeout: float = 20,
    check_log: bool = True,
    command_prefix: tuple[str, ...] = (),
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> Iterator[RunningProxy]:
    """Run `twistd -n pgbalance --config FILE` in front of *cluster*'s primary; stop it on exit.

    *command_prefix* runs twistd under another command that ends by exec'ing it (so the
    process the harness signals is still twistd), e.g. in a mount namespace of its own.

    *environ*: more environment variables for it (NOTIFY_SOCKET, say).

    *overrides* are config keys (``pool_size=1``...); ``databases=`` / ``users=`` replace
    those tables, ``dbname=`` changes the node database behind "appdb". With *check_log*, a
    traceback in the proxy's log fails the test when the block ends.
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    proxy = None
    for attempt in range(5):
        port = free_port(HOST)
        tag = f"{port}"
        config_path = tmp_path / f"pgtwist-{tag}.toml"
        log_path = tmp_path / f"pgtwist-{tag}.log"
        out_path = tmp_path / f"pgtwist-{tag}.out"
        write_config(config_path, *proxy_config(cluster, port, overrides))
        env = dict(os.environ)
        # The plugin (twisted/plugins/pgbalance.py) and the package resolve from the work tree.
        env["PYTHONPATH"] = os.pathsep.join([str(PROXY_SOURCE)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
        env.update(environ or {})
        with open(out_path, "wb") as out:
            process = subprocess.Popen(
                [*command_prefix, *TWISTD, "-n", "--pidfile=", f"--logfile={log_path}", "pgbalance", "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(tmp_path),
                start_new_session=True,
            )
        candidate = RunningProxy(cluster, process, port, log_path, config_path)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline and process.poll() is None and not port_accepts(HOST, port, 0.2):
            time.sleep(0.02)
        if process.poll() is None and port_accepts(HOST, port, 0.5):
            proxy = candidate
            break
        candidate.stop()
        output = out_path.read_text(errors="replace") + candidate.log_text()
        if "Address already in use" in output and attempt < 4:
            continue  # lost the race for the port: try another one
        raise ProxyStartError(
            f"pgtwist did not start listening on {HOST}:{port} within {start_timeout}s "
            f"(exit status {process.returncode}):\n{output[-4000:]}"
        )
    assert proxy is not None
    LIVE.append(proxy)
    failed = False
    try:
        yield proxy
    except BaseException:
        failed = True
        raise
    finally:
        LIVE.remove(proxy)
        status = proxy.stop()
        if failed or proxy.test_failed:
            sys.stderr.write(f"\n--- tail of {proxy.log_path} (exit status {status}) ---\n{proxy.log_tail()}\n")
    log = proxy.log_text()
    if check_log and ("Traceback (most recent call last)" in log or "Unhandled Error" in log):
        raise AssertionError(f"pgtwist logged an error:\n{log[-4000:]}")


# --------------------------------------------------------------------------- raw protocol client


class ServerError(Exception):
    """An ErrorResponse, with its fields."""

    def __init__(self, fields: dict[str, str]):
        super().__init__(f"{fields.get('S')} {fields.get('C')}: {fields.get('M')}")
        self.fields = fields
        self.sqlstate = fields.get("C")


class RawClient:
    """A blocking protocol-3 client over a plain socket, for what drivers will not send."""

    def __init__(self, host: str, port: int, timeout: float = 10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buffer = bytearray()
        self.parameters: dict[str, str] = {}
        self.backend_key: tuple[int, bytes] | None = None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, need: int) -> None:
        while len(self.buffer) < need:
            chunk = self.sock.recv(max(65536, need - len(self.buffer)))
            if not chunk:
                raise ConnectionError(f"connection closed by the proxy ({len(self.buffer)} bytes pending)")
            self.buffer += chunk

    def read_byte(self) -> int:
        self._fill(1)
        b = self.buffer[0]
        del self.buffer[:1]
        return b

    def read_message(self) -> tuple[int, bytes]:
        self._fill(5)
        msg_type = self.buffer[0]
        (length,) = struct.unpack_from("!I", self.buffer, 1)
        self._fill(1 + length)
        body = bytes(self.buffer[5 : 1 + length])
        del self.buffer[: 1 + length]
        return msg_type, body

    def wait_closed(self, timeout: float) -> bytes:
        """Read until the proxy closes the connection (within *timeout* s); returns what came before."""
        deadline = time.monotonic() + timeout
        data = bytes(self.buffer)
        self.buffer.clear()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the proxy did not close the connection within {timeout:g}s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk

    def startup(self, user: str, database: str, *, version: int = p.PROTOCOL_3_0, **params: str) -> None:
        self.send(m.startup_message({"user": user, "database": database, **params}, version))

    def login(self, user: str, database: str, password: str, *, version: int = p.PROTOCOL_3_0, **params: str) -> list[tuple[int, bytes]]:
        """Startup + authentication (SCRAM, md5 or cleartext) until ReadyForQuery; returns every message seen."""
        self.startup(user, database, version=version, **params)
        return self.authenticate(user, password)

    def authenticate(self, user: str, password: str, *, until_ok: bool = False) -> list[tuple[int, bytes]]:
        """Answer authentication requests until ReadyForQuery (or just AuthenticationOk with *until_ok*)."""
        seen = []
        scram = None
        while True:
            msg_type, body = self.read_message()
            seen.append((msg_type, body))
            if msg_type == p.ERROR_RESPONSE:
                raise ServerError(m.decode_fields(body))
            if msg_type == p.AUTHENTICATION:
                code, data = m.decode_authentication(body)
                if code == p.AUTH_SASL:
                    scram = ScramClientExchange(password=password)
                    mech = scram.mechanism(m.decode_sasl_mechanisms(data))
                    self.send(m.sasl_initial_response(mech, scram.first()))
                elif code == p.AUTH_SASL_CONTINUE:
                    self.send(m.password_message(scram.handle_server_first(data)))
                elif code == p.AUTH_SASL_FINAL:
                    scram.handle_server_final(data)
                elif code == p.AUTH_MD5_PASSWORD:
                    from pgtwist.auth import md5_hash, md5_salted_response

                    self.send(m.password_message(md5_salted_response(md5_hash(user, password), data[:4]) + b"\x00"))
                elif code == p.AUTH_CLEARTEXT_PASSWORD:
                    self.send(m.password_message(password.encode() + b"\x00"))
                elif code != p.AUTH_OK:
                    raise AssertionError(f"unexpected authentication request {code}")
                elif until_ok:
                    return seen
            elif msg_type == p.PARAMETER_STATUS:
                name, value = m.decode_parameter_status(body)
                self.parameters[name] = value
            elif msg_type == p.BACKEND_KEY_DATA:
                self.backend_key = m.decode_backend_key_data(body)
            elif msg_type == p.READY_FOR_QUERY:
                return seen

    def query(self, sql: str) -> list[tuple[int, bytes]]:
        """Simple query; returns the messages up to (excluding) ReadyForQuery; raises ServerError on error."""
        self.send(m.query(sql))
        out = []
        error = None
        while True:
            msg_type, body = self.read_message()
            if msg_type == p.READY_FOR_QUERY:
                if error is not None:
                    raise error
                return out
            if msg_type == p.ERROR_RESPONSE:
                error = ServerError(m.decode_fields(body))
            out.append((msg_type, body))

    def scalar(self, sql: str) -> str | None:
        for msg_type, body in self.query(sql):
            if msg_type == p.DATA_ROW:
                (n,) = struct.unpack_from("!H", body, 0)
                (length,) = struct.unpack_from("!i", body, 2)
                return None if length < 0 else body[6 : 6 + length].decode()
        raise AssertionError(f"no row from {sql!r}")


def error_fields_of(data: bytes) -> dict[str, str] | None:
    """The fields of the first ErrorResponse in *data* (raw bytes from the proxy), if there is one."""
    if len(data) >= 5 and data[0] == p.ERROR_RESPONSE:
        (length,) = struct.unpack_from("!I", data, 1)
        return m.decode_fields(data[5 : 1 + length])
    return None


# --------------------------------------------------------------------------- psql

PSQL_TIMEOUT = 20


def run_psql(conninfo: str, password: str, sql: str, *options: str, check: bool = True) -> subprocess.CompletedProcess:
    """psql -c *sql* on *conninfo*, unaligned; no PG* from the environment, the password only here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=password, PGCONNECT_TIMEOUT="10")
    proc = subprocess.run(
        ["psql", "-X", "-A", *options, "-v", "ON_ERROR_STOP=1", "-d", conninfo, "-c", sql],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=PSQL_TIMEOUT,
    )
    if check:
        assert proc.returncode == 0, f"psql failed ({proc.returncode}): {proc.stderr}"
    return proc


def psql(px, sql: str, *, check: bool = True, **dsn: Any) -> subprocess.CompletedProcess:
    """Run psql through the proxy as its app user, tuples only; *dsn* adds connection options."""
    return run_psql(px.dsn(password=None, **dsn), px.password, sql, "-t", check=check)
