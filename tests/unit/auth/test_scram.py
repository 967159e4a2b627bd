"""Tests for pgtwist.auth.scram: RFC 7677 vector, round trips, pass-through, hostile input."""

import base64
import hashlib
import hmac

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgtwist.auth import (
    MAX_CLIENT_ITERATIONS,
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    AuthError,
    AuthFailed,
    AuthProtocolError,
    Credential,
    ScramClientExchange,
    ScramServerExchange,
    ScramVerifier,
    mock_scram_verifier,
)

# RFC 7677 section 3 test vector.
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_NONCE = b"rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

VERIFIER = ScramVerifier.from_password("pencil", RFC_SALT, 4096)
CB_DATA = hashlib.sha256(b"fake server certificate").digest()
NONCE = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"


def rfc_server(**kwargs):
    return ScramServerExchange(VERIFIER, nonce=RFC_SERVER_NONCE, **kwargs)


def craft_final(password, server_first, client_first_bare, cbind_input, *, nonce=None, extra=""):
    """Client-final-message built independently of the module under test."""
    attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c={base64.b64encode(cbind_input).decode()},r={nonce or attrs['r']}{extra}".encode()
    auth_message = client_first_bare + b"," + server_first + b"," + without_proof
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    return without_proof + b",p=" + base64.b64encode(proof)


# --------------------------------------------------------------------------- RFC 7677


def test_rfc7677_server_side():
    server = rfc_server()
    assert server.mechanisms() == [SCRAM_SHA_256]
    assert server.initial(SCRAM_SHA_256, RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.client_key is None
    assert server.final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
    assert server.client_key == hmac.new(salted, b"Client Key", hashlib.sha256).digest()


def test_rfc7677_client_side():
    client = ScramClientExchange(password="pencil", username="user", nonce=RFC_CLIENT_NONCE)
    assert client.mechanism([SCRAM_SHA_256_PLUS, SCRAM_SHA_256]) == SCRAM_SHA_256
    assert client.first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.handle_server_final(RFC_SERVER_FINAL)


def test_client_first_is_libpq_style():
    first = ScramClientExchange(password="x").first()
    assert first.startswith(b"n,,n=,r=")
    nonce = first[len(b"n,,n=,r="):]
    assert len(base64.b64decode(nonce, validate=True)) == 18


def test_client_escapes_username():
    assert ScramClientExchange(password="x", username="a,b=c", nonce=b"abc").first() == b"n,,n=a=2Cb=3Dc,r=abc"


# --------------------------------------------------------------------------- round trips


def run_exchange(client, server, mechanism=SCRAM_SHA_256):
    client_final = client.handle_server_first(server.initial(mechanism, client.first()))
    server_final = server.final(client_final)
    client.handle_server_final(server_final)


def test_round_trip_with_password():
    server = ScramServerExchange(VERIFIER)
    run_exchange(ScramClientExchange(password="pencil"), server)
    assert server.client_key is not None


def test_round_trip_with_unicode_password_normalised_both_sides():
    verifier = ScramVerifier.from_password("\u2168")
    run_exchange(ScramClientExchange(password="IX"), ScramServerExchange(verifier))


def test_round_trip_with_plain_credential_then_pass_through_to_node():
    cred = Credential.parse("alice", "s3cret")
    proxy_side = ScramServerExchange(cred.scram)
    run_exchange(ScramClientExchange(password="s3cret"), proxy_side)
    # The node stores the same verifier (e.g. copied from pg_authid into the config).
    node_side = ScramServerExchange(cred.scram)
    to_node = ScramClientExchange(
        client_key=proxy_side.client_key,
        server_key=cred.scram.server_key,
        expected_salt=cred.scram.salt,
        expected_iterations=cred.scram.iterations,
    )
    run_exchange(to_node, node_side)
    assert node_side.client_key == proxy_side.client_key


def test_pass_through_without_server_key_or_expectations():
    proxy_side = ScramServerExchange(VERIFIER)
    run_exchange(ScramClientExchange(password="pencil"), proxy_side)
    run_exchange(ScramClientExchange(client_key=proxy_side.client_key), ScramServerExchange(VERIFIER))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"expected_salt": b"\x00" * 16, "expected_iterations": 4096},
        {"expected_salt": RFC_SALT, "expected_iterations": 4097},
    ],
)
def test_pass_through_to_node_with_different_verifier_fails_clearly(kwargs):
    proxy_side = ScramServerExchange(VERIFIER)
    run_exchange(ScramClientExchange(password="pencil"), proxy_side)
    to_node = ScramClientExchange(client_key=proxy_side.client_key, **kwargs)
    node_side = ScramServerExchange(VERIFIER)
    with pytest.raises(AuthFailed, match="pass-through"):
        to_node.handle_server_first(node_side.initial(SCRAM_SHA_256, to_node.first()))


def test_pass_through_expectations_on_handle_server_first():
    to_node = ScramClientExchange(client_key=b"k" * 32, nonce=RFC_CLIENT_NONCE)
    to_node.first()
    with pytest.raises(AuthFailed):
        to_node.handle_server_first(RFC_SERVER_FIRST, expected_salt=b"other salt")


def test_pass_through_with_wrong_server_key_detects_fake_node():
    proxy_side = ScramServerExchange(VERIFIER)
    run_exchange(ScramClientExchange(password="pencil"), proxy_side)
    to_node = ScramClientExchange(client_key=proxy_side.client_key, server_key=b"\x00" * 32)
    with pytest.raises(AuthFailed, match="server signature"):
        run_exchange(to_node, ScramServerExchange(VERIFIER))


def test_wrong_password_fails_and_kills_exchange():
    server = ScramServerExchange(VERIFIER)
    client = ScramClientExchange(password="pencil!")
    final = client.handle_server_first(server.initial(SCRAM_SHA_256, client.first()))
    with pytest.raises(AuthFailed):
        server.final(final)
    assert server.client_key is None
    with pytest.raises(AuthProtocolError):
        server.final(final)


def test_mock_exchange_always_fails_with_the_same_message():
    mock = ScramServerExchange(mock_scram_verifier("ghost", b"s" * 32), mock=True)
    client = ScramClientExchange(password="pencil")
    with pytest.raises(AuthFailed) as mocked:
        run_exchange(client, mock)
    # Even the correct password fails under mock=True.
    with pytest.raises(AuthFailed):
        run_exchange(ScramClientExchange(password="pencil"), ScramServerExchange(VERIFIER, mock=True))
    with pytest.raises(AuthFailed) as wrong:
        run_exchange(ScramClientExchange(password="nope"), ScramServerExchange(VERIFIER))
    assert str(mocked.value) == str(wrong.value)


def test_mock_server_first_looks_like_a_real_one():
    verifier = mock_scram_verifier("ghost", b"s" * 32)
    first = ScramServerExchange(verifier, mock=True).initial(SCRAM_SHA_256, b"n,,n=,r=abc")
    assert first.startswith(b"r=abc") and b",s=" + base64.b64encode(verifier.salt) + b",i=4096" in first


def test_server_nonce_default_is_random_base64():
    a = ScramServerExchange(VERIFIER).initial(SCRAM_SHA_256, b"n,,n=,r=abc")
    b = ScramServerExchange(VERIFIER).initial(SCRAM_SHA_256, b"n,,n=,r=abc")
    nonce_a = a.split(b",")[0][len(b"r=abc"):]
    assert len(base64.b64decode(nonce_a, validate=True)) == 18
    assert a != b


# --------------------------------------------------------------------------- channel binding


def test_mechanisms_with_tls():
    assert ScramServerExchange(VERIFIER, channel_binding=CB_DATA).mechanisms() == [SCRAM_SHA_256_PLUS, SCRAM_SHA_256]


def test_plus_round_trip():
    server = rfc_server(channel_binding=CB_DATA)
    bare = b"n=,r=abc"
    server_first = server.initial(SCRAM_SHA_256_PLUS, b"p=tls-server-end-point,," + bare)
    final = craft_final("pencil", server_first, bare, b"p=tls-server-end-point,," + CB_DATA)
    assert server.final(final).startswith(b"v=")


def test_plus_with_wrong_binding_data_fails_auth():
    server = rfc_server(channel_binding=CB_DATA)
    bare = b"n=,r=abc"
    server_first = server.initial(SCRAM_SHA_256_PLUS, b"p=tls-server-end-point,," + bare)
    final = craft_final("pencil", server_first, bare, b"p=tls-server-end-point,," + b"\x00" * 32)
    with pytest.raises(AuthFailed, match="channel binding"):
        server.final(final)


def test_plus_with_wrong_header_in_final_is_protocol_error():
    server = rfc_server(channel_binding=CB_DATA)
    bare = b"n=,r=abc"
    server_first = server.initial(SCRAM_SHA_256_PLUS, b"p=tls-server-end-point,," + bare)
    with pytest.raises(AuthProtocolError):
        server.final(craft_final("pencil", server_first, bare, b"n,,"))


def test_y_flag_without_tls_is_accepted():
    server = rfc_server()
    bare = b"n=,r=abc"
    server_first = server.initial(SCRAM_SHA_256, b"y,," + bare)
    assert server.final(craft_final("pencil", server_first, bare, b"y,,")).startswith(b"v=")


@pytest.mark.parametrize("cbind", [b"n,,", b"p=tls-server-end-point,,"])
def test_y_flag_then_other_header_in_final_is_protocol_error(cbind):
    server = rfc_server()
    bare = b"n=,r=abc"
    server_first = server.initial(SCRAM_SHA_256, b"y,," + bare)
    with pytest.raises(AuthProtocolError):
        server.final(craft_final("pencil", server_first, bare, cbind))


def test_n_flag_then_y_header_in_final_is_protocol_error():
    server = rfc_server()
    bare = b"n=,r=abc"
    server_first = server.initial(SCRAM_SHA_256, b"n,," + bare)
    with pytest.raises(AuthProtocolError):
        server.final(craft_final("pencil", server_first, bare, b"y,,"))


@pytest.mark.parametrize(
    "cb, mechanism, message, match",
    [
        (CB_DATA, SCRAM_SHA_256, b"y,,n=,r=abc", "negotiation"),  # downgrade
        (None, SCRAM_SHA_256, b"p=tls-server-end-point,,n=,r=abc", "TLS"),
        (CB_DATA, SCRAM_SHA_256, b"p=tls-server-end-point,,n=,r=abc", "without channel binding"),
        (CB_DATA, SCRAM_SHA_256_PLUS, b"n,,n=,r=abc", "does not include channel binding"),
        (CB_DATA, SCRAM_SHA_256_PLUS, b"y,,n=,r=abc", "does not include channel binding"),
        (CB_DATA, SCRAM_SHA_256_PLUS, b"p=tls-unique,,n=,r=abc", "unsupported"),
        (None, SCRAM_SHA_256_PLUS, b"p=tls-server-end-point,,n=,r=abc", "mechanism"),
        (None, "SCRAM-SHA-1", b"n,,n=,r=abc", "mechanism"),
    ],
)
def test_channel_binding_flag_abuse(cb, mechanism, message, match):
    server = ScramServerExchange(VERIFIER, channel_binding=cb)
    with pytest.raises(AuthProtocolError, match=match):
        server.initial(mechanism, message)


# --------------------------------------------------------------------------- malformed client messages


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"n",
        b"n,",
        b"x,,n=,r=abc",
        b"nn,,n=,r=abc",
        b"n,a=bob,n=,r=abc",  # authzid
        b"n,zzz,n=,r=abc",
        b"n,,m=ext,n=,r=abc",  # mandatory extension
        b"n,,r=abc",
        b"n,,n=",
        b"n,,n=,r=",
        b"n,,n=,x=abc",
        b"n,,n=,r=ab\x01c",
        b"n,,n=,r=ab c",
        b"n,,n=,r=\xc3\xa9",
        b"n,,n=,r=abc\x00",
        b"n,,n=,r=abc,",
        b"n,,n=,r=abc,1=x",
        b"n,,n=,r=abc,ext",
        b"n,,n=" + b"a" * 9000 + b",r=abc",
        b"n,,n=,r=" + b"a" * 9000,
    ],
)
def test_malformed_client_first(message):
    with pytest.raises(AuthProtocolError):
        ScramServerExchange(VERIFIER).initial(SCRAM_SHA_256, message)


def test_client_first_accepts_ignored_user_name_and_extensions():
    server = ScramServerExchange(VERIFIER)
    assert server.initial(SCRAM_SHA_256, b"n,,n=\xff\xfe=2C,r=abc,x=ext").startswith(b"r=abc")


def _good_final():
    server = rfc_server()
    server.initial(SCRAM_SHA_256, RFC_CLIENT_FIRST)
    return server


PROOF = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"c=biws",
        f"c=biws,r={NONCE}".encode(),
        f"r={NONCE},c=biws,p={PROOF}".encode(),
        f"c=biws,r={NONCE},p=".encode(),
        f"c=biws,r={NONCE},p=!!!!".encode(),
        f"c=biws,r={NONCE},p={PROOF[:-4]}".encode(),  # bad padding
        f"c=biws,r={NONCE},p=QUFB".encode(),  # wrong length
        f"c=biws,r={NONCE},p={PROOF},x=y".encode(),  # p not last
        f"c=biws,r={NONCE},p={PROOF},".encode(),
        f"c=biws,r={NONCE},junk,p={PROOF}".encode(),
        f"c=eSws,r={NONCE},p={PROOF}".encode(),  # 'y' header but client sent 'n'
        f"c=,r={NONCE},p={PROOF}".encode(),
        f"c=biws,r=rOprNGfwEbeRWgbNEkqO,p={PROOF}".encode(),  # only the client nonce
        f"c=biws,r={NONCE}x,p={PROOF}".encode(),  # wrong nonce
        f"c=biws,r=,p={PROOF}".encode(),
        f"c=biws,r={NONCE},p={PROOF}\x00".encode(),
        f"c=biws,r={NONCE},x={'a' * 9000},p={PROOF}".encode(),
    ],
)
def test_malformed_client_final(message):
    server = _good_final()
    with pytest.raises(AuthProtocolError):
        server.final(message)


def test_client_final_extension_is_ignored():
    server = rfc_server()
    bare = b"n=,r=abc"
    server_first = server.initial(SCRAM_SHA_256, b"n,," + bare)
    assert server.final(craft_final("pencil", server_first, bare, b"n,,", extra=",x=ext")).startswith(b"v=")


def test_server_out_of_order():
    with pytest.raises(AuthProtocolError):
        ScramServerExchange(VERIFIER).final(RFC_CLIENT_FINAL)
    server = rfc_server()
    server.initial(SCRAM_SHA_256, RFC_CLIENT_FIRST)
    with pytest.raises(AuthProtocolError):
        server.initial(SCRAM_SHA_256, RFC_CLIENT_FIRST)
    server = rfc_server()
    server.initial(SCRAM_SHA_256, RFC_CLIENT_FIRST)
    server.final(RFC_CLIENT_FINAL)
    with pytest.raises(AuthProtocolError):
        server.final(RFC_CLIENT_FINAL)


def test_server_rejects_bad_nonce_argument():
    with pytest.raises(ValueError):
        ScramServerExchange(VERIFIER, nonce=b"a,b")
    with pytest.raises(ValueError):
        ScramServerExchange(VERIFIER, nonce=b"")


# --------------------------------------------------------------------------- malformed server messages


def _client():
    client = ScramClientExchange(password="pencil", nonce=RFC_CLIENT_NONCE)
    client.first()
    return client


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"m=ext," + RFC_SERVER_FIRST,
        b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # no server part
        b"r=XOprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # not our nonce
        b"r=rOprNGfwEbeRWgbNEkqO%h\x01Y,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ=,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=!!!!,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=" + base64.b64encode(b"s" * 2000) + b",i=4096",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4k",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=\xef\xbc\x94",  # fullwidth 4
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=" + str(MAX_CLIENT_ITERATIONS + 1).encode(),
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999999999999999",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,x=ext",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,i=4096,s=W22ZaJ0SNY7soEsUEjb6gQ==",
        b"r=rOprNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==",
        b"r=rOprNGfwEbeRWgbNEkqO" + b"x" * 9000 + b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    ],
)
def test_malformed_server_first(message):
    with pytest.raises(AuthProtocolError):
        _client().handle_server_first(message)


def _client_after_first():
    client = ScramClientExchange(password="pencil", username="user", nonce=RFC_CLIENT_NONCE)
    client.first()
    client.handle_server_first(RFC_SERVER_FIRST)
    return client


@pytest.mark.parametrize(
    "message",
    [b"", b"v=", b"v=!!!!", b"v=QUFB", RFC_SERVER_FINAL + b",x=y", b"x" + RFC_SERVER_FINAL[1:], RFC_SERVER_FINAL + b"\x00"],
)
def test_malformed_server_final(message):
    with pytest.raises(AuthProtocolError):
        _client_after_first().handle_server_final(message)


def test_server_final_error_attribute():
    with pytest.raises(AuthFailed, match="invalid-proof"):
        _client_after_first().handle_server_final(b"e=invalid-proof")


def test_server_final_wrong_signature():
    with pytest.raises(AuthFailed):
        _client_after_first().handle_server_final(b"v=" + base64.b64encode(b"\x00" * 32))


def test_client_out_of_order_and_arguments():
    with pytest.raises(AuthProtocolError):
        ScramClientExchange(password="x").handle_server_first(RFC_SERVER_FIRST)
    client = _client_after_first()
    with pytest.raises(AuthProtocolError):
        client.first()
    with pytest.raises(ValueError):
        ScramClientExchange()
    with pytest.raises(ValueError):
        ScramClientExchange(password="x", client_key=b"k" * 32)
    with pytest.raises(ValueError):
        ScramClientExchange(client_key=b"short")
    with pytest.raises(ValueError):
        ScramClientExchange(password="x", server_key=b"k" * 32)


def test_client_mechanism_choice():
    client = ScramClientExchange(password="x")
    assert client.mechanism([SCRAM_SHA_256]) == SCRAM_SHA_256
    with pytest.raises(AuthProtocolError):
        client.mechanism([SCRAM_SHA_256_PLUS])
    with pytest.raises(AuthProtocolError):
        client.mechanism([])


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Bytes biased towards SCRAM syntax so the fuzzer gets past the first checks.
scramish = st.lists(
    st.one_of(
        st.sampled_from([b",", b"=", b"n", b"y", b"p", b"r", b"s", b"i", b"c", b"v", b"e", b"m", b"a", b"biws",
                         b"n,,", b"r=", b"p=", b"c=biws,", b"r=" + NONCE.encode(), b"==", b"4096", b"\x00", b"\xff"]),
        st.binary(max_size=8),
    ),
    max_size=40,
).map(b"".join)
messages = st.one_of(st.binary(max_size=200), scramish)


@FUZZ
@given(mechanism=st.sampled_from([SCRAM_SHA_256, SCRAM_SHA_256_PLUS, "", "x"]), data=messages, tls=st.booleans())
def test_fuzz_initial(mechanism, data, tls):
    server = ScramServerExchange(VERIFIER, channel_binding=CB_DATA if tls else None)
    try:
        server.initial(mechanism, data)
    except AuthError:
        pass


@FUZZ
@given(data=st.one_of(messages, scramish.map(lambda tail: f"c=biws,r={NONCE}".encode() + tail)))
def test_fuzz_final(data):
    server = _good_final()
    try:
        server.final(data)
    except AuthError:
        pass


@FUZZ
@given(data=st.one_of(messages, scramish.map(lambda tail: b"r=rOprNGfwEbeRWgbNEkqO" + tail)))
def test_fuzz_handle_server_first(data):
    try:
        _client().handle_server_first(data)
    except AuthError:
        pass


@FUZZ
@given(data=messages)
def test_fuzz_handle_server_final(data):
    try:
        _client_after_first().handle_server_final(data)
    except AuthError:
        pass
