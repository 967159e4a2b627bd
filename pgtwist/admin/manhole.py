"""[manhole]: a Python REPL into the running proxy over SSH (twisted.conch), public-key auth only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application import internet
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.insults import insults
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.logger import Logger
from zope.interface import implementer

from pgtwist.admin import ManholeError, actions, inspect
from pgtwist.config import is_loopback

log = Logger()


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """One OpenSSH authorized_keys file for every user name; re-read at each login, so edits apply at once."""

    def __init__(self, path: str):
        self.path = path

    def getAuthorizedKeys(self, username):
        try:
            with open(self.path, "rb") as f:
                return list(readAuthorizedKeyFile(f))
        except OSError as e:
            log.error("manhole: cannot read {path}: {why}", path=self.path, why=e.strerror)
            return []


def load_or_create_host_key(path: str) -> keys.Key:
    """The SSH host key at *path*; an Ed25519 key is generated there (mode 0600) when it does not exist."""
    p = Path(path)
    try:
        if not p.exists():
            private = ed25519.Ed25519PrivateKey.generate()
            data = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            log.info("manhole: generated SSH host key {path}", path=str(p))
        mode = p.stat().st_mode
    except OSError as e:
        raise ManholeError(f"manhole.host_key: cannot create {p}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warn("manhole: host key {path} is readable by others (mode {mode:o}); chmod 600 it", path=str(p), mode=stat.S_IMODE(mode))
    try:
        return keys.Key.fromFile(str(p))
    except (OSError, keys.BadKeyError, keys.EncryptedKeyError) as e:
        raise ManholeError(f"manhole.host_key: cannot load {p}: {e}") from None


def namespace(service) -> dict:
    """What the REPL sees: the service and helpers returning plain data."""
    proxy = service.proxy

    def reload():
        outcome = service.reload()
        changes = outcome.changes
        return {
            "ok": outcome.ok,
            "errors": list(outcome.errors),
            "changed": list(changes.live) if changes else [],
            "restart": list(outcome.restart),
        }

    return {
        "service": service,
        "proxy": proxy,
        "clients": lambda: inspect.clients(proxy),
        "servers": lambda: inspect.servers(proxy),
        "pools": lambda: inspect.pools(proxy),
        "nodes": lambda: inspect.nodes(proxy),
        "stats": lambda: {row["name"]: row["value"] for row in inspect.stats(proxy)},
        "prepared": lambda: inspect.prepared(proxy),
        "config": lambda: {row["key"]: row["value"] for row in inspect.config(proxy.config)},
        "reload": reload,
        "pause": lambda db=None: actions.pause(proxy, db),
        "resume": lambda db=None: actions.resume(proxy, db),
        "kill": lambda client_id: actions.kill(proxy, client_id),
        "reconnect": lambda db=None: actions.reconnect(proxy, db),
        "disable": lambda db: actions.disable(proxy, db),
        "enable": lambda db: actions.enable(proxy, db),
        "kill_database": lambda db: actions.kill_database(proxy, db),
        "set_setting": lambda key, value: actions.set_setting(proxy, key, str(value), service),  # (not "set": a builtin)
        "explain": lambda sql, database=None, user=None: inspect.explain(proxy, sql, database, user),
    }


class ManholeSession(manhole_ssh.TerminalSession):
    """conch's terminal session, minus the NotImplementedErrors an OpenSSH client triggers."""

    def eofReceived(self):
        pass  # the client's stdin ended; the REPL ends with Ctrl-D or when the connection closes

    def windowChanged(self, newWindowSize):
        pass


def make_factory(service, config) -> manhole_ssh.ConchFactory:
    """An SSH factory (its own host keys, its own portal) whose shell is a REPL over *service*."""
    if not config.authorized_keys or not os.path.isfile(config.authorized_keys):
        raise ManholeError(f"manhole.authorized_keys: {config.authorized_keys or '(not set)'} does not exist; the manhole needs one")
    host_key = load_or_create_host_key(config.host_key)
    names = namespace(service)
    realm = manhole_ssh.TerminalRealm()
    realm.sessionFactory = ManholeSession
    realm.chainedProtocolFactory = lambda: insults.ServerProtocol(manhole.ColoredManhole, names)
    checker = SSHPublicKeyChecker(AuthorizedKeysFile(config.authorized_keys))
    factory = manhole_ssh.ConchFactory(portal.Portal(realm, [checker]))
    # Instance attributes: ConchFactory's class-level dicts are shared by every factory in the process.
    factory.publicKeys = {host_key.sshType(): host_key.public()}
    factory.privateKeys = {host_key.sshType(): host_key}
    factory.noisy = False
    return factory


def make_service(service, config, reactor):
    """The listening manhole as a child service of *service*."""
    factory = make_factory(service, config)
    if not config.allow_remote and not is_loopback(config.listen.host):
        raise ManholeError(f"manhole.listen: {config.listen} is not a loopback address")
    log.info("manhole: SSH on {listen} for the keys in {keys}", listen=str(config.listen), keys=config.authorized_keys)
    server = internet.TCPServer(config.listen.port, factory, interface=config.listen.host, reactor=reactor)
    server.setName("manhole")
    return server

