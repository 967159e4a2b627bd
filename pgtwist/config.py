"""Configuration: TOML -> frozen objects; validation reports every error with its key path."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pgtwist.auth import Credential
from pgtwist.auth.userlist import UserlistError, parse_userlist

POOL_MODES = ("session", "transaction")
AUTH_TYPES = ("trust", "md5", "scram-sha-256", "cert")
TLS_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")  # [tls]: clients
SERVER_TLS_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")  # [server_tls]: nodes
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
# TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3 suites are OpenSSL's, all modern).
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!DSS"


class ConfigError(Exception):
    """Every problem found in one config, each as 'key.path: what is wrong'."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s):\n  " + "\n  ".join(errors))


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    # Addresses key pools and per-node counters on every transaction, and name a pool at every
    # login: hash and spell once.
    def __post_init__(self):
        object.__setattr__(self, "_hash", hash((self.host, self.port)))
        object.__setattr__(self, "_str", f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}")

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return self._str


@dataclass(frozen=True)
class DatabaseConfig:
    name: str  # what clients put in dbname
    dbname: str  # the database on the nodes
    nodes: tuple[Address, ...]
    pool_size: int
    route: str = "auto"  # "auto" | "primary" | "replica": where this database's work may go
    pool_mode: str | None = None  # PgBouncer's database pool_mode=: over the global one (None: that)
    max_db_connections: int = 0  # server connections of all this database's pools (0: no limit)
    reserve_pool_size: int = 0  # extra connections per pool for clients waiting reserve_pool_timeout
    # Of INHERITED, the settings this table did not give, so took from the top level: a SET of
    # that top-level setting on the admin console changes them here too (PgBouncer's
    # default_pool_size is so). Not a setting of its own: SHOW CONFIG and reload diffs skip it.
    inherited: frozenset = field(default=frozenset(), compare=False)


# Database settings that default to the top-level setting of the same name.
INHERITED = ("pool_size", "max_db_connections", "reserve_pool_size")


@dataclass(frozen=True)
class TlsConfig:
    """[tls]: TLS between clients and pgtwist, with pgtwist's own certificate. Paths are absolute."""

    mode: str = "disable"
    cert: str | None = None
    key: str | None = None
    ca: str | None = None  # CAs trusted for client certificates
    ciphers: str = DEFAULT_CIPHERS
    min_protocol_version: str = "TLSv1.2"


@dataclass(frozen=True)
class ServerTlsConfig:
    """[server_tls]: TLS between pgtwist and the nodes, verified separately. Paths are absolute."""

    mode: str = "disable"
    ca: str | None = None  # CAs trusted for the nodes' certificates
    cert: str | None = None  # optional client certificate for the nodes
    key: str | None = None
    ciphers: str = DEFAULT_CIPHERS
    min_protocol_version: str = "TLSv1.2"


@dataclass(frozen=True)
class UserConfig:
    name: str
    # None: a table of settings only (pool_mode, route, limits) for a user auth_query looks up,
    # as PgBouncer's [users] section holds them apart from secrets.
    credential: Credential | None = field(repr=False)
    route: str = "auto"  # "auto" | "primary" | "replica"
    pool_mode: str | None = None  # PgBouncer's user pool_mode=: over the database's and the global one
    max_user_connections: int = 0  # server connections of all this user's pools (0: no limit)


@dataclass(frozen=True)
class ManholeConfig:
    """[manhole]: the SSH Python REPL (public keys only)."""

    listen: Address
    authorized_keys: str  # absolute path, OpenSSH authorized_keys format
    host_key: str  # absolute path; generated (0600) on first start when missing
    allow_remote: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: Prometheus /metrics and the /healthz and /readyz probes over HTTP."""

    listen: Address


@dataclass(frozen=True)
class Config:
    # The file's `listen` (one "host:port" or a list; PgBouncer's listen_addr) is stored here whole;
    # `listen` below is its first address, derived, so that the two can never disagree.
    listen_addresses: tuple[Address, ...]
    pool_mode: str
    pool_size: int
    max_client_conn: int
    auth_type: str
    server_reset_query: str
    server_connect_timeout: float
    client_login_timeout: float
    query_wait_timeout: float
    max_message_size: int
    max_prepared_statements: int
    idle_transaction_timeout: float
    server_idle_timeout: float
    server_lifetime: float
    min_pool_size: int
    unpoolable: str
    health_check_interval: float
    health_check_timeout: float
    health_user: str
    max_replica_lag: int
    max_replica_delay: float
    read_your_writes: bool
    read_only_functions: frozenset
    failover_wait: float
    failover_timeout: float
    auto_promote: bool
    routing_hook: str
    databases: Mapping[str, DatabaseConfig]
    users: Mapping[str, UserConfig] = field(repr=False)
    source: str = "<memory>"
    tls: TlsConfig = field(default_factory=TlsConfig)
    server_tls: ServerTlsConfig = field(default_factory=ServerTlsConfig)
    # Operations: shutdown, logs, audit, admin console, manhole, metrics (all optional).
    shutdown_timeout: float = 30.0
    log_format: str = "text"
    log_connections: bool = True  # PgBouncer's names: a log line per client login / logout
    log_disconnections: bool = True
    # [logs, admin console] PgBouncer's log_pooler_errors (server login failures, errors pgtwist sends) and a level.
    log_pooler_errors: bool = True
    log_level: str = "info"
    stats_period: float = 60.0  # PgBouncer's: SHOW STATS' avg_* columns describe the last such period
    audit: tuple[str, ...] = ()
    admin_users: tuple[str, ...] = ()
    manhole: ManholeConfig | None = None
    metrics: MetricsConfig | None = None
    # What is already in flight on a node that stops answering (a hung or unreachable host).
    query_timeout: float = 0.0
    tcp_keepalive: bool = True
    # PgBouncer's tcp_defer_accept (on by default on Linux, as there): a client's connection is
    # accepted once its first bytes arrive, and read in the same reactor turn.
    tcp_defer_accept: bool = True
    tcp_keepidle: int = 0
    tcp_keepintvl: int = 0
    tcp_keepcnt: int = 0
    # Transaction pooling, when a client's server connection dies under it: "keep_session" (the
    # client gets the node's error and goes on) or "close_client" (PgBouncer's way).
    on_server_loss: str = "keep_session"
    # PgBouncer's auth_file (absolute path; "" = none): users and secrets merged into users.
    auth_file: str = ""
    # Sockets: the directory of a Unix socket .s.PGSQL.<first listen port> ("" = none) and its
    # mode, how long a node's resolved host name is kept (PgBouncer's dns_max_ttl).
    unix_socket_dir: str = ""
    unix_socket_mode: int = 0o777
    dns_max_ttl: float = 15.0
    # -- auth_query (PgBouncer's names): users with no secret here log in with the verifier
    # PostgreSQL stores, looked up by auth_query as auth_user ("" = off); see _auth_query().
    auth_user: str = ""
    auth_query: str = ""
    auth_dbname: str = ""  # where auth_query runs ("" = the database the client asked for)
    auth_cache_ttl: float = 0.0  # how long a looked-up secret (or its absence) is reused
    # -- limits (PgBouncer's names; see _limits()): per database / per user tables override these.
    max_db_connections: int = 0
    max_user_connections: int = 0  # (also what users auth_query lets in get)
    reserve_pool_size: int = 0
    reserve_pool_timeout: float = 5.0
    # -- timeouts on reuse and idleness (PgBouncer's names; see _limits())
    client_idle_timeout: float = 0.0  # a logged-in client silent this long between transactions is closed (0: never)
    server_check_query: str = "SELECT 1"  # run on an idle server connection before reuse ("" = never)
    server_check_delay: float = 30.0  # ... when it was idle at least this long (0: before every reuse)

    @property
    def listen(self) -> Address:
        """The first listen address: the one the supervisor's workers share, the Unix socket's port."""
        return self.listen_addresses[0]

    def pool_mode_for(self, database: str, user: str) -> str:
        """The pool_mode a client of *user* on *database* gets: the user's, else the database's, else the global one
        (PgBouncer's precedence). One (database, user) has one mode, so a pool never mixes them."""
        entry = self.users.get(user)
        if entry is not None and entry.pool_mode is not None:
            return entry.pool_mode
        db = self.databases.get(database)
        if db is not None and db.pool_mode is not None:
            return db.pool_mode
        return self.pool_mode
    # Processes sharing the listen address, each with its own pools (pgtwist.service.workers);
    # "auto" in the file is resolved here to the cores this process may run on.
    workers: int = 1
    # What --check reports without refusing, and start-up and reload log: parts that load but can
    # never serve (an auth_file line no login can use). Not a setting: never compared or shown.
    warnings: tuple[str, ...] = field(default=(), compare=False)


_DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:6432",
    "pool_mode": "session",
    "pool_size": 20,
    "max_client_conn": 10000,
    "auth_type": "scram-sha-256",
    "server_reset_query": "DISCARD ALL",
    "server_connect_timeout": 5.0,
    "client_login_timeout": 60.0,
    "query_wait_timeout": 120.0,
    "max_message_size": 256 * 1024 * 1024,
    "max_prepared_statements": 100,
    "idle_transaction_timeout": 0.0,
    "server_idle_timeout": 600.0,
    "server_lifetime": 3600.0,
    "min_pool_size": 0,
    "unpoolable": "pin",
    "health_check_interval": 1.0,
    "health_check_timeout": 2.0,
    "health_user": "",
    "max_replica_lag": 16 * 1024 * 1024,
    "max_replica_delay": 30.0,
    "read_your_writes": True,
    "read_only_functions": [],
    "failover_wait": 10.0,
    "failover_timeout": 10.0,
    "auto_promote": False,
    "routing_hook": "",
    "query_timeout": 0.0,
    "tcp_keepalive": True,
    "tcp_defer_accept": True,
    "tcp_keepidle": 0,
    "tcp_keepintvl": 0,
    "tcp_keepcnt": 0,
    "on_server_loss": "keep_session",
    "unix_socket_dir": "",
    "unix_socket_mode": 0o777,
    "dns_max_ttl": 15.0,
}
# Linux's bounds for TCP_KEEPIDLE / TCP_KEEPINTVL (seconds) and TCP_KEEPCNT (probes).
_KEEPALIVE_MAX = {"tcp_keepidle": 32767, "tcp_keepintvl": 32767, "tcp_keepcnt": 127}
ROUTES = ("auto", "primary", "replica")
UNPOOLABLE = ("pin", "error")
SERVER_LOSS = ("keep_session", "close_client")

_AUTH_QUERY_KEYS = {"auth_user", "auth_query", "auth_dbname", "auth_cache_ttl"}
_LIMIT_KEYS = {
    "max_db_connections",
    "max_user_connections",
    "reserve_pool_size",
    "reserve_pool_timeout",
    "client_idle_timeout",
    "server_check_query",
    "server_check_delay",
}
_OPERATIONS_KEYS = {"shutdown_timeout", "log_format", "log_connections", "log_disconnections", "audit", "admin", "manhole", "metrics"}
_OPERATIONS_KEYS |= {"log_pooler_errors", "log_level", "stats_period"}  # logs (kept apart: others edit the set above)
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
_TOP_KEYS = set(_DEFAULTS) | {"databases", "users", "tls", "server_tls", "auth_file", "workers"} | _OPERATIONS_KEYS | _AUTH_QUERY_KEYS | _LIMIT_KEYS
_TLS_KEYS = {"mode", "cert", "key", "ca", "ciphers", "min_protocol_version"}
_DATABASE_KEYS = {"dbname", "nodes", "pool_size", "route", "pool_mode", "max_db_connections", "reserve_pool_size"}
_USER_KEYS = {"password", "route", "pool_mode", "max_user_connections"}


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


def _can_be_host(host: str) -> bool:
    """An IP literal, a DNS name (labels of letters, digits, "-" and "_", 253 bytes at most), a
    directory holding a node's Unix socket ("/var/run/postgresql", as libpq takes it), or "*"
    (listen: every interface)."""
    if host == "*" or (host.startswith("/") and "\0" not in host):
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    # An all-digit last label is a mistyped IPv4 address ("10.0.0.256"), never a DNS name (RFC 3696).
    return 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def parse_address(text: str, default_port: int = 5432) -> Address:
    """'host:port', '[v6]:port' or bare 'host' -> Address; ValueError on nonsense."""
    if not isinstance(text, str) or not text:
        raise ValueError("expected 'host:port'")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"expected '[host]' or '[host]:port' in {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not _can_be_host(host):
        # Caught here rather than as a node "down" forever or a listener that never binds.
        raise ValueError(f"{host!r} cannot be a host name or IP address")
    if port_text is not None and not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"invalid port in {text!r}")  # int() would take ' 5432', '+5432', '5_432'
    port = int(port_text) if port_text is not None else default_port
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return Address(host, port)


def _listen_addresses(c, value) -> tuple[Address, ...]:
    """listen: one "host:port" or a list of them ("*:6432" is every interface, IPv4 and IPv6)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        c.err("listen", "expected 'host:port' or a non-empty list of them")
        return (parse_address(_DEFAULTS["listen"]),)
    out = []
    for i, text in enumerate(texts):
        path = "listen" if isinstance(value, str) else f"listen[{i}]"
        try:
            address = parse_address(text, 6432)
        except ValueError as e:
            c.err(path, str(e))
            continue
        if address.host.startswith("/"):
            c.err(path, "a Unix socket is set with unix_socket_dir, not listen")
        elif address in out:
            c.err(path, f"{address} is listed twice")
        else:
            out.append(address)
    return tuple(out) or (parse_address(_DEFAULTS["listen"]),)


def _sockets(c, raw) -> dict:
    directory = raw.get("unix_socket_dir", "")
    if not isinstance(directory, str) or (directory and not os.path.isabs(directory)):
        c.err("unix_socket_dir", f"must be an absolute directory path, not {directory!r}")
        directory = ""
    elif directory and not os.path.isdir(directory):
        c.err("unix_socket_dir", f"{directory} is not a directory")
    mode = raw.get("unix_socket_mode", 0o777)
    if isinstance(mode, str) and mode.isascii() and mode.isdigit():
        mode = int(mode, 8)  # "0770", as PgBouncer writes it
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
        c.err("unix_socket_mode", f"must be a permission mode like \"0770\" or 0o770, not {mode!r}")
        mode = 0o777
    ttl = c.number(raw, "dns_max_ttl", "dns_max_ttl", float, 15.0, 0.0)
    return {"unix_socket_dir": directory, "unix_socket_mode": mode, "dns_max_ttl": ttl}


class _Checker:
    def __init__(self):
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def err(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    def number(self, raw: Mapping, key: str, path: str, kind: type, default, minimum, maximum=None):
        value = raw.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is float and not math.isfinite(value)):
            # (TOML has nan and inf: reactor.callLater(nan) fails its assertion at every use.)
            self.err(path, f"must be {'an integer' if kind is int else 'a finite number'}, not {value!r}")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            self.err(path, f"must be {bounds}, not {value!r}")
            return default
        return value

    def choice(self, raw: Mapping, key: str, choices, default):
        value = raw.get(key, default)
        if value not in choices:
            self.err(key, f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
            return default
        return value

    def unknown(self, raw: Mapping, allowed: set[str], prefix: str) -> None:
        for key in raw:
            if key not in allowed:
                self.err(f"{prefix}{key}", "unknown key")


def from_dict(raw: Mapping[str, Any], source: str = "<memory>") -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    c = _Checker()
    c.unknown(raw, _TOP_KEYS, "")
    listen_addresses = _listen_addresses(c, raw.get("listen", _DEFAULTS["listen"]))
    sockets = _sockets(c, raw)
    pool_mode = c.choice(raw, "pool_mode", POOL_MODES, "session")
    auth_type = c.choice(raw, "auth_type", AUTH_TYPES, "scram-sha-256")
    pool_size = c.number(raw, "pool_size", "pool_size", int, _DEFAULTS["pool_size"], 1, 100_000)
    max_client_conn = c.number(raw, "max_client_conn", "max_client_conn", int, _DEFAULTS["max_client_conn"], 1)
    timeouts = {
        key: c.number(raw, key, key, float, _DEFAULTS[key], 0.0)
        for key in (
            "server_connect_timeout",
            "client_login_timeout",
            "query_wait_timeout",
            "idle_transaction_timeout",
            "server_idle_timeout",
            "server_lifetime",
            "health_check_interval",
            "health_check_timeout",
            "max_replica_delay",
            "failover_wait",
            "failover_timeout",
            "query_timeout",
        )
    }
    if timeouts["health_check_interval"] <= 0:
        c.err("health_check_interval", "must be > 0")
        timeouts["health_check_interval"] = _DEFAULTS["health_check_interval"]
    max_replica_lag = c.number(raw, "max_replica_lag", "max_replica_lag", int, _DEFAULTS["max_replica_lag"], 0)
    keepalive = {key: c.number(raw, key, key, int, _DEFAULTS[key], 0, limit) for key, limit in _KEEPALIVE_MAX.items()}
    flags = {}
    for key in ("read_your_writes", "auto_promote", "tcp_keepalive", "tcp_defer_accept"):
        value = raw.get(key, _DEFAULTS[key])
        if not isinstance(value, bool):
            c.err(key, f"must be true or false, not {value!r}")
            value = _DEFAULTS[key]
        flags[key] = value
    functions = raw.get("read_only_functions", [])
    if not isinstance(functions, list) or not all(isinstance(f, str) and f for f in functions):
        c.err("read_only_functions", "must be a list of function names")
        functions = []
    strings = {}
    for key in ("routing_hook", "health_user"):
        value = raw.get(key, "")
        if not isinstance(value, str):
            c.err(key, "must be a string")
            value = ""
        strings[key] = value
    hook = strings["routing_hook"]
    if hook and (":" not in hook or not all(hook.partition(":")[::2])):
        c.err("routing_hook", f"must be 'package.module:function', not {hook!r}")
    max_prepared_statements = c.number(
        raw, "max_prepared_statements", "max_prepared_statements", int, _DEFAULTS["max_prepared_statements"], 1, 100_000
    )
    min_pool_size = c.number(raw, "min_pool_size", "min_pool_size", int, _DEFAULTS["min_pool_size"], 0, 100_000)
    unpoolable = c.choice(raw, "unpoolable", UNPOOLABLE, "pin")
    on_server_loss = c.choice(raw, "on_server_loss", SERVER_LOSS, "keep_session")
    max_message_size = c.number(
        raw, "max_message_size", "max_message_size", int, _DEFAULTS["max_message_size"], 1024, 0x3FFFFFFF
    )
    reset = raw.get("server_reset_query", _DEFAULTS["server_reset_query"])
    if not isinstance(reset, str):
        c.err("server_reset_query", "must be a string (empty to skip the reset)")
        reset = _DEFAULTS["server_reset_query"]

    limits = _limits(c, raw)
    databases: dict[str, DatabaseConfig] = {}
    raw_dbs = raw.get("databases", {})
    if not isinstance(raw_dbs, dict) or not raw_dbs:
        c.err("databases", "at least one [databases.NAME] table is required")
        raw_dbs = {}
    for name, db in raw_dbs.items():
        path = f"databases.{name}"
        if not isinstance(db, dict):
            c.err(path, "must be a table")
            continue
        c.unknown(db, _DATABASE_KEYS, path + ".")
        dbname = db.get("dbname", name)
        if not isinstance(dbname, str) or not dbname:
            c.err(path + ".dbname", "must be a non-empty string")
        nodes = []
        raw_nodes = db.get("nodes")
        if not isinstance(raw_nodes, list) or not raw_nodes:
            c.err(path + ".nodes", "must be a non-empty list of 'host:port'")
            raw_nodes = []
        for i, node in enumerate(raw_nodes):
            try:
                nodes.append(parse_address(node))
            except ValueError as e:
                c.err(f"{path}.nodes[{i}]", str(e))
        db_pool = c.number(db, "pool_size", path + ".pool_size", int, pool_size, 1, 100_000)
        db_route = db.get("route", "auto")
        if db_route not in ROUTES:
            c.err(path + ".route", f"must be one of {', '.join(map(repr, ROUTES))}, not {db_route!r}")
            db_route = "auto"
        databases[name] = DatabaseConfig(
            name,
            dbname if isinstance(dbname, str) else name,
            tuple(nodes),
            db_pool,
            db_route,
            _table_pool_mode(c, db, path),
            c.number(db, "max_db_connections", path + ".max_db_connections", int, limits["max_db_connections"], 0, 100_000),
            c.number(db, "reserve_pool_size", path + ".reserve_pool_size", int, limits["reserve_pool_size"], 0, 100_000),
            frozenset(key for key in INHERITED if key not in db),
        )

    errors_before = len(c.errors)
    auth_file, file_secrets = _auth_file(c, raw, source)
    auth_file_ok = len(c.errors) == errors_before  # (else that error says why no user is left)
    users: dict[str, UserConfig] = {}
    # Where each user's secret was written, for errors that must point at it.
    origins: dict[str, str] = {}
    raw_users = raw.get("users", {})
    if not isinstance(raw_users, dict):
        c.err("users", "must be a table of [users.NAME]")
        raw_users = {}
    for name, user in raw_users.items():
        path = f"users.{name}"
        if not isinstance(user, dict):
            c.err(path, "must be a table")
            continue
        c.unknown(user, _USER_KEYS, path + ".")
        password = user.get("password")
        in_file = file_secrets.get(name)
        if password is not None and in_file is not None:
            # As in PgBouncer, the secret lives in one place; two could disagree unnoticed.
            c.err(path + ".password", f"user {name!r} also has a secret in auth_file ({auth_file}:{in_file[1]}); give it in one place")
            continue
        if password is None and in_file is not None:
            password, origin = in_file[0], f"auth_file ({auth_file}:{in_file[1]})"
        else:
            origin = path + ".password"
        looked_up = password is None and bool(raw.get("auth_user"))
        if not looked_up and (not isinstance(password, str) or not password):
            # No default passwords: a user without one cannot log in to the nodes either.
            where = " here or in auth_file" if auth_file else ""
            c.err(origin, f"is required{where} (plaintext, md5 hash or SCRAM-SHA-256 verifier)")
            continue
        user_route = user.get("route", "auto")
        if user_route not in ROUTES:
            c.err(path + ".route", f"must be one of {', '.join(map(repr, ROUTES))}, not {user_route!r}")
            user_route = "auto"
        try:
            users[name] = UserConfig(
                name,
                None if looked_up else Credential.parse(name, password),
                user_route,
                _table_pool_mode(c, user, path),
                c.number(user, "max_user_connections", path + ".max_user_connections", int, limits["max_user_connections"], 0, 100_000),
            )
            origins[name] = origin
        except ValueError as e:
            c.err(origin, str(e))  # the message never repeats the secret
    for name, (secret, line) in file_secrets.items():
        if name in raw_users:
            continue
        origin = f"auth_file ({auth_file}:{line})"
        try:
            users[name] = UserConfig(name, Credential.parse(name, secret), max_user_connections=limits["max_user_connections"])
            origins[name] = origin
        except ValueError as e:
            c.err(origin, str(e))
    auth_query = _auth_query(c, raw, databases, users, origins)
    if auth_type != "trust" and not users and auth_file_ok:
        c.err("users", f"auth_type = {auth_type!r} needs at least one [users.NAME] with a password")

    if auth_type == "scram-sha-256":
        _check_md5_clients(c, users, origins, {strings["health_user"], auth_query.get("auth_user", "")})
    if strings["health_user"] and strings["health_user"] not in users:
        c.err("health_user", f"names no [users.{strings['health_user']}] table (nor a line of auth_file)")
    elif len(c.errors) == errors_before:  # (with a user in error, who the monitor would be is unclear)
        _check_health_user(c, strings["health_user"], databases, users, origins)
    operations = _operations(raw, c, source, databases, users, auth_type)
    workers = _workers(c, raw.get("workers", 1))
    if workers > 1 and (len(listen_addresses) > 1 or sockets["unix_socket_dir"]):
        # (The supervisor hands its workers one listening socket: the first listen address.)
        c.err("workers", "more than one worker listens on one TCP address only: not yet with a list in listen or unix_socket_dir")
    if workers > 1:
        # Each worker keeps a share of these limits, at least one connection (pooling/limits.py).
        for key, table in (("max_db_connections", databases), ("max_user_connections", users)):
            below = sorted(name for name, entry in table.items() if 0 < getattr(entry, key) < workers)
            if below:
                c.warn(key, f"below workers ({workers}) for {', '.join(below)}: each worker keeps one connection, {workers} in all")
    tls_config, server_tls_config = _tls_tables(c, raw, source, auth_type)
    if c.errors:
        raise ConfigError(c.errors, source)
    return Config(
        listen_addresses=listen_addresses,
        **sockets,
        pool_mode=pool_mode,
        pool_size=pool_size,
        max_client_conn=max_client_conn,
        auth_type=auth_type,
        server_reset_query=reset,
        max_message_size=max_message_size,
        max_prepared_statements=max_prepared_statements,
        min_pool_size=min_pool_size,
        unpoolable=unpoolable,
        on_server_loss=on_server_loss,
        max_replica_lag=max_replica_lag,
        read_only_functions=frozenset(f.lower() for f in functions),
        routing_hook=strings["routing_hook"],
        health_user=strings["health_user"],
        auth_file=auth_file,
        **flags,
        databases=MappingProxyType(databases),
        users=MappingProxyType(users),
        source=source,
        tls=tls_config,
        server_tls=server_tls_config,
        **timeouts,
        **keepalive,
        **operations,
        **auth_query,
        **limits,
        workers=workers,
        warnings=tuple(c.warnings),
    )


MAX_WORKERS = 256  # (the cancel keys give the worker's number the top bits of their secret)


def _workers(c: _Checker, value) -> int:
    if value == "auto":
        try:
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        except (AttributeError, OSError):  # not Linux
            return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        c.err("workers", f'must be "auto" or a number from 1 to {MAX_WORKERS}, not {value!r}')
        return 1
    return value


def _auth_file(c: _Checker, raw: Mapping, source: str) -> tuple[str, dict[str, tuple[str, int]]]:
    """auth_file: its absolute path and {user: (secret, line)}; errors name the file and line."""
    value = raw.get("auth_file")
    if value is None:
        return "", {}
    if not isinstance(value, str) or not value:
        c.err("auth_file", "must be a file path (relative to the config file)")
        return "", {}
    source_path = Path(source)
    base = source_path.absolute().parent if source_path.is_file() else Path.cwd()
    path = (base / value).absolute()
    try:
        text = path.read_bytes().decode("utf-8-sig")  # (a byte order mark from a Windows editor)
    except OSError as e:
        c.err("auth_file", f"cannot read {path}: {e.strerror}")
        return str(path), {}
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        c.err("auth_file", f"{path}:{line}: not UTF-8")
        return str(path), {}
    try:
        entries = parse_userlist(text)
    except UserlistError as e:
        c.err("auth_file", f"{path}:{e.line}: {e.message}")
        return str(path), {}
    secrets: dict[str, tuple[str, int]] = {}
    for entry in entries:
        if entry.user in secrets:
            # PgBouncer lets the last line win silently; one of two lines would be a mistake.
            c.err("auth_file", f"{path}:{entry.line}: user {entry.user!r} again (first on line {secrets[entry.user][1]})")
            continue
        if not entry.secret:
            c.err("auth_file", f"{path}:{entry.line}: user {entry.user!r} has an empty secret")
            continue
        secrets[entry.user] = (entry.secret, entry.line)
    return str(path), secrets


def _limits(c: _Checker, raw: Mapping) -> dict:
    """max_db_connections, max_user_connections, reserve_pool_size, reserve_pool_timeout (global defaults)."""
    out = {key: c.number(raw, key, key, int, 0, 0, 100_000) for key in ("max_db_connections", "max_user_connections", "reserve_pool_size")}
    out["reserve_pool_timeout"] = c.number(raw, "reserve_pool_timeout", "reserve_pool_timeout", float, 5.0, 0.0)
    out["client_idle_timeout"] = c.number(raw, "client_idle_timeout", "client_idle_timeout", float, 0.0, 0.0)
    out["server_check_delay"] = c.number(raw, "server_check_delay", "server_check_delay", float, 30.0, 0.0)
    query = raw.get("server_check_query", "SELECT 1")
    if not isinstance(query, str):
        c.err("server_check_query", "must be a string (empty: no check)")
        query = "SELECT 1"
    out["server_check_query"] = query
    return out


def _table_pool_mode(c: _Checker, table: Mapping, path: str) -> str | None:
    """pool_mode in a [databases.NAME] or [users.NAME] table; None where it is not given."""
    value = table.get("pool_mode")
    if value is None:
        return None
    if value not in POOL_MODES:
        c.err(path + ".pool_mode", f"must be one of {', '.join(map(repr, POOL_MODES))}, not {value!r}")
        return None
    return value


# -- auth_query / auth_user ---------------------------------------------------------------------

# PgBouncer's default: pg_shadow holds the verifier exactly as pg_authid.rolpassword does.
DEFAULT_AUTH_QUERY = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
DEFAULT_AUTH_CACHE_TTL = 60.0


def _auth_query(c: _Checker, raw: Mapping, databases: Mapping, users: Mapping, origins: Mapping) -> dict:
    """auth_user, auth_query, auth_dbname, auth_cache_ttl: checked; Config keyword arguments."""
    out = {"auth_user": "", "auth_query": "", "auth_dbname": "", "auth_cache_ttl": DEFAULT_AUTH_CACHE_TTL}
    auth_user = raw.get("auth_user", "")
    if not isinstance(auth_user, str):
        c.err("auth_user", "must be a user name")
        auth_user = ""
    for key in ("auth_query", "auth_dbname"):
        value = raw.get(key, "")
        if not isinstance(value, str):
            c.err(key, "must be a string")
    out["auth_cache_ttl"] = c.number(raw, "auth_cache_ttl", "auth_cache_ttl", float, DEFAULT_AUTH_CACHE_TTL, 0.0)
    if not auth_user:
        for key in ("auth_query", "auth_dbname"):
            if raw.get(key):
                c.err(key, "is used only with auth_user, which is not set")
        return out
    query = raw.get("auth_query", "") or DEFAULT_AUTH_QUERY
    if isinstance(query, str) and "$1" not in query:
        # The user name goes in as a bound parameter, never into the text (CVE-2025-12819).
        c.err("auth_query", "must take the user name as the parameter $1")
    dbname = raw.get("auth_dbname", "")
    if isinstance(dbname, str) and dbname and dbname not in databases:
        c.err("auth_dbname", f"names no [databases.{dbname}] table")
    user = users.get(auth_user)
    if user is None:
        c.err("auth_user", f"names no [users.{auth_user}] table (nor a line of auth_file)")
    elif user.credential is None:
        c.err("auth_user", f"[users.{auth_user}] has no password (nor a line of auth_file): auth_user needs one of its own")
    elif user.credential.kind == "scram":
        # Like the health monitor, it logs in before any client of its own has: a verifier cannot.
        c.err(
            "auth_user",
            f"user {auth_user!r} runs auth_query before any client has logged in as it, which its secret "
            f"({origins.get(auth_user, 'users.' + auth_user + '.password')}) cannot do: it is a SCRAM verifier; "
            "give it a plaintext password (or an md5 hash, for nodes that use md5), e.g. in auth_file",
        )
    out.update(auth_user=auth_user, auth_query=query if isinstance(query, str) else "", auth_dbname=dbname if isinstance(dbname, str) else "")
    return out


def _check_md5_clients(c: _Checker, users: Mapping, origins: Mapping, server_only: set[str]) -> None:
    """Under auth_type = "scram-sha-256" a client's SCRAM proof is checked against a verifier made
    from the password; an md5 hash yields none (PostgreSQL and PgBouncer refuse such a login too).
    Such a user could never log in: --check and start-up say so (a warning, not a refusal: the
    other users are served, and a userlist.txt shared with PgBouncer, read as is, starts there too)
    rather than leaving it to be found as 28P01 at every login. health_user and auth_user only log
    in to nodes, where an md5 hash can answer md5."""
    for name, user in users.items():
        if user.credential is not None and user.credential.kind == "md5" and name not in server_only:
            c.warn(
                origins.get(name, f"users.{name}.password"),
                f'is an md5 hash, which auth_type = "scram-sha-256" cannot check a client\'s password against: '
                f"no client could log in as {name!r}; give a plaintext password or a SCRAM-SHA-256 verifier "
                f'(`pgtwist passwd {name}`), or set auth_type = "md5"',
            )


def _check_health_user(c: _Checker, health_user: str, databases: Mapping, users: Mapping, origins: Mapping) -> None:
    """A database with several nodes is probed from start-up, before any client has logged in:
    the monitor's user needs a secret that can answer a node on its own. A SCRAM verifier cannot
    (it holds no ClientKey: only a client's proof yields one), so it is refused here, not found
    out as every node marked down."""
    clustered = [name for name, db in databases.items() if len(db.nodes) > 1]
    if not clustered:
        return
    where = f"databases.{clustered[0]}.nodes lists several nodes, so the health monitor logs in to each of them"
    fix = (
        "set health_user to a user whose password is plaintext (or an md5 hash, for nodes that use md5), "
        "e.g. a role with pg_monitor whose secret is kept in auth_file"
    )
    name = health_user or next((n for n, u in users.items() if u.credential is not None), "")
    if not name:
        c.err("health_user", f"{where}, and there is no user to log in as: {fix}")
        return
    if users[name].credential is None:
        c.err("health_user", f"{where} from start-up, which user {name!r} cannot do: it has no password here (auth_query looks it up); {fix}")
        return
    if users[name].credential.kind == "scram":
        who = f"user {name!r}" if health_user else f"user {name!r} (health_user is not set: the first user)"
        c.err(
            "health_user",
            f"{where} from start-up, before any client has logged in, which {who} cannot do: its secret "
            f"({origins.get(name, 'users.' + name + '.password')}) is a SCRAM verifier, which cannot answer a node's challenge; {fix}",
        )


def _tls_table(c: _Checker, raw: Mapping, name: str, modes: tuple, base: Path, kind: type):
    """One of [tls] / [server_tls]: checked, paths resolved against *base*, files loaded by OpenSSL."""
    table = raw.get(name, {})
    if not isinstance(table, dict):
        c.err(name, "must be a table")
        return kind()
    c.unknown(table, _TLS_KEYS, name + ".")
    errors = len(c.errors)
    mode = table.get("mode", "disable")
    if mode not in modes:
        c.err(f"{name}.mode", f"must be one of {', '.join(map(repr, modes))}, not {mode!r}")
        mode = "disable"
    paths: dict[str, str | None] = {}
    for key in ("cert", "key", "ca"):
        value = table.get(key)
        paths[key] = None
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            c.err(f"{name}.{key}", "must be a file path (relative to the config file)")
            continue
        path = (base / value).absolute()  # absolute paths stay as they are
        if not path.is_file():
            c.err(f"{name}.{key}", f"no such file: {path}")
            continue
        paths[key] = str(path)
    ciphers = table.get("ciphers", DEFAULT_CIPHERS)
    if not isinstance(ciphers, str) or not ciphers:
        c.err(f"{name}.ciphers", "must be an OpenSSL cipher string")
        ciphers = DEFAULT_CIPHERS
    version = table.get("min_protocol_version", "TLSv1.2")
    if version not in TLS_VERSIONS:
        c.err(f"{name}.min_protocol_version", f"must be one of {', '.join(map(repr, TLS_VERSIONS))}, not {version!r}")
        version = "TLSv1.2"
    if mode != "disable":
        required = ("cert", "key") if kind is TlsConfig else ()
        if mode in ("verify-ca", "verify-full"):
            required += ("ca",)
        for key in required:
            if key not in table:
                c.err(f"{name}.{key}", f"is required with mode = {mode!r}")
        if kind is ServerTlsConfig and ("cert" in table) != ("key" in table):
            c.err(f"{name}.{'key' if 'cert' in table else 'cert'}", "cert and key go together")
    config = kind(mode=mode, ciphers=ciphers, min_protocol_version=version, **paths)
    if mode != "disable" and len(c.errors) == errors:
        from pgtwist.transport import tls  # OpenSSL only for configs that use it

        for key, message in tls.check(config, for_nodes=kind is ServerTlsConfig):
            c.err(f"{name}.{key}", message)
    return config


def _tls_tables(c: _Checker, raw: Mapping, source: str, auth_type: str) -> tuple[TlsConfig, ServerTlsConfig]:
    source_path = Path(source)
    base = source_path.absolute().parent if source_path.is_file() else Path.cwd()
    tls = _tls_table(c, raw, "tls", TLS_MODES, base, TlsConfig)
    server_tls = _tls_table(c, raw, "server_tls", SERVER_TLS_MODES, base, ServerTlsConfig)
    if auth_type == "cert" and tls.mode not in ("verify-ca", "verify-full"):
        c.err("auth_type", '"cert" needs [tls] mode = "verify-ca" or "verify-full" (clients must present a certificate)')
    return tls, server_tls


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror}"], str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"invalid TOML: {e}"], str(path)) from None
    except UnicodeDecodeError as e:  # tomllib decodes the file itself and lets this through
        raise ConfigError([f"invalid TOML: not UTF-8 (byte {e.start})"], str(path)) from None
    return from_dict(raw, str(path))


# -- operations: admin console, manhole, metrics, shutdown, logs ------------------------------

ADMIN_DATABASE = "pgbalance"  # the dbname that reaches the admin console instead of a node
# Every dbname that reaches it: PgBouncer's own name too, so its tooling (pgbouncer_exporter, scripts) works as is.
ADMIN_DATABASES = (ADMIN_DATABASE, "pgbouncer")
LOG_FORMATS = ("text", "json")
_MANHOLE_KEYS = {"listen", "authorized_keys", "host_key", "allow_remote"}
_METRICS_KEYS = {"listen"}
_ADMIN_KEYS = {"users"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _operations(raw: Mapping, c: _Checker, source: str, databases: Mapping, users: Mapping, auth_type: str) -> dict:
    """Validate the operations keys; returns Config keyword arguments."""
    # Files named in the config are relative to the config file's directory.
    base = Path(source).resolve().parent if not source.startswith("<") else Path.cwd()
    out: dict[str, Any] = {
        "shutdown_timeout": c.number(raw, "shutdown_timeout", "shutdown_timeout", float, 30.0, 0.0),
        "log_format": c.choice(raw, "log_format", LOG_FORMATS, "text"),
    }
    out["log_level"] = c.choice(raw, "log_level", LOG_LEVELS, "info")
    out["stats_period"] = c.number(raw, "stats_period", "stats_period", float, 60.0, 1.0, 86400.0)
    for key in ("log_connections", "log_disconnections", "log_pooler_errors"):
        value = raw.get(key, True)
        if not isinstance(value, bool):
            c.err(key, f"must be true or false, not {value!r}")
            value = True
        out[key] = value
    for reserved in ADMIN_DATABASES:
        if reserved in databases:
            c.err(f"databases.{reserved}", "this name is reserved for the admin console")

    def names(value, path: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            c.err(path, "must be a list of user names")
            return ()
        if auth_type != "trust":
            for i, name in enumerate(value):
                if name not in users:
                    c.err(f"{path}[{i}]", f"names no [users.{name}] table")
        return tuple(value)

    out["audit"] = names(raw.get("audit", []), "audit")
    admin = raw.get("admin", {})
    if not isinstance(admin, dict):
        c.err("admin", "must be a table")
        admin = {}
    c.unknown(admin, _ADMIN_KEYS, "admin.")
    out["admin_users"] = names(admin.get("users", []), "admin.users")

    def address(table: Mapping, path: str, default: str):
        try:
            return parse_address(table.get("listen", default), int(default.rpartition(":")[2]))
        except ValueError as e:
            c.err(path, str(e))
            return parse_address(default)

    manhole = raw.get("manhole")
    if manhole is not None:
        if not isinstance(manhole, dict):
            c.err("manhole", "must be a table")
        else:
            c.unknown(manhole, _MANHOLE_KEYS, "manhole.")
            listen = address(manhole, "manhole.listen", "127.0.0.1:6022")
            allow_remote = manhole.get("allow_remote", False)
            if not isinstance(allow_remote, bool):
                c.err("manhole.allow_remote", f"must be true or false, not {allow_remote!r}")
                allow_remote = False
            if not allow_remote and not is_loopback(listen.host):
                c.err("manhole.listen", f"{listen} is not a loopback address; set manhole.allow_remote = true to listen there")
            paths = {}
            for key, default in (("authorized_keys", None), ("host_key", "manhole_host_key")):
                value = manhole.get(key, default)
                if not isinstance(value, str) or not value:
                    c.err(f"manhole.{key}", "is required: a file path" if value is None else "must be a file path")
                    value = default or ""
                paths[key] = str(base / value) if value else ""
            out["manhole"] = ManholeConfig(listen, paths["authorized_keys"], paths["host_key"], allow_remote)
    metrics = raw.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, dict):
            c.err("metrics", "must be a table")
        else:
            c.unknown(metrics, _METRICS_KEYS, "metrics.")
            out["metrics"] = MetricsConfig(address(metrics, "metrics.listen", "127.0.0.1:9127"))
    return out


# -- reload: what changed between two configs -------------------------------------------------

# Keys (and tables) a running pgtwist cannot change: listeners and the way sessions are built.
# ("listen" is the key the file and flatten() use; "listen_addresses" is the Config field holding it.)
RESTART_KEYS = ("listen", "listen_addresses", "unix_socket_dir", "unix_socket_mode", "pool_mode", "log_format", "manhole", "metrics", "workers")
RESTART_KEYS += ("log_level",)  # (logs block: the observer is built once, at start)
RESTART_KEYS += ("tcp_defer_accept",)  # (a listening socket's option, set when it opens)


class _Secret:
    """A secret in a flattened config: compares by a digest of its value, shows as asterisks."""

    __slots__ = ("digest",)

    def __init__(self, digest: str):
        self.digest = digest

    def __eq__(self, other):
        return isinstance(other, _Secret) and other.digest == self.digest

    def __hash__(self):
        return hash(self.digest)

    def __repr__(self):
        return "'********'"

    def __str__(self):
        return "********"


def _credential_digest(credential: Credential) -> _Secret:
    import hashlib

    if credential.kind == "plain":
        # (A plaintext password gets a fresh SCRAM salt at every parse: compare the text.)
        material = "plain:" + credential.plaintext
    elif credential.kind == "md5":
        material = "md5:" + credential.md5_hash
    else:
        v = credential.scram
        material = f"scram:{v.iterations}:{v.salt.hex()}:{v.stored_key.hex()}:{v.server_key.hex()}"
    return _Secret(hashlib.sha256(material.encode()).hexdigest())


def _flatten_value(value):
    if isinstance(value, Credential):
        return _credential_digest(value)
    if isinstance(value, (frozenset, set)):
        return tuple(sorted(value))
    return value


def flatten(config: Config) -> dict[str, Any]:
    """Every setting as 'key.path' -> value; secrets become digests that print as asterisks."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in ("source", "warnings"):
            continue
        if f.name == "listen_addresses":
            out["listen"] = ", ".join(str(a) for a in value)  # (the file's key, as SHOW CONFIG names it)
            continue
        if f.name in ("databases", "users"):
            for name, table in value.items():
                for sub in fields(table):
                    if sub.name not in ("name", "inherited"):
                        key = "password" if sub.name == "credential" else sub.name
                        out[f"{f.name}.{name}.{key}"] = _flatten_value(getattr(table, sub.name))
        elif is_dataclass(value) and not isinstance(value, Address):
            for sub in fields(value):
                out[f"{f.name}.{sub.name}"] = _flatten_value(getattr(value, sub.name))
        else:
            out[f.name] = _flatten_value(value)
    return out


def needs_restart(path: str) -> bool:
    return any(path == key or path.startswith(key + ".") for key in RESTART_KEYS)


@dataclass(frozen=True)
class ConfigDiff:
    """What a reload changes: key paths, and the tables added, removed or changed."""

    changed: tuple[str, ...] = ()  # every key path that differs, appeared or disappeared
    restart: tuple[str, ...] = ()  # those of them only a restart applies
    databases_added: tuple[str, ...] = ()
    databases_removed: tuple[str, ...] = ()
    databases_changed: tuple[str, ...] = ()
    users_added: tuple[str, ...] = ()
    users_removed: tuple[str, ...] = ()
    users_changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changed)

    @property
    def live(self) -> tuple[str, ...]:
        return tuple(k for k in self.changed if k not in self.restart)


def diff(old: Config, new: Config) -> ConfigDiff:
    a, b = flatten(old), flatten(new)
    changed = tuple(sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING)))

    def tables(name: str):
        before, after = getattr(old, name), getattr(new, name)
        added = tuple(sorted(set(after) - set(before)))
        removed = tuple(sorted(set(before) - set(after)))
        touched = {k.split(".")[1] for k in changed if k.startswith(name + ".")}
        return added, removed, tuple(sorted(touched - set(added) - set(removed)))

    dbs, users = tables("databases"), tables("users")
    return ConfigDiff(
        changed=changed,
        restart=tuple(k for k in changed if needs_restart(k)),
        databases_added=dbs[0],
        databases_removed=dbs[1],
        databases_changed=dbs[2],
        users_added=users[0],
        users_removed=users[1],
        users_changed=users[2],
    )


_MISSING = object()


def applicable(old: Config, new: Config) -> Config:
    """*new*, except for what needs a restart: that stays as *old* has it until pgtwist restarts."""
    from dataclasses import replace

    return replace(new, **{f.name: getattr(old, f.name) for f in fields(old) if needs_restart(f.name)})
