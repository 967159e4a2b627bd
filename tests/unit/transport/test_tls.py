"""TLS without a network: config validation, pyOpenSSL contexts (handshakes over memory BIOs),
tls-server-end-point hashes, the login's TLS events, and both legs' state machines on StringTransports.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import subprocess
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from pgtwist import config as configmod
from pgtwist.auth import Credential
from pgtwist.backend.connection import ServerConnection
from pgtwist.backend.login import ServerLogin, ServerLoginError
from pgtwist.config import Address, ServerTlsConfig, TlsConfig
from pgtwist.frontend.login import Authenticated, CancelReceived, ClientLogin, LoginError, Reply, StartTLS
from pgtwist.service.proxy import Proxy
from pgtwist.tools import testcerts
from pgtwist.transport import tls
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.errors import WireError
from pgtwist.wire.framing import pop_messages

PASSWORD = "s3cret pw"
PLAIN = Credential.parse("app", PASSWORD)
MOCK_SECRET = b"m" * 32


# --------------------------------------------------------------------------- a throwaway PKI


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = testcerts.make_ca("unit CA")
    other = testcerts.make_ca("other CA")
    (d / "ca.crt").write_bytes(ca.cert_pem)
    (d / "other-ca.crt").write_bytes(other.cert_pem)
    testcerts.issue(ca, "localhost", dns=("localhost",), ips=("127.0.0.1",)).write(d, "server")
    testcerts.issue(ca, "localhost", dns=("localhost",)).write(d, "server2")
    testcerts.issue(ca, "app", client=True).write(d, "client")
    testcerts.issue(other, "app", client=True).write(d, "stray")
    return SimpleNamespace(dir=d, ca=ca, other=other)


def server_cfg(pki, mode="require", **more) -> TlsConfig:
    d = pki.dir
    return TlsConfig(mode=mode, cert=str(d / "server.crt"), key=str(d / "server.key"), **more)


def node_cfg(pki, mode="verify-full", **more) -> ServerTlsConfig:
    more.setdefault("ca", str(pki.dir / "ca.crt"))
    return ServerTlsConfig(mode=mode, **more)


def client_ctx(*, ca=None, cert=None, key=None, max_version=None, alpn=None) -> SSL.Context:
    """A plain TLS client (as libpq would be) for handshakes against our server context."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if max_version is not None:
        ctx.set_cipher_list(b"DEFAULT@SECLEVEL=0")
        ctx.set_min_proto_version(SSL.TLS1_VERSION)
        ctx.set_max_proto_version(max_version)
    if ca:
        ctx.load_verify_locations(str(ca))
        ctx.set_verify(SSL.VERIFY_PEER)
    if cert:
        ctx.use_certificate_chain_file(str(cert))
        ctx.use_privatekey_file(str(key))
    if alpn:
        ctx.set_alpn_protos(alpn)
    return ctx


def server_ctx_plain(pki, stem="server") -> SSL.Context:
    """A plain TLS server (as a node would be) for handshakes against our node context."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(pki.dir / f"{stem}.crt"))
    ctx.use_privatekey_file(str(pki.dir / f"{stem}.key"))
    return ctx


def handshake(server: SSL.Connection, client: SSL.Connection) -> tuple[SSL.Connection, SSL.Connection]:
    """Run a handshake over memory BIOs; SSL.Error from either side propagates."""
    server.set_accept_state()
    client.set_connect_state()
    done = {id(server): False, id(client): False}
    for _ in range(50):
        for a, b in ((client, server), (server, client)):
            if not done[id(a)]:
                try:
                    a.do_handshake()
                    done[id(a)] = True
                except SSL.WantReadError:
                    pass
            try:
                b.bio_write(a.bio_read(1 << 16))
            except SSL.WantReadError:
                pass
        if all(done.values()):
            # TLS 1.3: the server's verdict on the client's certificate may still be in flight.
            try:
                client.recv(1)
            except SSL.WantReadError:
                pass
            return server, client
    raise AssertionError("handshake did not finish")


# --------------------------------------------------------------------------- config

BASE = {
    "auth_type": "trust",
    "databases": {"appdb": {"nodes": ["localhost:5432"]}},
    "users": {"app": {"password": "pw"}},
}


def test_tls_defaults_to_disable():
    c = configmod.from_dict(BASE)
    assert c.tls == TlsConfig() and c.tls.mode == "disable"
    assert c.server_tls == ServerTlsConfig() and c.server_tls.mode == "disable"
    assert c.tls.min_protocol_version == "TLSv1.2" and c.tls.ciphers == configmod.DEFAULT_CIPHERS


def test_tls_paths_are_relative_to_the_config_file(pki, tmp_path, monkeypatch):
    conf = pki.dir / "conf.toml"
    conf.write_text(
        '[databases.appdb]\nnodes = ["localhost:5432"]\n[users.app]\npassword = "pw"\n'
        '[tls]\nmode = "verify-ca"\ncert = "server.crt"\nkey = "server.key"\nca = "ca.crt"\n'
        '[server_tls]\nmode = "verify-full"\nca = "ca.crt"\ncert = "client.crt"\nkey = "client.key"\n'
    )
    monkeypatch.chdir(tmp_path)  # somewhere else entirely
    c = configmod.load(conf)
    assert c.tls.cert == str(pki.dir / "server.crt") and c.tls.ca == str(pki.dir / "ca.crt")
    assert c.server_tls.mode == "verify-full" and c.server_tls.key == str(pki.dir / "client.key")


def test_tls_config_reports_every_error_with_its_key_path(pki):
    d = pki.dir
    raw = {
        **BASE,
        "auth_type": "cert",
        "tls": {"mode": "verify-ca", "cert": str(d / "nope.crt"), "bogus": 1, "min_protocol_version": "TLSv1.1"},
        "server_tls": {"mode": "sometimes", "cert": str(d / "client.crt"), "ciphers": 7},
    }
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict(raw)
    keys = [x.split(":")[0] for x in e.value.errors]
    assert keys == [
        "tls.bogus",
        "tls.cert",
        "tls.min_protocol_version",
        "tls.key",
        "tls.ca",
        "server_tls.mode",
        "server_tls.ciphers",
    ], e.value.errors
    assert "no such file" in e.value.errors[1]


def test_tls_config_loads_the_files(pki):
    d = pki.dir
    raw = {
        **BASE,
        "tls": {"mode": "require", "cert": str(d / "ca.crt"), "key": str(d / "client.key"), "ciphers": "NOTHING-AT-ALL"},
        "server_tls": {"mode": "verify-ca", "ca": str(d / "server.key"), "cert": str(d / "client.crt"), "key": str(d / "client.key")},
    }
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict(raw)
    errors = e.value.errors
    assert [x.split(":")[0] for x in errors] == ["tls.ciphers", "tls.key", "server_tls.ca"], errors
    assert "not the private key of the certificate" in errors[1]
    assert "cannot load PEM CA certificates" in errors[2]


def test_encrypted_keys_are_refused_not_prompted_for(pki, tmp_path):
    from cryptography.hazmat.primitives import serialization

    issued = testcerts.issue(pki.ca, "localhost")
    cert, _ = issued.write(tmp_path, "enc")
    key = tmp_path / "enc.key"
    key.write_bytes(
        issued.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        )
    )
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict({**BASE, "tls": {"mode": "prefer", "cert": str(cert), "key": str(key)}})
    (error,) = e.value.errors
    assert error.startswith("tls.key: cannot load an unencrypted PEM private key") and "encrypted" in error


def test_server_tls_cert_and_key_go_together(pki):
    raw = {**BASE, "server_tls": {"mode": "require", "key": str(pki.dir / "client.key")}}
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict(raw)
    assert e.value.errors == ["server_tls.cert: cert and key go together"]


def test_cert_auth_needs_a_verifying_mode(pki):
    bad = {**BASE, "auth_type": "cert", "tls": {"mode": "require", "cert": str(pki.dir / "server.crt"), "key": str(pki.dir / "server.key")}}
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict(bad)
    assert [x.split(":")[0] for x in e.value.errors] == ["auth_type"]
    raw = {**BASE, "auth_type": "cert", "tls": {"mode": "verify-full", "cert": str(pki.dir / "server.crt"), "key": str(pki.dir / "server.key"), "ca": str(pki.dir / "ca.crt")}}
    assert configmod.from_dict(raw).auth_type == "cert"


# --------------------------------------------------------------------------- contexts


def test_client_context_refuses_tls_1_1_and_takes_tls_1_2(pki):
    ctx = tls.client_context(server_cfg(pki))
    with pytest.raises(SSL.Error):
        handshake(SSL.Connection(ctx), SSL.Connection(client_ctx(max_version=SSL.TLS1_1_VERSION)))
    s, c = handshake(SSL.Connection(ctx), SSL.Connection(client_ctx(ca=pki.dir / "ca.crt", max_version=SSL.TLS1_2_VERSION)))
    assert c.get_protocol_version_name() == "TLSv1.2"
    assert c.get_cipher_name().startswith("ECDHE-")  # forward secrecy, AEAD by default


def test_client_context_min_protocol_version_tls_1_3(pki):
    ctx = tls.client_context(server_cfg(pki, min_protocol_version="TLSv1.3"))
    with pytest.raises(SSL.Error):
        handshake(SSL.Connection(ctx), SSL.Connection(client_ctx(max_version=SSL.TLS1_2_VERSION)))


def test_client_context_ciphers_are_configurable(pki):
    ctx = tls.client_context(server_cfg(pki, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305"))
    _, c = handshake(SSL.Connection(ctx), SSL.Connection(client_ctx(max_version=SSL.TLS1_2_VERSION)))
    assert c.get_cipher_name() == "ECDHE-ECDSA-CHACHA20-POLY1305"


def test_client_context_alpn(pki):
    ctx = tls.client_context(server_cfg(pki))
    s, c = handshake(SSL.Connection(ctx), SSL.Connection(client_ctx(alpn=[b"h2", b"postgresql"])))
    assert s.get_alpn_proto_negotiated() == b"postgresql"
    s, c = handshake(SSL.Connection(ctx), SSL.Connection(client_ctx(alpn=[b"h2"])))
    assert not s.get_alpn_proto_negotiated()  # classic clients carry on; direct ones are refused later
    s, c = handshake(SSL.Connection(ctx), SSL.Connection(client_ctx()))
    assert not s.get_alpn_proto_negotiated()


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_verifying_modes_demand_a_client_certificate(pki, mode):
    d = pki.dir
    ctx = tls.client_context(server_cfg(pki, mode, ca=str(d / "ca.crt")))
    with pytest.raises(SSL.Error):
        handshake(SSL.Connection(ctx), SSL.Connection(client_ctx()))
    with pytest.raises(SSL.Error):
        handshake(SSL.Connection(ctx), SSL.Connection(client_ctx(cert=d / "stray.crt", key=d / "stray.key")))
    s, _ = handshake(SSL.Connection(ctx), SSL.Connection(client_ctx(cert=d / "client.crt", key=d / "client.key")))
    assert tls.common_name(s.get_peer_certificate(as_cryptography=True)) == "app"


def test_require_with_a_ca_takes_optional_client_certificates(pki):
    d = pki.dir
    ctx = tls.client_context(server_cfg(pki, "require", ca=str(d / "ca.crt")))
    s, _ = handshake(SSL.Connection(ctx), SSL.Connection(client_ctx()))
    assert s.get_peer_certificate() is None
    with pytest.raises(SSL.Error):  # sent, so it must verify
        handshake(SSL.Connection(ctx), SSL.Connection(client_ctx(cert=d / "stray.crt", key=d / "stray.key")))


def node_handshake(pki, cfg, host, stem="server"):
    node_tls = tls.NodeTls(cfg.mode, tls.node_context(cfg))
    step = node_tls.handshake(host)
    conn = step.clientConnectionForTLS(None)
    try:
        handshake(SSL.Connection(server_ctx_plain(pki, stem)), conn)
    except SSL.Error:
        return step, False
    return step, True


def test_node_verify_full_checks_the_name_as_written(pki):
    assert node_handshake(pki, node_cfg(pki), "localhost")[1]
    assert node_handshake(pki, node_cfg(pki), "127.0.0.1")[1]  # IP SAN
    step, ok = node_handshake(pki, node_cfg(pki), "127.0.0.1", "server2")  # DNS:localhost only
    assert not ok
    assert step.verify_error == "the certificate is for DNS:localhost, not 127.0.0.1 (verify-full checks the name in nodes)"
    step, ok = node_handshake(pki, node_cfg(pki), "db.example")
    assert not ok and "not db.example" in step.verify_error


def test_node_verify_ca_ignores_the_name(pki):
    assert node_handshake(pki, node_cfg(pki, "verify-ca"), "127.0.0.1", "server2")[1]


def test_node_from_an_unknown_ca_fails_with_a_reason(pki):
    step, ok = node_handshake(pki, node_cfg(pki, ca=str(pki.dir / "other-ca.crt")), "localhost")
    assert not ok
    assert step.verify_error.startswith("unable to get local issuer certificate")
    assert "not signed by a CA in server_tls.ca" in step.verify_error and "CN=unit CA" in step.verify_error
    error = step.error(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])), "localhost:5432")
    assert error.fields["C"] == "08006"
    assert error.fields["M"].startswith("could not verify the TLS certificate of node localhost:5432: unable to get local issuer")


def test_node_require_verifies_nothing(pki):
    cfg = ServerTlsConfig(mode="require")
    assert node_handshake(pki, cfg, "127.0.0.1", "server2")[1]


def test_node_context_offers_alpn_and_a_client_certificate(pki):
    d = pki.dir
    cfg = node_cfg(pki, cert=str(d / "client.crt"), key=str(d / "client.key"))
    server = server_ctx_plain(pki)
    server.load_verify_locations(str(d / "ca.crt"))
    server.set_verify(SSL.VERIFY_PEER)
    server.set_alpn_select_callback(lambda conn, offered: b"postgresql" if b"postgresql" in offered else b"")
    step = tls.NodeTls(cfg.mode, tls.node_context(cfg)).handshake("localhost")
    s, c = handshake(SSL.Connection(server), step.clientConnectionForTLS(None))
    assert c.get_alpn_proto_negotiated() == b"postgresql"
    assert tls.common_name(s.get_peer_certificate(as_cryptography=True)) == "app"
    assert s.get_servername() == b"localhost"  # SNI for host names, none for addresses


# --------------------------------------------------------------------------- channel binding


@pytest.mark.parametrize(
    "key_type, algorithm, expected",
    [("ec", hashes.SHA256(), "sha256"), ("ec", hashes.SHA384(), "sha384"), ("rsa", hashes.SHA512(), "sha512")],
)
def test_server_end_point_hash_follows_the_signature_hash(key_type, algorithm, expected):
    ca = testcerts.make_ca(key_type=key_type)
    cert = testcerts.issue(ca, "x", hash_algorithm=algorithm)
    assert tls.server_end_point_hash(cert.der) == hashlib.new(expected, cert.der).digest()


def test_server_end_point_hash_of_a_sha1_certificate_is_sha256(tmp_path):
    # RFC 5929: MD5 and SHA-1 become SHA-256. (cryptography no longer signs with SHA-1; openssl does.)
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    proc = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-sha1", "-nodes", "-subj", "/CN=old", "-days", "2",
         "-keyout", str(tmp_path / "k"), "-out", str(tmp_path / "c")],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        pytest.skip(f"openssl cannot make a SHA-1 certificate here: {proc.stderr[-200:]!r}")
    cert = x509.load_pem_x509_certificate((tmp_path / "c").read_bytes())
    assert cert.signature_hash_algorithm.name == "sha1"
    der = cert.public_bytes(Encoding.DER)
    assert tls.server_end_point_hash(der) == hashlib.sha256(der).digest()


def test_server_end_point_hash_is_none_without_a_signature_hash():
    ca = testcerts.make_ca(key_type="ed25519")
    assert tls.server_end_point_hash(testcerts.issue(ca, "x").der) is None


# --------------------------------------------------------------------------- the login's TLS events


def login(mode="require", auth="scram-sha-256", users=None):
    users = {"app": PLAIN} if users is None else users
    return ClientLogin(auth, users.get, MOCK_SECRET, token=lambda n: b"\x01" * n, tls_mode=mode, client_host="10.0.0.9")


def startup(user="app", database="appdb"):
    return m.startup_message({"user": user, "database": database})


def auth_requests(events):
    buf = bytearray(b"".join(e.data for e in events if isinstance(e, Reply)))
    return [m.decode_authentication(b) for t, b in pop_messages(buf, 1 << 20) if t == p.AUTHENTICATION]


def test_sslrequest_is_answered_s_then_start_tls():
    lg = login()
    assert lg.feed(m.ssl_request()) == [Reply(b"S"), StartTLS()]
    assert lg.tls_pending == "classic"
    assert lg.tls_started(channel_binding=b"h" * 32) == []
    assert lg.tls and lg.channel_binding == b"h" * 32
    (code, data), = auth_requests(lg.feed(startup()))
    assert code == p.AUTH_SASL and m.decode_sasl_mechanisms(data) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


@pytest.mark.parametrize("mode", ["disable"])
def test_disable_answers_n(mode):
    lg = login(mode)
    assert lg.feed(m.ssl_request()) == [Reply(b"N")]
    (code, data), = auth_requests(lg.feed(startup()))
    assert m.decode_sasl_mechanisms(data) == ["SCRAM-SHA-256"]


@pytest.mark.parametrize("extra", [b"\x00", m.query("SELECT 1"), startup()])
def test_bytes_piggybacked_on_sslrequest_are_never_processed(extra):
    lg = login("prefer")
    with pytest.raises(WireError) as e:
        lg.feed(m.ssl_request() + extra)
    assert e.value.sqlstate == "08P01"
    assert str(e.value) == "received unencrypted data after SSL request"
    assert "man-in-the-middle" in e.value.detail
    assert lg.startup is None


def test_bytes_before_the_handshake_finished_are_refused():
    lg = login()
    lg.feed(m.ssl_request())
    with pytest.raises(WireError, match="before the TLS handshake"):
        lg.feed(startup())


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_plaintext_login_refused_when_tls_is_required(mode):
    with pytest.raises(LoginError) as e:
        login(mode).feed(startup())
    assert e.value.sqlstate == "28000"
    assert e.value.message == 'no pg_hba.conf entry for host "10.0.0.9", user "app", database "appdb", no encryption: TLS is required'


@pytest.mark.parametrize("mode", ["allow", "prefer"])
def test_plaintext_login_allowed_below_require(mode):
    (code, data), = auth_requests(login(mode).feed(startup()))
    assert m.decode_sasl_mechanisms(data) == ["SCRAM-SHA-256"]  # no PLUS without TLS


def test_plaintext_cancel_still_heard_under_require():
    assert login().feed(m.cancel_request(7, b"key!")) == [CancelReceived(7, b"key!")]


def test_cancel_after_tls():
    lg = login()
    lg.feed(m.ssl_request())
    lg.tls_started()
    assert lg.feed(m.cancel_request(7, b"key!")) == [CancelReceived(7, b"key!")]


def test_second_sslrequest_inside_tls_is_refused():
    lg = login()
    lg.feed(m.ssl_request())
    lg.tls_started()
    with pytest.raises(WireError, match="already uses TLS"):
        lg.feed(m.ssl_request())


def test_gssencrequest_then_sslrequest():
    lg = login()
    assert lg.feed(m.gssenc_request()) == [Reply(b"N")]
    assert lg.feed(m.ssl_request()) == [Reply(b"S"), StartTLS()]


CLIENT_HELLO = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03"


def test_direct_tls_hands_the_client_hello_over():
    lg = login()
    assert lg.feed(CLIENT_HELLO) == [StartTLS(CLIENT_HELLO)]
    assert lg.tls_pending == "direct" and not lg.buffer
    lg.tls_started(alpn=b"postgresql", channel_binding=b"x" * 32)
    assert lg.tls
    assert auth_requests(lg.feed(startup()))[0][0] == p.AUTH_SASL


@pytest.mark.parametrize("alpn", [None, b"h2"])
def test_direct_tls_needs_alpn_postgresql(alpn):
    lg = login()
    lg.feed(CLIENT_HELLO)
    with pytest.raises(WireError, match="without ALPN"):
        lg.tls_started(alpn=alpn)


def test_direct_tls_is_not_a_startup_packet_when_disabled():
    with pytest.raises(WireError):
        login("disable").feed(CLIENT_HELLO)


def test_direct_tls_only_as_the_first_bytes():
    lg = login()
    lg.feed(m.gssenc_request())
    with pytest.raises(WireError):  # now it is read as a startup packet length: far too long
        lg.feed(CLIENT_HELLO)


def tls_login(mode="verify-full", auth="scram-sha-256", cn="app", **kw):
    lg = login(mode, auth, **kw)
    lg.feed(m.ssl_request())
    lg.tls_started(channel_binding=b"c" * 32, peer_cn=cn, peer_certificate=cn is not None)
    return lg


def test_verify_full_wants_the_cn_to_be_the_user():
    assert auth_requests(tls_login(cn="app").feed(startup()))
    with pytest.raises(LoginError) as e:
        tls_login(cn="mallory").feed(startup())
    assert e.value.sqlstate == "28000" and e.value.message == 'certificate authentication failed for user "app"'


def test_cert_auth_logs_in_the_cn_without_a_password():
    events = tls_login("verify-ca", "cert").feed(startup())
    assert auth_requests(events) == [(p.AUTH_OK, b"")]
    assert isinstance(events[-1], Authenticated) and events[-1].credential is PLAIN


@pytest.mark.parametrize("cn, user", [("mallory", "app"), (None, "app"), ("ghost", "ghost")])
def test_cert_auth_refuses(cn, user):
    with pytest.raises(LoginError) as e:
        tls_login("verify-ca", "cert", cn=cn).feed(startup(user))
    assert e.value.sqlstate == "28000" and "certificate authentication failed" in e.value.message


def _scram_plus(lg, cb: bytes, password: str = PASSWORD):
    """A client doing SCRAM-SHA-256-PLUS with tls-server-end-point data *cb*; returns the last events."""
    gs2 = "p=tls-server-end-point,,"
    bare = "n=,r=clientnonce"
    (code, data), = auth_requests(lg.feed(startup()))
    events = lg.feed(m.sasl_initial_response("SCRAM-SHA-256-PLUS", (gs2 + bare).encode()))
    (code, server_first), = auth_requests(events)
    attrs = dict(kv.split("=", 1) for kv in server_first.decode().split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored = hashlib.sha256(client_key).digest()
    without_proof = f"c={base64.b64encode(gs2.encode() + cb).decode()},r={attrs['r']}"
    auth_message = f"{bare},{server_first.decode()},{without_proof}".encode()
    signature = hmac.new(stored, auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    return lg.feed(m.password_message(f"{without_proof},p={base64.b64encode(proof).decode()}".encode()))


def test_scram_plus_binds_to_our_certificate():
    events = _scram_plus(tls_login("require", cn=None), b"c" * 32)
    assert isinstance(events[-1], Authenticated)


def test_scram_plus_with_another_certificate_fails():
    with pytest.raises(LoginError) as e:
        _scram_plus(tls_login("require", cn=None), b"d" * 32)
    assert e.value.sqlstate == "28P01"


# --------------------------------------------------------------------------- the client leg on a transport


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS and what the TLS layer was handed."""

    def __init__(self, handle=None):
        super().__init__(lenient=True)
        self.tls_creator = None
        self.handed = b""
        self.handle = handle
        self.protocol = SimpleNamespace(dataReceived=self._handed)

    def _handed(self, data):
        self.handed += data

    def startTLS(self, creator):
        self.tls_creator = creator

    def getHandle(self):
        return self.handle


@pytest.fixture(scope="module")
def tls_config(pki):
    d = pki.dir
    return configmod.from_dict(
        {
            **BASE,
            "auth_type": "scram-sha-256",
            "tls": {"mode": "require", "cert": str(d / "server.crt"), "key": str(d / "server.key")},
            "server_tls": {"mode": "verify-full", "ca": str(d / "ca.crt")},
        }
    )


def test_session_upgrades_after_sslrequest(pki, tls_config):
    proxy = Proxy(tls_config, MemoryReactorClock())
    issued = testcerts.Issued(pki.ca.cert, None)
    handle = SimpleNamespace(
        get_certificate=lambda as_cryptography=False: issued.cert,
        get_peer_certificate=lambda as_cryptography=False: None,
        get_alpn_proto_negotiated=lambda: b"",
    )
    transport = TLSStringTransport(handle)
    session = proxy.new_client(transport)
    session.got_data(m.ssl_request())
    assert transport.value() == b"S"
    assert transport.tls_creator is proxy.client_tls
    session.tls_established()
    assert session.login.tls and session.login.channel_binding == tls.server_end_point_hash(issued.der)
    transport.clear()
    session.got_data(startup())
    (code, data), = [m.decode_authentication(b) for t, b in pop_messages(bytearray(transport.value()), 1 << 20)]
    assert m.decode_sasl_mechanisms(data) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


def test_session_direct_tls_hands_the_hello_to_the_tls_layer(pki, tls_config):
    proxy = Proxy(tls_config, MemoryReactorClock())
    handle = SimpleNamespace(
        get_certificate=lambda as_cryptography=False: pki.ca.cert,
        get_peer_certificate=lambda as_cryptography=False: None,
        get_alpn_proto_negotiated=lambda: b"",
    )
    transport = TLSStringTransport(handle)
    session = proxy.new_client(transport)
    session.got_data(CLIENT_HELLO)
    assert transport.tls_creator is proxy.client_tls and transport.handed == CLIENT_HELLO
    assert transport.value() == b""
    session.tls_established()  # no ALPN: refused
    fields = m.decode_fields(pop_messages(bytearray(transport.value()), 1 << 20)[0][1])
    assert fields["C"] == "08P01" and "ALPN" in fields["M"]
    assert transport.disconnecting


def test_session_piggybacked_startup_is_fatal_08p01(tls_config):
    proxy = Proxy(tls_config, MemoryReactorClock())
    transport = TLSStringTransport()
    session = proxy.new_client(transport)
    session.got_data(m.ssl_request() + startup())
    (t, body), = pop_messages(bytearray(transport.value()), 1 << 20)
    fields = m.decode_fields(body)
    assert t == p.ERROR_RESPONSE and fields["C"] == "08P01"
    assert transport.tls_creator is None and transport.disconnecting


def test_reload_tls_swaps_contexts_and_keeps_them_on_failure(pki, tmp_path):
    d = tmp_path
    for name in ("server.crt", "server.key", "ca.crt"):
        (d / name).write_bytes((pki.dir / name).read_bytes())
    config = configmod.from_dict(
        {**BASE, "tls": {"mode": "require", "cert": str(d / "server.crt"), "key": str(d / "server.key")}, "server_tls": {"mode": "verify-ca", "ca": str(d / "ca.crt")}}
    )
    proxy = Proxy(config, MemoryReactorClock())
    first_client, first_node = proxy.client_tls, proxy.node_tls
    renewed = testcerts.issue(pki.ca, "renewed", dns=("localhost",))
    renewed.write(d, "server")
    proxy.reload_tls()
    assert proxy.client_tls is not first_client and proxy.node_tls is not first_node
    conn = proxy.client_tls.serverConnectionForTLS(None)
    assert tls.common_name(conn.get_certificate(as_cryptography=True)) == "renewed"
    (d / "server.key").write_bytes(b"garbage")
    with pytest.raises(tls.TlsSetupError):
        proxy.reload_tls()
    assert tls.common_name(proxy.client_tls.serverConnectionForTLS(None).get_certificate(as_cryptography=True)) == "renewed"


def test_reloaded_server_tls_reaches_the_health_probes(pki, tmp_path):
    """Renewed [server_tls] certificates must reach the health monitors too: probes verified with a
    stale CA after a rotation would mark every node down."""
    (tmp_path / "ca.crt").write_bytes((pki.dir / "ca.crt").read_bytes())
    config = configmod.from_dict(
        {
            **BASE,
            "databases": {"appdb": {"dbname": "postgres", "nodes": ["db1:5432", "db2:5432"]}},
            "server_tls": {"mode": "verify-ca", "ca": str(tmp_path / "ca.crt")},
        }
    )
    proxy = Proxy(config, MemoryReactorClock())
    monitor = proxy.router_for(config.databases["appdb"]).monitor
    assert monitor is not None and monitor.node_tls is proxy.node_tls
    first = proxy.node_tls
    proxy.reload_tls()
    assert proxy.node_tls is not first and monitor.node_tls is proxy.node_tls


# --------------------------------------------------------------------------- the node leg on a transport


class NodeTransport(StringTransport):
    def __init__(self):
        super().__init__(lenient=True)
        self.tls_creator = None

    def startTLS(self, creator):
        self.tls_creator = creator


def server_conn(mode="verify-full", pki=None):
    pool = SimpleNamespace(
        node=Address("localhost", 5432), max_prepared_statements=10, internal_timeout=0.0, clock=Clock(), server_closed=lambda conn: None
    )
    conn = ServerConnection("s1", pool, ServerLogin("app", "db", PLAIN, node_name="localhost:5432"))
    context = tls.node_context(ServerTlsConfig(mode=mode, ca=str(pki.dir / "ca.crt")) if pki else ServerTlsConfig(mode=mode))
    conn.tls = tls.NodeTls(mode, context)
    results = []
    conn.ready.addCallbacks(results.append, lambda f: results.append(f.value))
    transport = NodeTransport()
    conn.connection_made(transport)
    return conn, transport, results


def test_node_gets_sslrequest_first_and_startup_only_after_the_handshake(pki):
    conn, transport, results = server_conn(pki=pki)
    assert transport.value() == m.ssl_request()
    transport.clear()
    conn.got_data(b"S")
    assert isinstance(transport.tls_creator, tls.NodeHandshake) and transport.tls_creator.host == "localhost"
    assert transport.value() == b""  # nothing before the handshake
    conn.tls_established()
    assert transport.value() == m.startup_message({"user": "app", "database": "db"})
    conn.got_data(m.authentication_ok() + m.backend_key_data(1, b"abcd") + m.ready_for_query())
    assert results == [conn]


def test_node_refusing_tls_under_prefer_goes_plaintext():
    conn, transport, results = server_conn("prefer")
    transport.clear()
    conn.got_data(b"N")
    assert transport.tls_creator is None
    assert transport.value() == m.startup_message({"user": "app", "database": "db"})


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_node_refusing_tls_fails_the_login_above_prefer(pki, mode):
    conn, transport, results = server_conn(mode, pki)
    transport.clear()
    conn.got_data(b"N")
    (error,) = results
    assert isinstance(error, ServerLoginError)
    assert error.fields["C"] == "08006" and error.fields["M"] == "node localhost:5432 does not support TLS"
    assert transport.value() == b"" and transport.disconnecting


@pytest.mark.parametrize("answer", [b"SR", b"N\x00", b"X", b"E"])
def test_node_odd_answers_fail_the_login(answer):
    conn, transport, results = server_conn("prefer")
    conn.got_data(answer)
    (error,) = results
    assert isinstance(error, ServerLoginError) and error.fields["C"] in ("08P01", "08006")
    assert transport.tls_creator is None


def test_node_handshake_failure_names_the_node_and_the_reason(pki):
    conn, transport, results = server_conn(pki=pki)
    conn.got_data(b"S")
    conn.connection_lost(Failure(SSL.Error([("SSL routines", "", "tlsv1 alert protocol version")])))
    (error,) = results
    assert error.fields["M"] == "TLS handshake with node localhost:5432 failed: tlsv1 alert protocol version"


def test_node_closing_during_the_handshake(pki):
    conn, transport, results = server_conn(pki=pki)
    conn.got_data(b"S")
    conn.connection_lost(Failure(ConnectionLost()))
    (error,) = results
    assert error.fields["M"] == "node localhost:5432 closed the connection during the TLS handshake"


# --------------------------------------------------------------------------- cancel to a node


def cancel_to(mode=None, pki=None, clock=None):
    from pgtwist.backend.protocol import CancelFactory

    node_tls = None
    if mode is not None:
        cfg = ServerTlsConfig(mode=mode, ca=str(pki.dir / "ca.crt")) if pki else ServerTlsConfig(mode=mode)
        node_tls = tls.NodeTls(mode, tls.node_context(cfg))
    protocol = CancelFactory(777, b"KEY!", node_tls, Address("localhost", 5432), clock, 5.0).buildProtocol(None)
    transport = NodeTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_cancel_without_server_tls_goes_in_plaintext_at_once():
    protocol, transport = cancel_to()
    assert transport.value() == m.cancel_request(777, b"KEY!") and transport.disconnecting


def test_cancel_with_server_tls_waits_for_the_verified_handshake(pki):
    protocol, transport = cancel_to("verify-full", pki)
    assert transport.value() == m.ssl_request()  # no key before TLS
    transport.clear()
    protocol.dataReceived(b"S")
    assert isinstance(transport.tls_creator, tls.NodeHandshake) and transport.tls_creator.host == "localhost"
    assert transport.value() == b"" and not transport.disconnecting
    protocol.handshakeCompleted()
    assert transport.value() == m.cancel_request(777, b"KEY!") and transport.disconnecting


@pytest.mark.parametrize("answer", [b"N", b"E", b"SX"])
def test_cancel_is_not_sent_in_plaintext_to_a_node_that_will_not_do_tls(pki, answer):
    protocol, transport = cancel_to("verify-full", pki)
    transport.clear()
    protocol.dataReceived(answer)
    assert transport.value() == b"" and transport.disconnecting and transport.tls_creator is None


def test_cancel_to_a_node_that_never_answers_tls_gives_up_after_the_connect_timeout(pki):
    from twisted.internet.task import Clock

    clock = Clock()
    protocol, transport = cancel_to("verify-full", pki, clock)
    assert transport.value() == m.ssl_request()
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.1)  # the node is frozen: no answer, no handshake
    assert transport.aborted if hasattr(transport, "aborted") else transport.disconnecting
    assert clock.getDelayedCalls() == []
    protocol2, transport2 = cancel_to("verify-full", pki, clock)
    protocol2.dataReceived(b"S")
    protocol2.handshakeCompleted()  # delivered in time; the node then hangs up: no timer is left
    protocol2.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_cancel_under_prefer_falls_back_to_plaintext():
    protocol, transport = cancel_to("prefer")
    transport.clear()
    protocol.dataReceived(b"N")
    assert transport.value() == m.cancel_request(777, b"KEY!") and transport.disconnecting


def test_a_tls_failure_is_told_from_other_losses():
    assert tls.is_tls_failure(Failure(SSL.Error([("SSL routines", "", "wrong version number")])))
    assert tls.is_tls_failure(Failure(SSL.ZeroReturnError()))  # (a subclass)
    assert not tls.is_tls_failure(Failure(ConnectionLost()))
    assert not tls.is_tls_failure(None)
