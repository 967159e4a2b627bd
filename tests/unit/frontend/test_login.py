"""ClientLogin: the pure client login exchange (startup, negotiation, trust/md5/SCRAM), no I/O."""

import hashlib
import struct

import pytest

from pgtwist.auth import Credential, ScramClientExchange, ScramVerifier, md5_hash, md5_salted_response
from pgtwist.frontend.login import Authenticated, CancelReceived, ClientLogin, LoginError, Reply, StartTLS
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import MessageTooLarge, UnsupportedProtocol, WireError
from pgtwist.wire.framing import frame, pop_messages

MOCK_SECRET = b"m" * 32
SALT = b"\x01\x02\x03\x04"
PASSWORD = "s3cret pw"
# Built once: a plaintext Credential derives a SCRAM verifier (4096 PBKDF2 rounds).
PLAIN = Credential.parse("alice", PASSWORD)
VERIFIER = ScramVerifier.from_password(PASSWORD, b"0123456789abcdef", 4096)
SCRAM_ONLY = Credential.parse("alice", VERIFIER.to_text())
MD5_ONLY = Credential.parse("alice", md5_hash("alice", PASSWORD))


def make(auth_type="trust", users=None):
    users = {"alice": PLAIN} if users is None else users
    return ClientLogin(auth_type, users.get, MOCK_SECRET, token=lambda n: SALT[:n])


def startup(user="alice", database="db", **params):
    return m.startup_message({"user": user, "database": database, **params})


def replies(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Reply))


def parse(data: bytes) -> list[tuple[int, bytes]]:
    buf = bytearray(data)
    msgs = pop_messages(buf, p.MAX_PROTOCOL_MESSAGE)
    assert not buf, "reply ends inside a message"
    return msgs


def auth_request(events) -> tuple[int, bytes]:
    """The single Authentication message among the replies."""
    msgs = [(t, b) for t, b in parse(replies(events)) if t == p.AUTHENTICATION]
    assert len(msgs) == 1, msgs
    return m.decode_authentication(msgs[0][1])


def authenticated(events) -> Authenticated:
    done = [e for e in events if isinstance(e, Authenticated)]
    assert len(done) == 1, events
    return done[0]


def scram_login(login, client, user="alice"):
    """Run a SCRAM exchange with *client*; returns (events of the final step, server-final data)."""
    code, data = auth_request(login.feed(startup(user)))
    assert code == p.AUTH_SASL
    mechanisms = m.decode_sasl_mechanisms(data)
    events = login.feed(m.sasl_initial_response(client.mechanism(mechanisms), client.first()))
    code, server_first = auth_request(events)
    assert code == p.AUTH_SASL_CONTINUE
    return login.feed(m.password_message(client.handle_server_first(server_first))), server_first


# -- startup packet -----------------------------------------------------------------------


def test_trust_known_user():
    login = make("trust")
    events = login.feed(startup(application_name="app"))
    assert replies(events) == m.authentication_ok()
    done = authenticated(events)
    assert done.startup.user == "alice"
    assert done.startup.database == "db"
    assert done.startup.parameters["application_name"] == "app"
    assert done.credential is PLAIN
    assert done.client_key is None
    assert isinstance(events[-1], Authenticated)  # AuthenticationOk goes out first


def test_trust_unknown_user_refused():
    login = make("trust")
    with pytest.raises(LoginError) as e:
        login.feed(startup("mallory"))
    assert e.value.sqlstate == sqlstate.INVALID_AUTHORIZATION_SPECIFICATION == "28000"
    assert "mallory" in e.value.message


@pytest.mark.parametrize("split", range(1, len(startup())))
def test_startup_split_at_every_byte(split):
    data = startup()
    login = make("trust")
    assert login.feed(data[:split]) == []
    events = login.feed(data[split:])
    assert authenticated(events).startup.user == "alice"


def test_startup_one_byte_at_a_time():
    login = make("trust")
    events = []
    for byte in startup():
        events += login.feed(bytes([byte]))
    assert authenticated(events)


@pytest.mark.parametrize("first", [m.ssl_request(), m.gssenc_request()])
def test_encryption_request_answered_n_then_startup(first):
    login = make("trust")
    assert login.feed(first) == [Reply(b"N")]
    events = login.feed(startup())
    assert replies(events) == m.authentication_ok()
    assert authenticated(events)


def test_ssl_request_answered_the_same_whole_split_or_with_bytes_before_it():
    # A lone SSLRequest (libpq's first packet) is answered without the general walk: the same N,
    # counted the same, as one split across reads or behind another negotiation.
    whole, split, after = make("trust"), make("trust"), make("trust")
    assert whole.feed(m.ssl_request()) == [Reply(b"N")] and whole.negotiations == 1
    assert split.feed(m.ssl_request()[:3]) == [] and split.feed(m.ssl_request()[3:]) == [Reply(b"N")]
    assert split.negotiations == 1
    assert after.feed(m.gssenc_request()) == [Reply(b"N")] and after.feed(m.ssl_request()) == [Reply(b"N")]
    assert after.negotiations == 2
    for login in (whole, split, after):
        assert authenticated(login.feed(startup()))


def test_ssl_request_with_tls_on_is_not_answered_n():
    login = ClientLogin("trust", {"alice": PLAIN}.get, MOCK_SECRET, tls_mode="prefer")
    assert login.feed(m.ssl_request()) == [Reply(b"S"), StartTLS()]


def test_the_same_startup_packet_is_decoded_once_and_read_only():
    from pgtwist.frontend import login as login_module

    users = {"alice": PLAIN, "bob": PLAIN}
    first = authenticated(make(users=users).feed(startup(application_name="app"))).startup
    second = authenticated(make(users=users).feed(startup(application_name="app"))).startup
    other = authenticated(make(users=users).feed(startup(user="bob", application_name="app"))).startup
    assert second is first  # (decoded once)
    assert other.user == "bob" and first.user == "alice"
    with pytest.raises(TypeError):
        first.parameters["user"] = "bob"  # type: ignore[index]
    # Bounded: past the limit it starts again, and still answers right.
    for i in range(login_module._STARTUP_MESSAGES_LIMIT + 1):
        assert authenticated(make().feed(startup(application_name=f"a{i}"))).startup.parameters["application_name"] == f"a{i}"
    assert len(login_module._STARTUP_MESSAGES) <= login_module._STARTUP_MESSAGES_LIMIT


def test_ssl_then_gssenc_then_startup_in_one_read():
    login = make("trust")
    events = login.feed(m.gssenc_request() + m.ssl_request() + startup())
    assert events[0] == Reply(b"N") and events[1] == Reply(b"N")
    assert authenticated(events)


def test_third_negotiation_refused():
    login = make("trust")
    login.feed(m.ssl_request())
    login.feed(m.gssenc_request())
    with pytest.raises(WireError) as e:
        login.feed(m.ssl_request())
    assert e.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


def test_cancel_request_event():
    login = make("trust")
    events = login.feed(m.cancel_request(4242, b"\xde\xad\xbe\xef"))
    assert events == [CancelReceived(4242, b"\xde\xad\xbe\xef")]
    assert login.state == "done"
    # Nothing after a CancelRequest is read as a startup packet.
    assert login.feed(startup()) == []


def test_cancel_request_after_ssl_refusal():
    # PostgreSQL processes a CancelRequest whatever came before it, and libpq >= 17
    # (PQcancelCreate) negotiates encryption first under the default sslmode=prefer.
    login = make("trust")
    assert login.feed(m.ssl_request()) == [Reply(b"N")]
    assert login.feed(m.cancel_request(7, b"1234")) == [CancelReceived(7, b"1234")]


def test_protocol_3_2_gets_negotiate_protocol_version_before_auth():
    login = make("md5")
    packet = m.startup_message({"user": "alice", "database": "db"}, version=(3 << 16) | 2)
    events = login.feed(packet)
    msgs = parse(replies(events))
    assert [t for t, _ in msgs] == [p.NEGOTIATE_PROTOCOL_VERSION, p.AUTHENTICATION]
    assert m.decode_negotiate_protocol_version(msgs[0][1]) == (0, [])
    assert m.decode_authentication(msgs[1][1]) == (p.AUTH_MD5_PASSWORD, SALT)


def test_pq_dot_options_listed_in_negotiate_protocol_version():
    login = make("trust")
    events = login.feed(m.startup_message({"user": "alice", "_pq_.fancy": "on", "_pq_.other": "1"}))
    msgs = parse(replies(events))
    assert [t for t, _ in msgs] == [p.NEGOTIATE_PROTOCOL_VERSION, p.AUTHENTICATION]
    assert m.decode_negotiate_protocol_version(msgs[0][1]) == (0, ["_pq_.fancy", "_pq_.other"])
    assert "_pq_.fancy" not in authenticated(events).startup.parameters


def test_plain_3_0_gets_no_negotiation():
    events = make("trust").feed(startup())
    assert [t for t, _ in parse(replies(events))] == [p.AUTHENTICATION]


def test_protocol_2_unsupported():
    login = make("trust")
    body = struct.pack("!I", 2 << 16) + b"user\x00alice\x00\x00"
    with pytest.raises(UnsupportedProtocol) as e:
        login.feed(struct.pack("!I", len(body) + 4) + body)
    assert e.value.sqlstate == sqlstate.FEATURE_NOT_SUPPORTED == "0A000"


@pytest.mark.parametrize("value", ["true", "database", "on", "1", "TRUE"])
def test_replication_refused(value):
    with pytest.raises(LoginError) as e:
        make("trust").feed(startup(replication=value))
    assert e.value.sqlstate == sqlstate.FEATURE_NOT_SUPPORTED
    assert "replication" in e.value.message


@pytest.mark.parametrize("value", ["false", "off", "no", "0"])
def test_replication_false_accepted(value):
    assert authenticated(make("trust").feed(startup(replication=value)))


def test_startup_without_user_refused():
    with pytest.raises(WireError) as e:
        make("trust").feed(m.startup_message({"database": "db"}))
    assert e.value.sqlstate == "28000"


def test_oversized_startup_packet_refused():
    with pytest.raises(MessageTooLarge):
        make("trust").feed(struct.pack("!II", p.MAX_STARTUP_PACKET + 1, p.PROTOCOL_3_0))


# -- md5 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cred", [PLAIN, MD5_ONLY], ids=["plaintext", "md5-hash"])
def test_md5_happy_path(cred):
    login = make("md5", {"alice": cred})
    code, salt = auth_request(login.feed(startup()))
    assert (code, salt) == (p.AUTH_MD5_PASSWORD, SALT)
    response = md5_salted_response(md5_hash("alice", PASSWORD), salt)
    events = login.feed(m.password_message(response + b"\x00"))
    assert replies(events) == m.authentication_ok()
    done = authenticated(events)
    assert done.credential is cred and done.client_key is None


def test_md5_wrong_password():
    login = make("md5")
    login.feed(startup())
    response = md5_salted_response(md5_hash("alice", "wrong"), SALT)
    with pytest.raises(LoginError) as e:
        login.feed(m.password_message(response + b"\x00"))
    assert e.value.sqlstate == sqlstate.INVALID_PASSWORD == "28P01"
    assert e.value.message == 'password authentication failed for user "alice"'


def test_md5_unknown_user_same_failure():
    login = make("md5")
    code, salt = auth_request(login.feed(startup("nobody")))
    assert code == p.AUTH_MD5_PASSWORD
    response = md5_salted_response(md5_hash("nobody", PASSWORD), salt)
    with pytest.raises(LoginError) as e:
        login.feed(m.password_message(response + b"\x00"))
    assert (e.value.sqlstate, e.value.message) == ("28P01", 'password authentication failed for user "nobody"')


def test_md5_password_without_nul_is_protocol_violation():
    login = make("md5")
    login.feed(startup())
    with pytest.raises(WireError) as e:
        login.feed(m.password_message(b"md5abc"))
    assert e.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


def test_md5_with_scram_only_credential_upgrades_to_sasl():
    login = make("md5", {"alice": SCRAM_ONLY})
    code, data = auth_request(login.feed(startup()))
    assert code == p.AUTH_SASL
    assert m.decode_sasl_mechanisms(data) == ["SCRAM-SHA-256"]
    events, _ = scram_login(make("md5", {"alice": SCRAM_ONLY}), ScramClientExchange(password=PASSWORD))
    assert authenticated(events).client_key is not None


# -- SCRAM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cred", [PLAIN, SCRAM_ONLY], ids=["plaintext", "verifier"])
def test_scram_full_exchange(cred):
    login = make("scram-sha-256", {"alice": cred})
    client = ScramClientExchange(password=PASSWORD)
    events, _ = scram_login(login, client)
    msgs = parse(replies(events))
    assert [t for t, _ in msgs] == [p.AUTHENTICATION, p.AUTHENTICATION]
    code, server_final = m.decode_authentication(msgs[0][1])
    assert code == p.AUTH_SASL_FINAL
    client.handle_server_final(server_final)  # the client checks our server signature
    assert m.decode_authentication(msgs[1][1]) == (p.AUTH_OK, b"")
    done = authenticated(events)
    assert done.credential is cred
    # The recovered ClientKey is what the stored key was made from.
    assert hashlib.sha256(done.client_key).digest() == cred.scram.stored_key


def test_scram_sasl_messages_split_at_every_byte():
    login = make("scram-sha-256")
    client = ScramClientExchange(password=PASSWORD)
    code, data = auth_request(login.feed(startup()))
    initial = m.sasl_initial_response("SCRAM-SHA-256", client.first())
    events = []
    for b in initial:
        events += login.feed(bytes([b]))
    _, server_first = auth_request(events)
    final = m.password_message(client.handle_server_first(server_first))
    events = []
    for b in final:
        events += login.feed(bytes([b]))
    assert authenticated(events)


def test_scram_wrong_password():
    login = make("scram-sha-256")
    with pytest.raises(LoginError) as e:
        scram_login(login, ScramClientExchange(password="wrong"))
    assert e.value.sqlstate == "28P01"
    assert e.value.message == 'password authentication failed for user "alice"'


def test_scram_unknown_user_looks_the_same():
    def server_first_shape(user):
        login = make("scram-sha-256")
        client = ScramClientExchange(password="whatever", nonce=b"clientnonce")
        code, data = auth_request(login.feed(startup(user)))
        mechs = m.decode_sasl_mechanisms(data)
        _, first = auth_request(login.feed(m.sasl_initial_response("SCRAM-SHA-256", client.first())))
        with pytest.raises(LoginError) as e:
            login.feed(m.password_message(client.handle_server_first(first)))
        attrs = [item[:2] for item in first.decode().split(",")]
        salt = first.decode().split(",")[1]
        iterations = first.decode().split(",")[2]
        return code, mechs, attrs, len(salt), iterations, e.value.sqlstate, e.value.message.replace(user, "U")

    assert server_first_shape("alice") == server_first_shape("nobody")


def test_scram_unknown_user_message_and_stable_salt():
    def salt_for(user):
        login = make("scram-sha-256")
        client = ScramClientExchange(password=PASSWORD)
        auth_request(login.feed(startup(user)))
        _, first = auth_request(login.feed(m.sasl_initial_response("SCRAM-SHA-256", client.first())))
        return first.decode().split(",")[1], login, client, first

    salt1, login, client, first = salt_for("nobody")
    salt2, *_ = salt_for("nobody")
    assert salt1 == salt2  # the same unknown user always gets the same salt
    assert salt_for("somebody")[0] != salt1
    with pytest.raises(LoginError) as e:
        login.feed(m.password_message(client.handle_server_first(first)))
    assert (e.value.sqlstate, e.value.message) == ("28P01", 'password authentication failed for user "nobody"')


def test_scram_with_md5_only_credential_fails_like_wrong_password():
    login = make("scram-sha-256", {"alice": MD5_ONLY})
    with pytest.raises(LoginError) as e:
        scram_login(login, ScramClientExchange(password=PASSWORD))
    assert e.value.sqlstate == "28P01"


def test_scram_bad_mechanism_is_protocol_violation():
    login = make("scram-sha-256")
    login.feed(startup())
    with pytest.raises(WireError) as e:
        login.feed(m.sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=abc"))
    assert e.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


def test_scram_malformed_client_first_is_protocol_violation():
    login = make("scram-sha-256")
    login.feed(startup())
    with pytest.raises(WireError) as e:
        login.feed(m.sasl_initial_response("SCRAM-SHA-256", b"garbage"))
    assert e.value.sqlstate == "08P01"


# -- messages during authentication --------------------------------------------------------


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256"])
def test_non_password_message_during_auth(auth_type):
    login = make(auth_type)
    login.feed(startup())
    with pytest.raises(WireError) as e:
        login.feed(m.query("SELECT 1"))
    assert e.value.sqlstate == sqlstate.PROTOCOL_VIOLATION == "08P01"


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256"])
def test_oversized_auth_message(auth_type):
    login = make(auth_type)
    login.feed(startup())
    with pytest.raises(WireError) as e:
        login.feed(b"p" + struct.pack("!I", p.MAX_AUTH_MESSAGE + 1))
    assert isinstance(e.value, MessageTooLarge)
    assert e.value.sqlstate == "08P01"


def test_auth_message_bad_length():
    login = make("md5")
    login.feed(startup())
    with pytest.raises(WireError):
        login.feed(b"p" + struct.pack("!I", 3))


# -- leftover -----------------------------------------------------------------------------


def test_leftover_returns_pipelined_bytes_after_trust():
    login = make("trust")
    pipelined = m.query("SELECT 1") + m.terminate()
    events = login.feed(startup() + pipelined)
    assert authenticated(events)
    assert login.leftover() == pipelined
    assert login.leftover() == b""


def test_leftover_after_md5():
    login = make("md5")
    login.feed(startup())
    pipelined = m.query("SELECT 1")
    response = m.password_message(md5_salted_response(md5_hash("alice", PASSWORD), SALT) + b"\x00")
    events = login.feed(response + pipelined[:3])
    assert authenticated(events)
    assert login.feed(pipelined[3:]) == []
    assert login.leftover() == pipelined


def test_feed_after_done_yields_nothing():
    login = make("trust")
    login.feed(startup())
    assert login.feed(frame(ord("Q"), b"x\x00")) == []
