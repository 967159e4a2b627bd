"""Throwaway local PostgreSQL clusters (primary + streaming replicas) for the demo, tests and benchmarks."""

from __future__ import annotations

import argparse
import atexit
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LocalCluster", "LocalClusterError", "Node", "find_bindir", "free_port"]

_INSTALL_HINT = (
    "install the Debian package postgresql "
    "(apt-get install postgresql postgresql-contrib), or run ./dev which does it"
)

# Every binary we call must live in the chosen bindir.
_REQUIRED = ("initdb", "pg_ctl", "postgres", "psql", "pg_basebackup")

# Unix socket paths are limited to sizeof(sun_path) - 1 == 107 bytes on Linux.
_MAX_SOCKET_PATH = 107

_CMD_TIMEOUT = 120  # seconds; a hard ceiling on any single binary we run


class LocalClusterError(Exception):
    """A local PostgreSQL cluster could not be created, driven or queried."""


# --------------------------------------------------------------------------- helpers


def _version_key(path: Path) -> tuple:
    # /usr/lib/postgresql/<version>/bin: sort "9.6" < "10" < "15" numerically.
    parts = re.findall(r"\d+", path.parent.name)
    return tuple(int(p) for p in parts) or (-1,)


def find_bindir() -> Path:
    """Return the directory holding the PostgreSQL server binaries (initdb, pg_ctl, ...).

    Tried in order: ``pg_config --bindir`` (if it has initdb), the highest
    ``/usr/lib/postgresql/*/bin`` with initdb, then the (symlink-resolved)
    directory of ``initdb`` on PATH.
    """
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True,
                check=True, timeout=30, stdin=subprocess.DEVNULL,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and (Path(out) / "initdb").is_file():
            return Path(out)

    candidates = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.is_file()]
    if candidates:
        return max(candidates, key=_version_key)

    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent

    raise LocalClusterError(
        "PostgreSQL server binaries not found (looked at `pg_config --bindir`, "
        "/usr/lib/postgresql/*/bin and initdb on PATH): " + _INSTALL_HINT
    )


def free_port(host: str = "127.0.0.1", low: int = 20000, high: int = 32767) -> int:
    """Return a random TCP port in [low, high] that can be bound on *host* right now.

    Stays below 32768 so it never collides with the kernel's ephemeral range
    (used for outgoing connections). There is an unavoidable race between this
    check and the server binding the port; callers retry on bind failure.
    """
    if not (0 < low <= high <= 32767):
        raise ValueError(f"port range must lie within 1..32767, got {low}..{high}")
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise LocalClusterError(f"no free TCP port found on {host} in {low}..{high}")


def _conf_quote(value: object) -> str:
    """Quote a value for postgresql.conf (any GUC accepts a single-quoted value)."""
    if isinstance(value, bool):
        value = "on" if value else "off"
    return "'" + str(value).replace("'", "''") + "'"


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _dsn_quote(value: object) -> str:
    s = str(value)
    if s and not re.search(r"[\s'\\]", s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


# --------------------------------------------------------------------------- model


@dataclass
class Node:
    """One PostgreSQL server of a LocalCluster."""

    name: str
    host: str
    port: int
    datadir: Path

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


_LIVE: dict[int, LocalCluster] = {}


@atexit.register
def _destroy_leftovers() -> None:
    # Safety net for clusters the caller forgot to destroy (e.g. an exception
    # between create() and a `with`). Only in the process that created them:
    # a forked child exiting must not tear down its parent's servers.
    for cluster in list(_LIVE.values()):
        if cluster._owner_pid == os.getpid():
            try:
                cluster.destroy()
            except Exception:  # pragma: no cover - best effort at exit
                pass


class LocalCluster:
    """A throwaway primary + N streaming replicas in a temp dir, on loopback ports below 32768, SCRAM everywhere."""

    superuser: str = "postgres"

    def __init__(
        self,
        *,
        base: Path,
        bindir: Path,
        app_user: str,
        app_password: str,
        app_database: str = "postgres",
        superuser_password: str,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.base = Path(base)
        self.bindir = Path(bindir)
        self.app_user = app_user
        self.app_password = app_password
        self.app_database = app_database
        self.superuser_password = superuser_password
        self.settings = dict(settings or {})
        self.nodes: list[Node] = []
        self._destroyed = False
        self._detached: dict[str, str] = {}  # replica name -> its primary_conninfo before detach()
        self._owner_pid = os.getpid()
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise LocalClusterError(
                    "running as root, and PostgreSQL refuses to run as root, but there is no "
                    "`postgres` OS user to run it as; create it with "
                    "`useradd --system --home /var/lib/postgresql --shell /bin/bash postgres` "
                    "(the Debian postgresql package does this), or run ./dev setup"
                ) from None

    # ------------------------------------------------------------------ create

    @classmethod
    def create(
        cls,
        replicas: int = 1,
        *,
        app_user: str = "app",
        app_password: str | None = None,
        app_database: str = "postgres",
        base: Path | None = None,
        settings: dict[str, str] | None = None,
        bindir: Path | None = None,
    ) -> LocalCluster:
        """Create and start a primary plus *replicas* streaming replicas.

        *base* defaults to a fresh ``/tmp/pgtwist-*`` directory; whatever it is,
        destroy() removes it (as root it must be reachable by the ``postgres``
        OS user). *settings* are appended to every node's postgresql.conf (they
        win over ours). An *app_database* other than "postgres" is created,
        owned by *app_user*.
        """
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        bindir = Path(bindir) if bindir is not None else find_bindir()
        missing = [b for b in _REQUIRED if not (bindir / b).is_file()]
        if missing:
            raise LocalClusterError(
                f"{bindir} lacks {', '.join(missing)}: " + _INSTALL_HINT
            )

        if base is None:
            base_path = Path(tempfile.mkdtemp(prefix="pgtwist-", dir="/tmp"))
        else:
            base_path = Path(base).absolute()
            base_path.mkdir(parents=True, exist_ok=True)
            os.chmod(base_path, 0o700)
        sock_probe = base_path / "sock" / ".s.PGSQL.32767.lock"
        if len(os.fsencode(str(sock_probe))) > _MAX_SOCKET_PATH:
            shutil.rmtree(base_path, ignore_errors=True)
            raise LocalClusterError(
                f"base directory {base_path} is too long for a unix socket path "
                f"(max {_MAX_SOCKET_PATH} bytes); use a shorter one"
            )

        try:
            self = cls(
                base=base_path,
                bindir=bindir,
                app_user=app_user,
                app_password=app_password or secrets.token_urlsafe(18),
                app_database=app_database,
                superuser_password=secrets.token_urlsafe(18),
                settings=settings,
            )
        except BaseException:
            shutil.rmtree(base_path, ignore_errors=True)
            raise
        _LIVE[id(self)] = self
        try:
            self._setup(replicas)
        except BaseException:
            self.destroy()
            raise
        return self

    def _setup(self, replicas: int) -> None:
        (self.base / "sock").mkdir(exist_ok=True)
        self._chown_tree(self.base)

        primary = Node("primary", "127.0.0.1", self._new_port(), self.base / "primary")
        self.nodes.append(primary)
        pwfile = self.base / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.superuser_password + "\n")
        self._chown(pwfile)
        try:
            self._run(
                [
                    "initdb", "-D", str(primary.datadir), "-U", self.superuser,
                    f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
                    "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync",
                ],
                what="initdb",
                node=primary,
            )
        finally:
            pwfile.unlink(missing_ok=True)

        (primary.datadir / "pg_hba.conf").write_text(
            "# written by pgtwist.tools.localcluster\n"
            "local   all          all                  trust\n"
            "host    all          all   127.0.0.1/32   scram-sha-256\n"
            "host    replication  all   127.0.0.1/32   scram-sha-256\n"
        )
        base_settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.base / "sock"),
            "password_encryption": "scram-sha-256",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "hot_standby": "on",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        self._append_conf(primary, {**base_settings, **self.settings}, "cluster settings")
        self._append_conf(primary, {"port": str(primary.port), "cluster_name": primary.name}, "node")
        self._start_fresh(primary)

        user, db = _sql_ident(self.app_user), _sql_ident(self.app_database)
        self.psql(
            primary,
            f"CREATE ROLE {user} LOGIN PASSWORD {_sql_literal(self.app_password)};\n"
            f"GRANT pg_monitor TO {user};\n",
        )
        if self.app_database != "postgres":
            self.psql(primary, f"CREATE DATABASE {db} OWNER {user};\n")
        self.psql(
            primary,
            f"GRANT CREATE ON SCHEMA public TO {user};\n",
            dbname=self.app_database,
        )

        for i in range(1, replicas + 1):
            self._add_replica(primary, f"replica{i}")

    def _add_replica(self, primary: Node, name: str) -> Node:
        node = Node(name, "127.0.0.1", self._new_port(), self.base / name)
        self.nodes.append(node)
        self._run(
            [
                "pg_basebackup", "-h", primary.host, "-p", str(primary.port),
                "-U", self.superuser, "-D", str(node.datadir),
                "-R", "-c", "fast", "-X", "stream", "--no-sync",
            ],
            what=f"pg_basebackup for {name}",
            node=node,
            password=self.superuser_password,
        )
        # Later settings win: override the primary's port and name.
        self._append_conf(node, {"port": str(node.port), "cluster_name": node.name}, "node")
        self._start_fresh(node)
        self._wait(
            lambda: self.psql(
                node,
                "SELECT pg_is_in_recovery() AND EXISTS "
                "(SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')",
            ) == "t",
            timeout=60,
            what=f"{name} to stream from {primary.name}",
            node=node,
        )
        return node

    def _start_fresh(self, node: Node) -> None:
        """Start a node that was just created; on a port clash pick another port."""
        for attempt in range(5):
            try:
                self.start(node)
                return
            except LocalClusterError:
                log = _tail(self._logfile(node), 15)
                if attempt == 4 or "could not bind" not in log and "already in use" not in log:
                    raise
            node.port = self._new_port()
            self._append_conf(node, {"port": str(node.port)}, "port retry")

    def _new_port(self) -> int:
        used = {n.port for n in self.nodes}
        while True:
            port = free_port()
            if port not in used:
                return port

    # ------------------------------------------------------------------ plumbing

    def _logfile(self, node: Node) -> Path:
        return self.base / f"{node.name}.log"

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def _chown_tree(self, root: Path) -> None:
        if self._run_as is None:
            return
        self._chown(root)
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                os.chown(os.path.join(dirpath, n), self._run_as.pw_uid, self._run_as.pw_gid,
                         follow_symlinks=False)

    def _append_conf(self, node: Node, settings: dict[str, str], label: str) -> None:
        lines = [f"\n# pgtwist.tools.localcluster: {label}\n"]
        lines += [f"{k} = {_conf_quote(v)}\n" for k, v in settings.items()]
        with open(node.datadir / "postgresql.conf", "a") as f:
            f.writelines(lines)

    def _env(self, password: str | None) -> dict[str, str]:
        # Start from our environment minus anything libpq would pick up.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["PGPASSFILE"] = str(self.base / "no-such-pgpass")  # never read ~/.pgpass
        env["PGCONNECT_TIMEOUT"] = "10"
        env["PGSSLMODE"] = "disable"
        if password is not None:
            env["PGPASSWORD"] = password
        if self._run_as is not None:
            env["HOME"] = self._run_as.pw_dir
            env["USER"] = env["LOGNAME"] = self._run_as.pw_name
        return env

    def _scrub(self, text: str) -> str:
        for secret in (self.superuser_password, self.app_password):
            if secret:
                text = text.replace(secret, "********")
        return text

    def _run(
        self,
        argv: list[str],
        *,
        what: str,
        node: Node | None = None,
        password: str | None = None,
        input: str | None = None,
        timeout: float = _CMD_TIMEOUT,
        ok_codes: tuple[int, ...] = (0,),
        new_session: bool = False,
    ) -> subprocess.CompletedProcess:
        argv = [str(self.bindir / argv[0]), *argv[1:]]
        kwargs: dict = {}
        if self._run_as is not None:
            kwargs.update(
                user=self._run_as.pw_uid,
                group=self._run_as.pw_gid,
                extra_groups=os.getgrouplist(self._run_as.pw_name, self._run_as.pw_gid),
            )
        try:
            proc = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=self._env(password),
                cwd=str(self.base) if self.base.is_dir() else "/",
                timeout=timeout,
                start_new_session=new_session,
                **kwargs,
            )
        except subprocess.TimeoutExpired:
            raise LocalClusterError(
                self._scrub(f"{what}: timed out after {timeout}s" + self._log_note(node))
            ) from None
        except OSError as e:
            raise LocalClusterError(f"{what}: could not run {argv[0]}: {e}") from None
        if proc.returncode not in ok_codes:
            detail = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
            raise LocalClusterError(
                self._scrub(
                    f"{what} failed (exit {proc.returncode}): {detail}" + self._log_note(node)
                )
            )
        return proc

    def _log_note(self, node: Node | None) -> str:
        if node is None:
            return ""
        tail = _tail(self._logfile(node))
        return f"\n--- tail of {self._logfile(node)} ---\n{tail}" if tail else ""

    def _wait(self, predicate, *, timeout: float, what: str, node: Node | None = None) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            try:
                if predicate():
                    return
            except LocalClusterError as e:
                last_error = e
            if time.monotonic() >= deadline:
                msg = f"timed out after {timeout}s waiting for {what}"
                if last_error is not None:
                    msg += f" (last error: {last_error})"
                raise LocalClusterError(self._scrub(msg + self._log_note(node)))
            time.sleep(0.05)

    # ------------------------------------------------------------------ public API

    def start(self, node: Node) -> None:
        """Start *node* (pg_ctl start -w); its log goes to <base>/<name>.log."""
        self._run(
            ["pg_ctl", "start", "-w", "-t", "60", "-D", str(node.datadir),
             "-l", str(self._logfile(node))],
            what=f"starting {node.name}",
            node=node,
            new_session=True,  # keep Ctrl-C on our terminal away from the postmaster
        )

    def is_running(self, node: Node) -> bool:
        if not node.datadir.is_dir():
            return False
        proc = self._run(["pg_ctl", "status", "-D", str(node.datadir)],
                         what=f"status of {node.name}", ok_codes=(0, 3, 4))
        return proc.returncode == 0

    def stop(self, node: Node, mode: str = "fast") -> None:
        """Stop *node*; mode "immediate" simulates a crash. No-op if it is not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad shutdown mode {mode!r}")
        if not self.is_running(node):
            return
        self._run(
            ["pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(node.datadir)],
            what=f"stopping {node.name} ({mode})",
            node=node,
        )

    def promote(self, node: Node) -> None:
        """Promote a replica to primary and wait until it accepts writes."""
        self._run(
            ["pg_ctl", "promote", "-w", "-t", "60", "-D", str(node.datadir)],
            what=f"promoting {node.name}",
            node=node,
        )

    def follow(self, node: Node, upstream: Node) -> None:
        """Point replica *node*'s WAL receiver at *upstream* (after a failover); no restart needed.

        With recovery_target_timeline = 'latest' (the default) the replica then follows
        *upstream*'s newer timeline, provided it has not replayed past the fork.
        """
        conninfo = self.psql(node, "SHOW primary_conninfo") or self._detached.pop(node.name, "")
        if not re.search(r"\bport=\d+", conninfo):
            raise LocalClusterError(f"{node.name}: no port in primary_conninfo")
        conninfo = re.sub(r"\bport=\d+", f"port={upstream.port}", conninfo)
        self.psql(node, f"ALTER SYSTEM SET primary_conninfo = {_sql_literal(conninfo)};\nSELECT pg_reload_conf();")

    def detach(self, node: Node) -> None:
        """Stop replica *node*'s WAL receiver (an empty primary_conninfo): it stays a replica that
        follows nothing, as one whose upstream is gone. follow() attaches it again."""
        self._detached[node.name] = self.psql(node, "SHOW primary_conninfo")
        self.psql(node, "ALTER SYSTEM SET primary_conninfo = '';\nSELECT pg_reload_conf();")

    def postgres_pids(self, node: Node) -> list[int]:
        """The postmaster's pid, then those of its children (backends, walsender, background workers)."""
        try:
            postmaster = int((node.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return []
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")".
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster] + sorted(children)

    def freeze(self, node: Node) -> None:
        """SIGSTOP *node*'s postmaster and every one of its processes: a hung server (it still
        accepts TCP connections in the kernel's backlog, and answers nothing)."""
        pids = self.postgres_pids(node)
        if not pids:
            raise LocalClusterError(f"{node.name} is not running")
        os.kill(pids[0], signal.SIGSTOP)  # first: it forks no new backend meanwhile
        for pid in self.postgres_pids(node)[1:]:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass

    def thaw(self, node: Node) -> None:
        """SIGCONT what freeze() stopped (its children first, the postmaster last)."""
        pids = self.postgres_pids(node)
        for pid in pids[1:] + pids[:1]:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def psql(
        self,
        node: Node,
        sql: str,
        *,
        user: str | None = None,
        password: str | None = None,
        dbname: str | None = None,
    ) -> str:
        """Run *sql* with psql over TCP and return its unaligned, tuples-only output, stripped.

        Defaults to the superuser on the "postgres" database. Statements run
        one by one (psql script mode); the first error raises LocalClusterError.
        """
        user = user or self.superuser
        if password is None:
            if user == self.superuser:
                password = self.superuser_password
            elif user == self.app_user:
                password = self.app_password
        proc = self._run(
            ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
             "-h", node.host, "-p", str(node.port), "-U", user,
             "-d", dbname or "postgres", "-f", "-"],
            what=f"psql on {node.name}",
            password=password,
            input=sql if sql.endswith("\n") else sql + "\n",
            timeout=300,
        )
        return proc.stdout.strip()

    def wait_replicas_caught_up(self, timeout: float = 30) -> None:
        """Wait until every running replica has replayed all WAL the primary has so far.

        The primary is the first running node not in recovery; replicas are the
        running nodes in recovery. Uses pg_current_wal_insert_lsn() rather than
        pg_current_wal_lsn(): with synchronous_commit=off a just-committed
        transaction may not have been written out yet.
        """
        running = [n for n in self.nodes if self.is_running(n)]
        state = {n.name: self.psql(n, "SELECT pg_is_in_recovery()") == "t" for n in running}
        primaries = [n for n in running if not state[n.name]]
        replicas = [n for n in running if state[n.name]]
        if not replicas:
            return
        if not primaries:
            raise LocalClusterError("no running primary to catch up with")
        target = self.psql(primaries[0], "SELECT pg_current_wal_insert_lsn()")
        deadline = time.monotonic() + timeout
        for r in replicas:
            self._wait(
                lambda r=r: self.psql(
                    r, f"SELECT coalesce(pg_last_wal_replay_lsn() >= '{target}'::pg_lsn, false)"
                ) == "t",
                timeout=max(0.0, deadline - time.monotonic()),
                what=f"{r.name} to replay up to {target}",
                node=r,
            )

    def dsn(self, node: Node, **overrides: object) -> str:
        """Keyword DSN for the app user on *node*; overrides replace (None removes) keys."""
        params: dict[str, object] = {
            "host": node.host,
            "port": node.port,
            "dbname": self.app_database,
            "user": self.app_user,
            "password": self.app_password,
        }
        params.update(overrides)
        return " ".join(f"{k}={_dsn_quote(v)}" for k, v in params.items() if v is not None)

    def destroy(self) -> None:
        """Stop every node (immediate if fast fails, SIGKILL as a last resort) and remove base. Idempotent."""
        if self._destroyed:
            return
        for node in self.nodes:
            try:
                self.stop(node, "fast")
                continue
            except LocalClusterError:
                pass
            try:
                self.stop(node, "immediate")
                continue
            except LocalClusterError:
                pass
            self._kill_postmaster(node)
        shutil.rmtree(self.base, ignore_errors=True)
        self._destroyed = True
        _LIVE.pop(id(self), None)

    def _kill_postmaster(self, node: Node) -> None:
        try:
            pid = int((node.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.05)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        nodes = ", ".join(f"{n.name}@{n.addr}" for n in self.nodes)
        return f"<LocalCluster {self.base} [{nodes}]>"


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pgtwist.tools.localcluster",
        description="Start a throwaway PostgreSQL primary + replicas; Ctrl-C destroys it.",
    )
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--app-user", default="app")
    parser.add_argument("--app-password", default=None)
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    try:
        cluster = LocalCluster.create(
            args.replicas, app_user=args.app_user, app_password=args.app_password
        )
    except LocalClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # SIGTERM (and SIGINT even if inherited as ignored) behave like Ctrl-C,
    # so the cluster is always cleaned up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        print(f"cluster in {cluster.base} (created in {time.monotonic() - t0:.1f}s)")
        for node in cluster.nodes:
            print(f"{node.name:>10}: {cluster.dsn(node)}")
        print(f"superuser: user={cluster.superuser} password={cluster.superuser_password}")
        print("Ctrl-C to stop and remove it.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\ndestroying...", file=sys.stderr)
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
