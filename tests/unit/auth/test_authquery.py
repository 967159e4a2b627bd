"""auth_query without I/O: the login waits for the lookup, the answer's parsing, the TTL cache, the config keys."""

import hashlib

import pytest

from pgtwist import config as configmod
from pgtwist.auth import Credential, ScramClientExchange, ScramVerifier, md5_hash
from pgtwist.auth.authquery import AuthCache, credential_from_rows, lookup_messages
from pgtwist.frontend.login import Authenticated, ClientLogin, LoginError, LookupUser, Reply
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.framing import pop_messages

PASSWORD = "looked-up pw"
VERIFIER = ScramVerifier.from_password(PASSWORD, b"0123456789abcdef", 4096)


def make(auth_type="scram-sha-256"):
    return ClientLogin(auth_type, {}.get, b"m" * 32, token=lambda n: b"\x01\x02\x03\x04"[:n], look_up=True)


def auth_requests(events):
    buf = bytearray(b"".join(e.data for e in events if isinstance(e, Reply)))
    return [m.decode_authentication(b) for t, b in pop_messages(buf, p.MAX_PROTOCOL_MESSAGE) if t == p.AUTHENTICATION]


def test_unknown_user_is_looked_up_before_any_challenge():
    login = make()
    events = login.feed(m.startup_message({"user": "bob", "database": "db"}))
    assert events == [LookupUser("bob", "db")]
    # Whatever the client sends while the lookup runs waits.
    assert login.feed(b"") == []


def test_scram_with_the_looked_up_verifier_logs_in_and_yields_the_client_key():
    login = make()
    login.feed(m.startup_message({"user": "bob", "database": "db"}))
    cred = Credential.parse("bob", VERIFIER.to_text())
    [(code, data)] = auth_requests(login.user_found(cred))
    assert code == p.AUTH_SASL
    client = ScramClientExchange(password=PASSWORD)
    [(code, server_first)] = auth_requests(login.feed(m.sasl_initial_response("SCRAM-SHA-256", client.first())))
    events = login.feed(m.password_message(client.handle_server_first(server_first)))
    done = [e for e in events if isinstance(e, Authenticated)][0]
    assert done.credential is cred
    assert hashlib.sha256(done.client_key).digest() == VERIFIER.stored_key


def test_a_user_postgresql_does_not_know_fails_as_a_wrong_password():
    login = make()
    login.feed(m.startup_message({"user": "nobody", "database": "db"}))
    [(code, _)] = auth_requests(login.user_found(None))
    assert code == p.AUTH_SASL  # the same exchange as for a real user: no enumeration
    client = ScramClientExchange(password="guess")
    [(_, server_first)] = auth_requests(login.feed(m.sasl_initial_response("SCRAM-SHA-256", client.first())))
    with pytest.raises(LoginError) as e:
        login.feed(m.password_message(client.handle_server_first(server_first)))
    assert e.value.sqlstate == sqlstate.INVALID_PASSWORD


def test_md5_secret_from_pg_shadow():
    login = make("md5")
    login.feed(m.startup_message({"user": "bob", "database": "db"}))
    cred = Credential.parse("bob", md5_hash("bob", PASSWORD))
    [(code, salt)] = auth_requests(login.user_found(cred))
    assert code == p.AUTH_MD5_PASSWORD
    from pgtwist.auth import md5_salted_response

    events = login.feed(m.password_message(md5_salted_response(md5_hash("bob", PASSWORD), salt) + b"\x00"))
    assert any(isinstance(e, Authenticated) for e in events)


def test_lookup_bytes_bind_the_name_never_interpolate_it():
    name = "x'; DROP TABLE t; --"
    data, owed = lookup_messages(configmod.DEFAULT_AUTH_QUERY, name)
    assert owed == 2
    msgs = pop_messages(bytearray(data), p.MAX_PROTOCOL_MESSAGE)
    assert [chr(t) for t, _ in msgs] == ["Q", "P", "B", "E", "S"]
    assert m.decode_query(msgs[0][1]) == "SET search_path TO pg_catalog, pg_temp"
    assert m.decode_parse(msgs[1][1]) == ("", configmod.DEFAULT_AUTH_QUERY)
    assert m.decode_bind(msgs[2][1])[2] == [name.encode()]
    assert name.encode() not in msgs[1][1]


@pytest.mark.parametrize(
    "rows",
    [[], [[b"bob", None]], [[b"bob", b"md5" + b"0" * 32], [b"bob", b"md5" + b"1" * 32]], [[b"bob", b"md5bad"]], [[b"bob"]], [[b"alice", b"md5" + b"0" * 32]]],
)
def test_no_usable_answer_is_no_user(rows):
    assert credential_from_rows("bob", rows) is None


def test_answer_parsed_as_a_credential():
    cred = credential_from_rows("bob", [[b"bob", VERIFIER.to_text().encode()]])
    assert cred.kind == "scram" and cred.scram == VERIFIER


def test_cache_ttl_and_absence():
    cache = AuthCache(10)
    cred = Credential.parse("bob", VERIFIER.to_text())
    cache.put("bob", cred, 100)
    cache.put("ghost", None, 100)
    assert cache.get("bob", 109.9) == (True, cred)
    assert cache.get("ghost", 105) == (True, None)
    assert cache.get("Bob", 101) == (False, None)  # one user's answer is never another's
    assert cache.get("bob", 110) == (False, None)
    assert AuthCache(0).get("bob", 0) == (False, None)


def base(**extra):
    return {
        "databases": {"db": {"nodes": ["127.0.0.1:5432"]}},
        "users": {"pgtwist_auth": {"password": "plain secret"}},
        **extra,
    }


def test_config_defaults_to_pgbouncers_query():
    config = configmod.from_dict(base(auth_user="pgtwist_auth"))
    assert config.auth_query == configmod.DEFAULT_AUTH_QUERY
    assert config.auth_cache_ttl == configmod.DEFAULT_AUTH_CACHE_TTL


@pytest.mark.parametrize(
    "extra, error",
    [
        ({"auth_user": "nobody"}, "auth_user: names no [users.nobody]"),
        ({"auth_user": "pgtwist_auth", "auth_query": "SELECT usename, passwd FROM pg_shadow"}, "auth_query: must take"),
        ({"auth_query": "SELECT $1"}, "auth_query: is used only with auth_user"),
        ({"auth_user": "pgtwist_auth", "auth_dbname": "other"}, "auth_dbname: names no"),
        ({"auth_user": "pgtwist_auth", "auth_cache_ttl": -1}, "auth_cache_ttl: must be"),
    ],
)
def test_config_errors(extra, error):
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict(base(**extra))
    assert any(error in line for line in e.value.errors), e.value.errors


def test_config_refuses_an_auth_user_with_only_a_verifier():
    raw = base(auth_user="pgtwist_auth")
    raw["users"]["pgtwist_auth"]["password"] = VERIFIER.to_text()
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict(raw)
    assert "SCRAM verifier" in str(e.value)


def test_users_table_without_a_password_holds_settings_for_a_looked_up_user():
    raw = base(auth_user="pgtwist_auth")
    raw["users"]["bob"] = {"pool_mode": "transaction", "max_user_connections": 3}
    config = configmod.from_dict(raw)
    assert config.users["bob"].credential is None
    assert config.pool_mode_for("db", "bob") == "transaction" and config.users["bob"].max_user_connections == 3
    # Without auth_query, such a table is still an error: nobody could log in as bob.
    del raw["auth_user"]
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict(raw)
    assert any(line.startswith("users.bob.password: is required") for line in e.value.errors)


def test_auth_user_and_health_user_need_a_secret_of_their_own():
    raw = base(auth_user="bob")
    raw["users"]["bob"] = {}
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict(raw)
    assert any(line.startswith("auth_user: [users.bob] has no password") for line in e.value.errors), e.value.errors
    raw = base(auth_user="pgtwist_auth", health_user="bob")
    raw["users"]["bob"] = {}
    raw["databases"]["db"]["nodes"] = ["a:1", "b:1"]
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict(raw)
    assert any(line.startswith("health_user:") and "no password here" in line for line in e.value.errors), e.value.errors
