"""Logging in to a PostgreSQL node as a pure exchange: startup, authentication, session parameters."""

from __future__ import annotations

from pgtwist.auth import AuthError, Credential, ScramClientExchange, md5_salted_response
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import PgError


class ServerLoginError(PgError):
    """The node refused us (``from_fields``: its own words, kept whole for the client), or spoke nonsense."""

    severity = "FATAL"


class ServerLogin:
    """Drive one node login: feed it the node's messages, send what it returns, until ``done``."""

    def __init__(
        self,
        user: str,
        database: str,
        credential: Credential | None,
        *,
        client_key: bytes | None = None,
        node_name: str = "node",
    ):
        self.user = user
        self.database = database
        self.credential = credential
        self.client_key = client_key
        self.node_name = node_name
        self.parameters: dict[str, str] = {}
        self.backend_key: tuple[int, bytes] | None = None
        self.done = False
        self._scram: ScramClientExchange | None = None

    def start(self) -> bytes:
        return m.startup_message({"user": self.user, "database": self.database})

    def _error(self, code: str, message: str) -> ServerLoginError:
        return ServerLoginError(code, message, f"while logging in to node {self.node_name} as user \"{self.user}\"")

    def feed(self, msg_type: int, body: bytes) -> bytes | None:
        """Handle one message from the node; return bytes to send back, if any."""
        if msg_type == p.AUTHENTICATION:
            return self._authentication(body)
        if msg_type == p.PARAMETER_STATUS:
            name, value = m.decode_parameter_status(body)
            self.parameters[name] = value
        elif msg_type == p.BACKEND_KEY_DATA:
            self.backend_key = m.decode_backend_key_data(body)
        elif msg_type == p.READY_FOR_QUERY:
            self.done = True
        elif msg_type == p.ERROR_RESPONSE:
            fields = m.decode_fields(body)
            fields.setdefault("C", sqlstate.CONNECTION_FAILURE)
            fields.setdefault("M", "node refused the login")
            fields.setdefault("D", f"reported by node {self.node_name}")
            raise ServerLoginError.from_fields(fields)
        elif msg_type in (p.NOTICE_RESPONSE, p.NEGOTIATE_PROTOCOL_VERSION):
            pass
        else:
            raise self._error(sqlstate.PROTOCOL_VIOLATION, f"unexpected message type {chr(msg_type)!r} during login")
        return None

    def _password(self) -> str:
        if self.credential is None or self.credential.plaintext is None:
            raise self._error(
                sqlstate.INVALID_PASSWORD,
                "the node asked for a password that pgtwist only holds as a hash",
            )
        return self.credential.plaintext

    def _authentication(self, body: bytes) -> bytes | None:
        code, data = m.decode_authentication(body)
        try:
            if code == p.AUTH_OK:
                return None
            if code == p.AUTH_CLEARTEXT_PASSWORD:
                return m.password_message(self._password().encode() + b"\x00")
            if code == p.AUTH_MD5_PASSWORD:
                if self.credential is None or self.credential.md5_hash is None:
                    raise self._error(sqlstate.INVALID_PASSWORD, "the node asked for md5 but pgtwist holds no password or md5 hash")
                return m.password_message(md5_salted_response(self.credential.md5_hash, data[:4]) + b"\x00")
            if code == p.AUTH_SASL:
                self._scram = self._make_scram()
                mechanism = self._scram.mechanism(m.decode_sasl_mechanisms(data))
                return m.sasl_initial_response(mechanism, self._scram.first())
            if code == p.AUTH_SASL_CONTINUE and self._scram is not None:
                return m.password_message(self._scram.handle_server_first(data))
            if code == p.AUTH_SASL_FINAL and self._scram is not None:
                self._scram.handle_server_final(data)
                return None
        except AuthError as e:
            raise self._error(sqlstate.INVALID_PASSWORD, f"authentication to node failed: {e}") from None
        raise self._error(sqlstate.FEATURE_NOT_SUPPORTED, f"the node asked for unsupported authentication method {code}")

    def _make_scram(self) -> ScramClientExchange:
        cred = self.credential
        if cred is not None and cred.plaintext is not None:
            return ScramClientExchange(password=cred.plaintext)
        if cred is not None and cred.scram is not None and self.client_key is not None:
            # SCRAM pass-through: the ClientKey recovered from the client's own proof works when
            # the node stores the same verifier as our config.
            return ScramClientExchange(
                client_key=self.client_key,
                server_key=cred.scram.server_key,
                expected_salt=cred.scram.salt,
                expected_iterations=cred.scram.iterations,
            )
        if cred is not None and cred.kind == "md5":
            # (The health monitor's user may hold one: it works only where the nodes use md5.)
            message = "the node asked for SCRAM but pgtwist holds only an md5 hash of this user's password, which answers md5 only"
        else:
            message = "the node asked for SCRAM but pgtwist holds neither the password nor a ClientKey from this client"
        raise self._error(sqlstate.INVALID_PASSWORD, message)
