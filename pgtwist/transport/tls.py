"""TLS on both legs: pyOpenSSL contexts for clients (pgtwist is the TLS server) and for nodes (the TLS client).

Everything OpenSSL-specific lives here. The two legs share nothing: clients see pgtwist's own
certificate ([tls]); nodes see pgtwist's optional client certificate ([server_tls]) and are
verified against their own CA. Twisted's ``transport.startTLS`` does the record layer; the login
exchanges (pgtwist/frontend/login.py, the node side in pgtwist/backend/connection.py) decide when.

Contexts are built once (Proxy.reload_tls() rebuilds them); a connection keeps the context it
started with, so a reload never disturbs open connections.
"""

from __future__ import annotations

import functools
import ipaddress

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from pgtwist.backend.login import ServerLoginError
from pgtwist.wire import sqlstate

ALPN = b"postgresql"  # what PostgreSQL 17 clients offer, and demand for direct TLS
TLS_RECORD_HANDSHAKE = 0x16  # the first byte of a ClientHello: a direct-TLS client (sslnegotiation=direct)
VERIFYING_MODES = ("verify-ca", "verify-full")
_VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}
# Short names for the X509 verification results people meet most; OpenSSL's own text follows.
_UNTRUSTED = {2, 18, 19, 20, 21}  # no trusted issuer / self-signed / unable to verify the first cert


class TlsSetupError(Exception):
    """A certificate, key or setting that OpenSSL refuses; *key* names the config key ("cert", "ca", ...)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# -- contexts ----------------------------------------------------------------------------------


def _why(error: Exception) -> str:
    """OpenSSL's reasons from an SSL.Error, readable."""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        reasons = [r[-1] for r in args[0] if isinstance(r, tuple) and r and r[-1]]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    return str(error) or type(error).__name__


def _scratch(method: int) -> SSL.Context:
    return SSL.Context(method)


def _base_context(method: int, cfg) -> SSL.Context:
    ctx = _scratch(method)
    ctx.set_min_proto_version(_VERSIONS[cfg.min_protocol_version])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET)
    try:
        ctx.set_cipher_list(cfg.ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError) as e:
        raise TlsSetupError("ciphers", f"OpenSSL accepts none of {cfg.ciphers!r} ({_why(e)})") from None
    return ctx


def _load_identity(ctx: SSL.Context, cert: str, key: str) -> None:
    try:
        ctx.use_certificate_chain_file(cert)
    except SSL.Error as e:
        raise TlsSetupError("cert", f"cannot load a PEM certificate from {cert}: {_why(e)}") from None
    try:
        # Loaded here, not by OpenSSL: an encrypted key is an error, never a passphrase prompt.
        with open(key, "rb") as f:
            private_key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise TlsSetupError("key", f"cannot load an unencrypted PEM private key from {key}: {e}") from None
    try:
        ctx.use_privatekey(private_key)
        ctx.check_privatekey()
    except (SSL.Error, TypeError):
        raise TlsSetupError("key", f"{key} is not the private key of the certificate in {cert}") from None


def _load_ca(ctx: SSL.Context, ca: str) -> None:
    try:
        with open(ca, "rb") as f:
            if not x509.load_pem_x509_certificates(f.read()):
                raise ValueError("no certificate")
        ctx.load_verify_locations(ca)
    except (OSError, ValueError, SSL.Error) as e:
        raise TlsSetupError("ca", f"cannot load PEM CA certificates from {ca}: {_why(e)}") from None


def _select_alpn(conn: SSL.Connection, offered: list[bytes]):
    # Direct TLS demands "postgresql" (checked once the handshake is done, see login.tls_started);
    # a classic SSLRequest client may offer nothing, or something else, and carry on without.
    return ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def client_context(cfg) -> SSL.Context:
    """The context for connections from clients ([tls]): pgtwist's certificate, client certificates per mode."""
    if not cfg.cert or not cfg.key:
        raise TlsSetupError("cert", "a certificate and its key are required")
    ctx = _base_context(SSL.TLS_SERVER_METHOD, cfg)
    _load_identity(ctx, cfg.cert, cfg.key)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # as PostgreSQL: no resumption, no session id context
    ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    if cfg.ca:
        _load_ca(ctx, cfg.ca)
    if cfg.mode in VERIFYING_MODES:
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE)
    elif cfg.ca:
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE)  # a certificate, if sent, must verify
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    ctx.set_alpn_select_callback(_select_alpn)
    return ctx


def node_context(cfg) -> SSL.Context:
    """The context for connections to nodes ([server_tls]): their CA, our optional client certificate."""
    ctx = _base_context(SSL.TLS_CLIENT_METHOD, cfg)
    if cfg.cert or cfg.key:
        if not (cfg.cert and cfg.key):
            raise TlsSetupError("cert" if not cfg.cert else "key", "cert and key go together")
        _load_identity(ctx, cfg.cert, cfg.key)
    if cfg.ca:
        _load_ca(ctx, cfg.ca)
    if cfg.mode in VERIFYING_MODES:
        if not cfg.ca:
            raise TlsSetupError("ca", f"mode {cfg.mode!r} needs the CA that signed the nodes' certificates")
        ctx.set_verify(SSL.VERIFY_PEER)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    ctx.set_alpn_protos([ALPN])  # PostgreSQL 17+ checks it when offered; older servers ignore it
    return ctx


def check(cfg, *, for_nodes: bool) -> list[tuple[str, str]]:
    """(key, message) for each thing OpenSSL refuses in a [tls] / [server_tls] table (config validation)."""
    errors = []
    method = SSL.TLS_CLIENT_METHOD if for_nodes else SSL.TLS_SERVER_METHOD
    steps = [lambda: _base_context(method, cfg)]
    if cfg.cert and cfg.key:
        steps.append(lambda: _load_identity(_scratch(method), cfg.cert, cfg.key))
    if cfg.ca:
        steps.append(lambda: _load_ca(_scratch(method), cfg.ca))
    for step in steps:  # each on its own, so that every mistake is reported at once
        try:
            step()
        except TlsSetupError as e:
            errors.append((e.key, e.message))
    if not errors:
        try:
            (node_context if for_nodes else client_context)(cfg)
        except TlsSetupError as e:
            errors.append((e.key, e.message))
    return errors


def from_config(config) -> tuple[ClientTls | None, NodeTls | None]:
    """Both legs' TLS from a Config (None where the mode is "disable"); raises TlsSetupError."""
    client = ClientTls(client_context(config.tls)) if config.tls.mode != "disable" else None
    node = NodeTls(config.server_tls.mode, node_context(config.server_tls)) if config.server_tls.mode != "disable" else None
    return client, node


# -- the client leg: pgtwist is the server -----------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class ClientTls:
    """Makes the TLS connection of each client; ``transport.startTLS(this)``."""

    def __init__(self, context: SSL.Context):
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def start_tls(transport, creator, initial: bytes = b"") -> None:
    """Upgrade *transport* now; *initial* is TLS data already read (a direct-TLS ClientHello)."""
    transport.startTLS(creator)
    if initial:
        # After startTLS the transport delivers to the TLS layer; hand it what came before.
        transport.protocol.dataReceived(initial)


@functools.lru_cache(maxsize=16)
def server_end_point_hash(cert_der: bytes) -> bytes | None:
    """RFC 5929 tls-server-end-point: the certificate hashed with its signature's hash (SHA-256 for MD5/SHA-1).

    None when the signature has no single hash (Ed25519, ...): channel binding is then not offered,
    as PostgreSQL does.
    """
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception:  # noqa: BLE001 - an algorithm cryptography does not know
        return None
    if algorithm is None:
        return None
    if algorithm.name in ("md5", "sha1"):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


def common_name(cert: x509.Certificate | None) -> str | None:
    if cert is None:
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def client_handshake_info(transport) -> dict:
    """What the login needs from a finished client handshake (keyword arguments of ClientLogin.tls_started)."""
    conn: SSL.Connection = transport.getHandle()
    own = conn.get_certificate(as_cryptography=True)
    peer = conn.get_peer_certificate(as_cryptography=True)
    return {
        "channel_binding": server_end_point_hash(own.public_bytes(Encoding.DER)) if own is not None else None,
        "alpn": conn.get_alpn_proto_negotiated() or None,
        "peer_cn": common_name(peer),
        "peer_certificate": peer is not None,
    }


def is_tls_failure(reason) -> bool:
    # (isinstance, not Failure.check(): asked at every client's close, and check() computes the
    # qualified name of each class in the error's hierarchy)
    return reason is not None and isinstance(reason.value, SSL.Error)


def failure_text(reason) -> str:
    return _why(reason.value)


# -- the node leg: pgtwist is the client ---------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _names(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
        names += [f"IP:{n}" for n in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    return ", ".join(names) or f"CN={common_name(cert)} (no subjectAltName)"


def _verify_error_string(errnum: int) -> str:
    try:
        from OpenSSL._util import ffi, lib  # OpenSSL's X509_verify_cert_error_string, as pyOpenSSL uses it

        return ffi.string(lib.X509_verify_cert_error_string(errnum)).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - private API; a number is still an answer
        return f"X509 verification error {errnum}"


class NodeTls:
    """[server_tls] as built: the mode and the context; one per proxy, shared by every node connection."""

    def __init__(self, mode: str, context: SSL.Context):
        self.mode = mode
        self.context = context

    def answer(self, data: bytes, node: str) -> bool:
        """The node's reply to our SSLRequest: True to start TLS, False to carry on in plaintext (prefer).

        Raises ServerLoginError otherwise. Anything after the single byte is refused, since it
        came before the handshake and may have been injected (CVE-2021-23222).
        """
        if data[:1] == b"S":
            if len(data) > 1:
                raise ServerLoginError(
                    sqlstate.PROTOCOL_VIOLATION, f"node {node} sent unencrypted data after its SSL response"
                )
            return True
        if data[:1] == b"N":
            if len(data) > 1:
                raise ServerLoginError(
                    sqlstate.PROTOCOL_VIOLATION, f"node {node} sent unexpected data after refusing TLS"
                )
            if self.mode == "prefer":
                return False
            raise ServerLoginError(
                sqlstate.CONNECTION_FAILURE,
                f"node {node} does not support TLS",
                f'[server_tls] mode = "{self.mode}" does not fall back to plaintext; enable ssl on the node, or use mode = "prefer"',
            )
        if data[:1] == b"E":
            raise ServerLoginError(sqlstate.CONNECTION_FAILURE, f"node {node} refused the SSL request")
        raise ServerLoginError(
            sqlstate.PROTOCOL_VIOLATION, f"node {node} sent an invalid response to the SSL request: {data[:1]!r}"
        )

    def handshake(self, host: str) -> NodeHandshake:
        return NodeHandshake(self, host)


@implementer(IOpenSSLClientConnectionCreator)
class NodeHandshake:
    """One TLS handshake with one node: makes the connection, verifies the node, remembers why not.

    Verification happens inside the handshake (OpenSSL's chain check, then service_identity on
    the name as written in ``nodes`` for verify-full), so a node that fails it never sees a byte
    of the login.
    """

    def __init__(self, tls: NodeTls, host: str):
        self.tls = tls
        self.host = host
        self.verify_error: str | None = None

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        conn = SSL.Connection(self.tls.context, None)
        if not _is_ip(self.host):
            conn.set_tlsext_host_name(self.host.encode("idna"))  # SNI, as libpq sends for host names
        if self.tls.mode in VERIFYING_MODES:
            conn.set_verify(SSL.VERIFY_PEER, self._verify)
        return conn

    def _verify(self, conn, cert, errnum: int, depth: int, ok: int) -> bool:
        if not ok:
            if self.verify_error is None:
                c = cert.to_cryptography()
                why = _verify_error_string(errnum)
                if errnum in _UNTRUSTED:
                    why += (
                        f" (issued by {c.issuer.rfc4514_string()!r}: the node's certificate is not signed by a CA "
                        "in server_tls.ca)"
                    )
                elif depth:
                    why += f" (CA certificate {c.subject.rfc4514_string()!r})"
                self.verify_error = why
            return False
        if depth == 0 and self.tls.mode == "verify-full":
            c = cert.to_cryptography()
            try:
                if _is_ip(self.host):
                    verify_certificate_ip_address(c, self.host)
                else:
                    verify_certificate_hostname(c, self.host)
            except (VerificationError, ValueError):
                self.verify_error = f"the certificate is for {_names(c)}, not {self.host} (verify-full checks the name in nodes)"
                return False
        return True

    def error(self, reason, node: str) -> ServerLoginError:
        """What the waiting client hears when the handshake ends the connection."""
        if self.verify_error is not None:
            message = f"could not verify the TLS certificate of node {node}: {self.verify_error}"
        elif is_tls_failure(reason):
            message = f"TLS handshake with node {node} failed: {failure_text(reason)}"
        else:
            message = f"node {node} closed the connection during the TLS handshake"
        return ServerLoginError(sqlstate.CONNECTION_FAILURE, message)
