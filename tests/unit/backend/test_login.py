"""ServerLogin: logging in to a node as a pure exchange, against a scripted fake node."""

import pytest

from pgtwist.auth import (
    AuthFailed,
    Credential,
    ScramClientExchange,
    ScramServerExchange,
    ScramVerifier,
    md5_hash,
    md5_salted_response,
)
from pgtwist.backend.login import ServerLogin, ServerLoginError
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.framing import pop_messages, pop_startup_packet

PASSWORD = "node pw"
SALT = b"\x0a\x0b\x0c\x0d"
VERIFIER = ScramVerifier.from_password(PASSWORD, b"saltsaltsaltsalt", 4096)
PLAIN = Credential.parse("app", PASSWORD)
MD5_ONLY = Credential.parse("app", md5_hash("app", PASSWORD))
SCRAM_ONLY = Credential.parse("app", VERIFIER.to_text())

WELCOME = (
    m.parameter_status("server_version", "16.4")
    + m.parameter_status("client_encoding", "UTF8")
    + m.backend_key_data(777, b"\x01\x02\x03\x04")
    + m.ready_for_query()
)


def run(login: ServerLogin, data: bytes) -> list[bytes]:
    """Feed every message in *data*; return what the login wanted to send back."""
    buf = bytearray(data)
    out = []
    for msg_type, body in pop_messages(buf, p.MAX_PROTOCOL_MESSAGE):
        reply = login.feed(msg_type, body)
        if reply:
            out.append(reply)
    assert not buf
    return out


def one_message(data: bytes) -> tuple[int, bytes]:
    buf = bytearray(data)
    msgs = pop_messages(buf, p.MAX_PROTOCOL_MESSAGE)
    assert len(msgs) == 1 and not buf
    return msgs[0]


def make(credential=PLAIN, **kw) -> ServerLogin:
    return ServerLogin("app", "appdb", credential, node_name="db1:5432", **kw)


def test_start_is_a_startup_message():
    body = pop_startup_packet(bytearray(make().start()), p.MAX_STARTUP_PACKET)
    packet = m.decode_startup_packet(body)
    assert (packet.major, packet.minor) == (3, 0)
    assert packet.parameters == {"user": "app", "database": "appdb"}


def test_trust_collects_parameters_and_key_and_finishes_on_ready():
    login = make(None)
    assert run(login, m.authentication_ok()) == []
    assert not login.done
    assert run(login, WELCOME[:-len(m.ready_for_query())]) == []
    assert not login.done
    assert login.parameters == {"server_version": "16.4", "client_encoding": "UTF8"}
    assert login.backend_key == (777, b"\x01\x02\x03\x04")
    run(login, m.ready_for_query())
    assert login.done


def test_notice_and_negotiate_protocol_version_ignored():
    login = make(None)
    run(login, m.negotiate_protocol_version(0, ("_pq_.x",)) + m.authentication_ok())
    run(login, m.notice_response("01000", "hello") + WELCOME)
    assert login.done


@pytest.mark.parametrize("cred", [PLAIN], ids=["plaintext"])
def test_cleartext(cred):
    login = make(cred)
    (reply,) = run(login, m.authentication_cleartext_password())
    assert one_message(reply) == (p.PASSWORD, PASSWORD.encode() + b"\x00")
    run(login, m.authentication_ok() + WELCOME)
    assert login.done


@pytest.mark.parametrize("cred", [MD5_ONLY, SCRAM_ONLY, None], ids=["md5", "scram", "none"])
def test_cleartext_without_plaintext_fails(cred):
    with pytest.raises(ServerLoginError) as e:
        run(make(cred), m.authentication_cleartext_password())
    assert e.value.fields["C"] == sqlstate.INVALID_PASSWORD
    assert e.value.fields["S"] == "FATAL"
    assert 'node db1:5432 as user "app"' in e.value.fields["D"]


@pytest.mark.parametrize("cred", [PLAIN, MD5_ONLY], ids=["plaintext", "md5-hash"])
def test_md5(cred):
    login = make(cred)
    (reply,) = run(login, m.authentication_md5_password(SALT))
    expected = md5_salted_response(md5_hash("app", PASSWORD), SALT) + b"\x00"
    assert one_message(reply) == (p.PASSWORD, expected)
    run(login, m.authentication_ok() + WELCOME)
    assert login.done


@pytest.mark.parametrize("cred", [SCRAM_ONLY, None], ids=["scram", "none"])
def test_md5_without_md5_secret_fails(cred):
    with pytest.raises(ServerLoginError) as e:
        run(make(cred), m.authentication_md5_password(SALT))
    assert e.value.fields["C"] == "28P01"


def node_scram(login: ServerLogin, node: ScramServerExchange, *, finish=True) -> None:
    """Play the node's side of SASL against *login*."""
    (initial,) = run(login, m.authentication_sasl(node.mechanisms()))
    t, body = one_message(initial)
    assert t == p.PASSWORD
    mechanism, client_first = m.decode_sasl_initial_response(body)
    assert mechanism == "SCRAM-SHA-256"
    (final,) = run(login, m.authentication_sasl_continue(node.initial(mechanism, client_first)))
    t, client_final = one_message(final)
    assert t == p.PASSWORD
    server_final = node.final(client_final)  # raises AuthFailed on a wrong proof
    if finish:
        assert run(login, m.authentication_sasl_final(server_final) + m.authentication_ok() + WELCOME) == []


def test_scram_with_password():
    login = make(PLAIN)
    node_scram(login, ScramServerExchange(VERIFIER))
    assert login.done and login.backend_key == (777, b"\x01\x02\x03\x04")


def test_scram_with_wrong_password_is_refused_by_node():
    login = make(Credential.parse("app", "not it"))
    with pytest.raises(AuthFailed):
        node_scram(login, ScramServerExchange(VERIFIER))


def client_key_from_client_login(password=PASSWORD) -> bytes:
    """What ClientLogin recovers when a client logs in to the proxy with *password*."""
    proxy_side = ScramServerExchange(VERIFIER)
    client = ScramClientExchange(password=password)
    server_first = proxy_side.initial("SCRAM-SHA-256", client.first())
    proxy_side.final(client.handle_server_first(server_first))
    return proxy_side.client_key


def test_scram_pass_through_with_client_key():
    login = make(SCRAM_ONLY, client_key=client_key_from_client_login())
    node_scram(login, ScramServerExchange(VERIFIER))  # the node stores the same verifier
    assert login.done


def test_scram_pass_through_checks_node_signature():
    login = make(SCRAM_ONLY, client_key=client_key_from_client_login())
    node = ScramServerExchange(VERIFIER)
    node_scram(login, node, finish=False)
    bogus = b"v=" + b"A" * 43 + b"="
    with pytest.raises(ServerLoginError) as e:
        run(login, m.authentication_sasl_final(bogus))
    assert e.value.fields["C"] == "28P01"
    assert "signature" in e.value.fields["M"]


def test_scram_pass_through_with_different_node_verifier():
    other = ScramVerifier.from_password(PASSWORD, b"another salt....", 4096)
    login = make(SCRAM_ONLY, client_key=client_key_from_client_login())
    node = ScramServerExchange(other)
    (initial,) = run(login, m.authentication_sasl(node.mechanisms()))
    _, client_first = m.decode_sasl_initial_response(one_message(initial)[1])
    with pytest.raises(ServerLoginError) as e:
        run(login, m.authentication_sasl_continue(node.initial("SCRAM-SHA-256", client_first)))
    assert e.value.fields["C"] == "28P01"
    assert "salt" in e.value.fields["M"]


@pytest.mark.parametrize("cred", [SCRAM_ONLY, MD5_ONLY, None], ids=["verifier-no-key", "md5", "none"])
def test_scram_without_usable_secret(cred):
    with pytest.raises(ServerLoginError) as e:
        run(make(cred), m.authentication_sasl(["SCRAM-SHA-256"]))
    fields = e.value.fields
    assert fields["C"] == sqlstate.INVALID_PASSWORD == "28P01"
    expected = "only an md5 hash" if cred is MD5_ONLY else "neither the password nor a ClientKey"
    assert "SCRAM" in fields["M"] and expected in fields["M"]
    assert "db1:5432" in fields["D"]


def test_scram_node_error_in_server_final():
    login = make(PLAIN)
    node = ScramServerExchange(VERIFIER)
    node_scram(login, node, finish=False)
    with pytest.raises(ServerLoginError) as e:
        run(login, m.authentication_sasl_final(b"e=invalid-proof"))
    assert e.value.fields["C"] == "28P01"
    assert "invalid-proof" in e.value.fields["M"]


def test_scram_node_offers_only_plus():
    with pytest.raises(ServerLoginError) as e:
        run(make(PLAIN), m.authentication_sasl(["SCRAM-SHA-256-PLUS"]))
    assert e.value.fields["C"] == "28P01"


def test_sasl_continue_before_sasl_is_refused():
    with pytest.raises(ServerLoginError):
        run(make(PLAIN), m.authentication_sasl_continue(b"r=x,s=eA==,i=1"))


def test_error_response_carries_node_fields():
    login = make(PLAIN)
    error = m.error_response("FATAL", "3D000", 'database "appdb" does not exist', detail="node says so")
    with pytest.raises(ServerLoginError) as e:
        run(login, error)
    assert e.value.fields == {"S": "FATAL", "V": "FATAL", "C": "3D000", "M": 'database "appdb" does not exist', "D": "node says so"}
    assert str(e.value) == 'database "appdb" does not exist'


def test_error_response_without_sqlstate_does_not_crash():
    login = make(PLAIN)
    body = b"SFATAL\x00Mgo away\x00\x00"
    with pytest.raises(ServerLoginError) as e:
        login.feed(p.ERROR_RESPONSE, body)
    assert e.value.fields["C"] == sqlstate.CONNECTION_FAILURE == "08006"
    assert e.value.fields["M"] == "go away"
    # The fields can be sent on to a client as they are.
    t, out = one_message(m.error_response_from_fields(e.value.fields))
    assert m.decode_fields(out)["C"] == "08006"


def test_empty_error_response_gets_defaults():
    with pytest.raises(ServerLoginError) as e:
        make(PLAIN).feed(p.ERROR_RESPONSE, b"")
    fields = e.value.fields
    assert fields["C"] == "08006" and fields["M"] and "db1:5432" in fields["D"]


@pytest.mark.parametrize("code", [p.AUTH_KERBEROS_V5, p.AUTH_GSS, p.AUTH_SSPI, 99])
def test_unknown_auth_code(code):
    with pytest.raises(ServerLoginError) as e:
        run(make(PLAIN), m.authentication(code))
    assert e.value.fields["C"] == sqlstate.FEATURE_NOT_SUPPORTED == "0A000"
    assert str(code) in e.value.fields["M"]


def test_unexpected_message_during_login():
    with pytest.raises(ServerLoginError) as e:
        make(PLAIN).feed(ord("D"), b"\x00\x00")
    assert e.value.fields["C"] == sqlstate.PROTOCOL_VIOLATION


def test_builds_fatal_fields():
    e = ServerLoginError("08006", "boom", "because")
    assert e.fields == {"S": "FATAL", "V": "FATAL", "C": "08006", "M": "boom", "D": "because"}
    assert str(e) == "boom"
    assert str(ServerLoginError.from_fields({})) == "login to node failed"
