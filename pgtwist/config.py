"""Configuration: TOML -> frozen objects; validation reports every error with its key path."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from pgtwist.auth import Credential

POOL_MODES = ("session", "transaction")
AUTH_TYPES = ("trust", "md5", "scram-sha-256")


class ConfigError(Exception):
    """Every problem found in one config, each as 'key.path: what is wrong'."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s):\n  " + "\n  ".join(errors))


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DatabaseConfig:
    name: str  # what clients put in dbname
    dbname: str  # the database on the nodes
    nodes: tuple[Address, ...]
    pool_size: int


@dataclass(frozen=True)
class UserConfig:
    name: str
    credential: Credential = field(repr=False)


@dataclass(frozen=True)
class Config:
    listen: Address
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
    databases: Mapping[str, DatabaseConfig]
    users: Mapping[str, UserConfig] = field(repr=False)
    source: str = "<memory>"


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
}
UNPOOLABLE = ("pin", "error")

_TOP_KEYS = set(_DEFAULTS) | {"databases", "users"}
_DATABASE_KEYS = {"dbname", "nodes", "pool_size"}
_USER_KEYS = {"password"}


def parse_address(text: str, default_port: int = 5432) -> Address:
    """'host:port', '[v6]:port' or bare 'host' -> Address; ValueError on nonsense."""
    if not isinstance(text, str) or not text:
        raise ValueError("expected 'host:port'")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"no host in {text!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"invalid port in {text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return Address(host, port)


class _Checker:
    def __init__(self):
        self.errors: list[str] = []

    def err(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def number(self, raw: Mapping, key: str, path: str, kind: type, default, minimum, maximum=None):
        value = raw.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            self.err(path, f"must be {'an integer' if kind is int else 'a number'}, not {value!r}")
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
    try:
        listen = parse_address(raw.get("listen", _DEFAULTS["listen"]), 6432)
    except ValueError as e:
        c.err("listen", str(e))
        listen = parse_address(_DEFAULTS["listen"])
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
        )
    }
    max_prepared_statements = c.number(
        raw, "max_prepared_statements", "max_prepared_statements", int, _DEFAULTS["max_prepared_statements"], 1, 100_000
    )
    min_pool_size = c.number(raw, "min_pool_size", "min_pool_size", int, _DEFAULTS["min_pool_size"], 0, 100_000)
    unpoolable = c.choice(raw, "unpoolable", UNPOOLABLE, "pin")
    max_message_size = c.number(
        raw, "max_message_size", "max_message_size", int, _DEFAULTS["max_message_size"], 1024, 0x3FFFFFFF
    )
    reset = raw.get("server_reset_query", _DEFAULTS["server_reset_query"])
    if not isinstance(reset, str):
        c.err("server_reset_query", "must be a string (empty to skip the reset)")
        reset = _DEFAULTS["server_reset_query"]

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
        databases[name] = DatabaseConfig(name, dbname if isinstance(dbname, str) else name, tuple(nodes), db_pool)

    users: dict[str, UserConfig] = {}
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
        if not isinstance(password, str) or not password:
            # No default passwords: a user without one cannot log in to the nodes either.
            c.err(path + ".password", "is required (plaintext, md5 hash or SCRAM-SHA-256 verifier)")
            continue
        try:
            users[name] = UserConfig(name, Credential.parse(name, password))
        except ValueError as e:
            c.err(path + ".password", str(e))  # the message never repeats the secret
    if auth_type != "trust" and not users:
        c.err("users", f"auth_type = {auth_type!r} needs at least one [users.NAME] with a password")

    if c.errors:
        raise ConfigError(c.errors, source)
    return Config(
        listen=listen,
        pool_mode=pool_mode,
        pool_size=pool_size,
        max_client_conn=max_client_conn,
        auth_type=auth_type,
        server_reset_query=reset,
        max_message_size=max_message_size,
        max_prepared_statements=max_prepared_statements,
        min_pool_size=min_pool_size,
        unpoolable=unpoolable,
        databases=MappingProxyType(databases),
        users=MappingProxyType(users),
        source=source,
        **timeouts,
    )


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror}"], str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"invalid TOML: {e}"], str(path)) from None
    return from_dict(raw, str(path))
