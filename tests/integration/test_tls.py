"""TLS end to end: clients -> pgtwist (its own certificate) and pgtwist -> a PostgreSQL node with ssl = on.

A throwaway PKI (pgtwist.tools.testcerts) signs pgtwist's certificate, client certificates and the node's
(from a separate CA). Every wait is bounded (socket timeouts, subprocess timeouts, per-test deadline).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import psycopg
import pytest

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.proxy import DATABASE, RawClient, ServerError, error_fields_of, psql, wait_for
from tests.harness.tlshelpers import direct_tls_client, make_pki, s_client, start_tls_proxy, starttls_client, tls_cluster
from tests.harness.workers import on_each_worker

pytestmark = pytest.mark.integration

SSL_OF_BACKEND = "SELECT ssl, coalesce(client_dn, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), "app")


@pytest.fixture(scope="module")
def tls_node(pki):
    """A primary with ssl = on (certificate from pki.nodes_ca, names DNS:localhost only)."""
    with tls_cluster(pki) as cluster:
        assert cluster.app_user == "app"
        yield cluster


def client_tls(pki, mode="require", **more):
    return {"mode": mode, "cert": pki.server_cert, "key": pki.server_key, **more}


def node_tls(pki, mode="verify-full", **more):
    return {"mode": mode, "ca": pki.nodes_ca, "cert": pki.proxy_client_cert, "key": pki.proxy_client_key, **more}


@pytest.fixture(scope="module")
def both_legs(tls_node, pki, tmp_path_factory):
    """[tls] require + [server_tls] verify-full towards the node, written as localhost:port."""
    with start_tls_proxy(
        tls_node, tmp_path_factory.mktemp("both"), tls=client_tls(pki), server_tls=node_tls(pki), node_host="localhost"
    ) as px:
        yield px


# --------------------------------------------------------------------------- both legs


def test_psql_verify_full_through_a_tls_node_leg(both_legs, pki):
    out = psql(both_legs, SSL_OF_BACKEND, host="localhost", sslmode="verify-full", sslrootcert=pki.ca).stdout.strip()
    # pg_stat_ssl on the node: pgtwist's leg is TLS, with pgtwist's client certificate.
    assert out == "t|/CN=pgtwist"


def test_psycopg_verify_full_by_ip_address(both_legs, pki):
    with both_legs.connect(host="127.0.0.1", sslmode="verify-full", sslrootcert=str(pki.ca)) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute(SSL_OF_BACKEND).fetchone() == (True, "/CN=pgtwist")


def test_plaintext_client_refused_under_require(both_legs):
    with RawClient(both_legs.host, both_legs.port) as c:
        c.startup(both_legs.user, DATABASE)
        fields = error_fields_of(c.wait_closed(10))
    assert fields is not None
    assert fields["S"] == "FATAL" and fields["C"] == "28000"
    assert "TLS is required" in fields["M"] and "no encryption" in fields["M"]
    proc = psql(both_legs, "SELECT 1", sslmode="disable", check=False)
    assert proc.returncode != 0 and "TLS is required" in proc.stderr


def test_channel_binding_require(both_legs, pki):
    with both_legs.connect(sslmode="verify-full", sslrootcert=str(pki.ca), host="localhost", channel_binding="require") as conn:
        assert conn.execute("SELECT 42").fetchone() == (42,)
    out = psql(both_legs, "SELECT 1", sslmode="require", channel_binding="require").stdout.strip()
    assert out == "1"


def test_cancel_over_tls(both_legs, pki):
    # libpq 17+ negotiates TLS for its CancelRequest (older ones send it in plaintext: see below).
    with both_legs.connect(sslmode="verify-full", sslrootcert=str(pki.ca), host="localhost") as conn:
        started = time.monotonic()
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
        finally:
            timer.cancel()
        assert time.monotonic() - started < 10


def test_plaintext_cancel_request_is_heard_under_require(both_legs, pki):
    with direct_tls_client(both_legs, pki.ca) as c:
        c.login(both_legs.user, DATABASE, both_legs.password)
        pid, key = c.backend_key
        c.send(m.query("SELECT pg_sleep(20)"))
        time.sleep(0.3)  # let the query reach the node (a cancel before it would be a no-op)
        with RawClient(both_legs.host, both_legs.port) as cancel:
            cancel.send(m.cancel_request(pid, key))
            cancel.wait_closed(5)
        started = time.monotonic()
        with pytest.raises(ServerError) as e:
            while True:
                t, body = c.read_message()
                if t == p.ERROR_RESPONSE:
                    raise ServerError(m.decode_fields(body))
        assert e.value.sqlstate == "57014" and time.monotonic() - started < 10


def test_certificates_reload_on_sighup_without_dropping_connections(tls_node, pki, tmp_path):
    from pgtwist.tools import testcerts

    files = tmp_path / "certs"
    files.mkdir()
    shutil.copy(pki.server_cert, files / "server.crt")
    shutil.copy(pki.server_key, files / "server.key")
    tls = {"mode": "require", "cert": files / "server.crt", "key": files / "server.key"}
    with start_tls_proxy(tls_node, tmp_path, tls=tls) as px:
        with starttls_client(px, pki.ca) as before:
            assert dict(x[0] for x in before.sock.getpeercert()["subject"])["commonName"] == "localhost"
            before.login(px.user, DATABASE, px.password)
            with px.connect(sslmode="verify-full", sslrootcert=str(pki.ca), host="localhost") as open_conn:
                renewed_ca = testcerts.make_ca("renewed CA")  # trusted alongside the first
                both = tmp_path / "both-cas.crt"
                both.write_bytes(pki.ca.read_bytes() + renewed_ca.cert_pem)
                renewed = testcerts.issue(renewed_ca, "renewed", dns=("localhost",), ips=("127.0.0.1",))
                renewed.write(files, "server")
                offset = px.log_size()
                os.kill(px.pid, signal.SIGHUP)
                wait_for(lambda: "applied" in px.log_text(offset), 10, "the reload to be applied")
                with starttls_client(px, both) as after:
                    assert dict(x[0] for x in after.sock.getpeercert()["subject"])["commonName"] == "renewed"
                    after.login(px.user, DATABASE, px.password)
                    assert after.scalar("SELECT 1") == "1"
                # Connections made before the reload carry on with the old certificate.
                assert open_conn.execute("SELECT 2").fetchone() == (2,)
                assert before.scalar("SELECT 3") == "3"


def test_piggybacked_startup_after_sslrequest_is_never_answered(both_legs):
    with RawClient(both_legs.host, both_legs.port) as c:
        # One write: SSLRequest and a plaintext StartupMessage behind it.
        c.send(m.ssl_request() + m.startup_message({"user": both_legs.user, "database": DATABASE}))
        data = c.wait_closed(10)
    fields = error_fields_of(data)
    assert fields is not None, data
    assert fields["C"] == "08P01" and fields["M"] == "received unencrypted data after SSL request"
    assert data[:1] == b"E" and b"R\x00\x00\x00" not in data  # no S, no authentication request


def test_plaintext_after_s_goes_to_the_tls_layer_and_nowhere_else(both_legs):
    with RawClient(both_legs.host, both_legs.port) as c:
        c.send(m.ssl_request())
        assert c.read_byte() == ord("S")
        c.send(m.startup_message({"user": both_legs.user, "database": DATABASE}))
        data = c.wait_closed(10)
    # At most a TLS alert record (0x15); never a protocol message.
    assert not data or data[0] == 0x15, data


def test_openssl_s_client_tls_1_1_fails_and_1_2_verifies(both_legs, pki):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    # SECLEVEL=0 lets this openssl offer TLS 1.1 at all: the refusal is pgtwist's (alert 70).
    old = s_client(both_legs.port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old.returncode != 0
    assert "alert protocol version" in old.stdout + old.stderr, old.stdout + old.stderr
    new = s_client(both_legs.port, "-tls1_2", "-CAfile", str(pki.ca), "-verify_return_error", "-verify_hostname", "localhost")
    assert new.returncode == 0, new.stdout + new.stderr
    assert "Verify return code: 0 (ok)" in new.stdout and "Verified peername: localhost" in new.stdout
    assert "Protocol  : TLSv1.2" in new.stdout


def test_direct_tls_with_alpn(both_legs, pki):
    with direct_tls_client(both_legs, pki.ca) as c:
        assert c.sock.selected_alpn_protocol() == "postgresql"
        seen = c.login(both_legs.user, DATABASE, both_legs.password)
        mechanisms = [m.decode_sasl_mechanisms(m.decode_authentication(b)[1]) for t, b in seen if t == p.AUTHENTICATION and m.decode_authentication(b)[0] == p.AUTH_SASL]
        assert mechanisms == [["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]]
        assert c.scalar("SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == "true"


def test_direct_tls_with_libpq(both_legs, pki):
    if psycopg.pq.version() < 170000:
        pytest.skip("libpq < 17 has no sslnegotiation=direct")
    with both_legs.connect(sslmode="verify-full", sslrootcert=str(pki.ca), host="localhost", sslnegotiation="direct") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_direct_tls_without_alpn_is_refused(both_legs, pki):
    with direct_tls_client(both_legs, pki.ca, alpn=None) as c:
        assert c.sock.selected_alpn_protocol() is None
        c.startup(both_legs.user, DATABASE)
        data = c.wait_closed(10)
    fields = error_fields_of(data)
    assert fields is not None and fields["C"] == "08P01" and "ALPN" in fields["M"]


# --------------------------------------------------------------------------- client certificates


@pytest.fixture(scope="module")
def verify_ca_proxy(tls_node, pki, tmp_path_factory):
    with start_tls_proxy(
        tls_node, tmp_path_factory.mktemp("verifyca"), tls=client_tls(pki, "verify-ca", ca=pki.ca), server_tls=node_tls(pki), node_host="localhost"
    ) as px:
        yield px


def test_verify_ca_demands_a_client_certificate(verify_ca_proxy, pki):
    proc = psql(verify_ca_proxy, "SELECT 1", sslmode="require", sslcert="/nonexistent", sslkey="/nonexistent", check=False)
    assert proc.returncode != 0
    assert "certificate" in proc.stderr, proc.stderr
    out = psql(verify_ca_proxy, "SELECT current_user", sslmode="verify-full", host="localhost", sslrootcert=pki.ca, sslcert=pki.client_cert, sslkey=pki.client_key)
    assert out.stdout.strip() == "app"


def test_verify_ca_refuses_a_certificate_from_another_ca(verify_ca_proxy, pki, tmp_path):
    from pgtwist.tools import testcerts

    stray = testcerts.issue(testcerts.make_ca("stray CA"), "app", client=True)
    cert, key = stray.write(tmp_path, "stray")
    proc = psql(verify_ca_proxy, "SELECT 1", sslmode="require", sslcert=cert, sslkey=key, check=False)
    assert proc.returncode != 0


def test_cert_auth_maps_the_cn_to_the_user(tls_node, pki, tmp_path):
    with start_tls_proxy(
        tls_node, tmp_path, auth_type="cert", tls=client_tls(pki, "verify-ca", ca=pki.ca), server_tls=node_tls(pki), node_host="localhost"
    ) as px:
        env_password = px.cluster.app_password
        px.cluster.app_password = "not-this"  # psql gets a wrong password: it is never asked for
        try:
            out = psql(px, "SELECT current_user", sslmode="require", sslcert=pki.client_cert, sslkey=pki.client_key)
            assert out.stdout.strip() == "app"
            proc = psql(px, "SELECT 1", sslmode="require", sslcert=pki.stranger_cert, sslkey=pki.stranger_key, check=False)
            assert proc.returncode != 0
            assert 'certificate authentication failed for user "app"' in proc.stderr
        finally:
            px.cluster.app_password = env_password


# --------------------------------------------------------------------------- the node leg


def timed_failure(px, **dsn):
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as e:
        px.connect(**dsn)
    return str(e.value), time.monotonic() - started


def test_node_certificate_from_an_unknown_ca_fails_fast(tls_node, pki, tmp_path):
    with start_tls_proxy(
        tls_node,
        tmp_path,
        server_tls=node_tls(pki, ca=pki.other_ca),
        node_host="localhost",
        server_connect_timeout=30,
    ) as px:
        message, elapsed = timed_failure(px)
        log = px.log_text()
    node = f"localhost:{tls_node.nodes[0].port}"
    assert elapsed < 5, elapsed
    assert f"could not verify the TLS certificate of node {node}" in message
    assert "not signed by a CA in server_tls.ca" in message, message
    assert "unable to get local issuer certificate" in message or "self-signed" in message or "issuer" in message
    assert "could not verify the TLS certificate" in log


def test_node_name_mismatch_fails_under_verify_full(tls_node, pki, tmp_path):
    with start_tls_proxy(tls_node, tmp_path, server_tls=node_tls(pki), node_host="127.0.0.1", server_connect_timeout=30) as px:
        message, elapsed = timed_failure(px)
    assert elapsed < 5
    assert "the certificate is for DNS:localhost, not 127.0.0.1" in message, message


def test_node_verify_ca_does_not_check_the_name(tls_node, pki, tmp_path):
    with start_tls_proxy(tls_node, tmp_path, server_tls=node_tls(pki, "verify-ca"), node_host="127.0.0.1") as px:
        with px.connect() as conn:
            assert conn.execute(SSL_OF_BACKEND).fetchone() == (True, "/CN=pgtwist")


def test_node_require_without_a_client_certificate(tls_node, pki, tmp_path):
    with start_tls_proxy(tls_node, tmp_path, server_tls={"mode": "require"}) as px:
        with px.connect() as conn:
            assert conn.execute(SSL_OF_BACKEND).fetchone() == (True, "")


def test_node_without_tls_under_require_fails_clearly(pg_cluster, tmp_path):
    with start_tls_proxy(pg_cluster, tmp_path, server_tls={"mode": "require"}, server_connect_timeout=30) as px:
        message, elapsed = timed_failure(px)
    assert elapsed < 5
    assert f"node {pg_cluster.nodes[0].addr} does not support TLS" in message


def test_node_without_tls_under_prefer_stays_plaintext(pg_cluster, tmp_path):
    with start_tls_proxy(pg_cluster, tmp_path, server_tls={"mode": "prefer"}) as px:
        with px.connect() as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (False,)


def test_prefer_mode_takes_tls_and_plaintext_clients(tls_node, pki, tmp_path):
    with start_tls_proxy(tls_node, tmp_path, tls=client_tls(pki, "prefer")) as px:
        with px.connect(sslmode="disable") as conn:
            assert not conn.pgconn.ssl_in_use
            conn.execute("SELECT 1")
        with px.connect(sslmode="require") as conn:
            assert conn.pgconn.ssl_in_use
            # No [server_tls]: the node leg is plaintext even though the client's is not.
            assert conn.execute(SSL_OF_BACKEND).fetchone() == (False, "")


def test_health_checks_to_nodes_are_tls_too(pki, tmp_path):
    """With [server_tls], the cluster monitor's probes are verified TLS like the traffic is."""
    with tls_cluster(pki, replicas=1) as cluster:
        nodes = [f"localhost:{n.port}" for n in cluster.nodes]
        databases = {DATABASE: {"dbname": cluster.app_database, "nodes": nodes}}
        with start_tls_proxy(
            cluster, tmp_path, server_tls=node_tls(pki), pool_mode="transaction", databases=databases, health_check_interval=0.2
        ) as px:
            replica_port = cluster.nodes[1].port

            def a_read_on_the_replica():
                with psycopg.connect(px.dsn(), autocommit=True) as conn:
                    return conn.execute("SELECT inet_server_port()").fetchone()[0] == replica_port

            # Reads reach the replica only once the monitor has found its role, over TLS.
            wait_for(a_read_on_the_replica, 20, "a read routed to the replica")
            for node in cluster.nodes:
                plaintext = cluster.psql(
                    node,
                    "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                    f"WHERE a.usename = '{cluster.app_user}' AND NOT s.ssl",
                )
                assert plaintext == "0", f"plaintext connections from pgtwist to {node.name}"


def test_both_legs_under_workers(tls_node, pki, tmp_path):
    # Each worker terminates its clients' TLS and speaks verified TLS to the node on its own.
    with start_tls_proxy(
        tls_node, tmp_path, tls=client_tls(pki), server_tls=node_tls(pki), node_host="localhost",
        workers=2, log_connections=True,
    ) as px:
        wait_for(lambda: px.log_text().count("listening on") >= 3, 30, "both workers up")
        conns = on_each_worker(px, host="127.0.0.1", sslmode="verify-full", sslrootcert=str(pki.ca))
        for conn in conns:
            with conn:
                assert conn.pgconn.ssl_in_use
                assert conn.execute(SSL_OF_BACKEND).fetchone() == (True, "/CN=pgtwist")
