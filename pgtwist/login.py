"""Client login as a pure exchange: startup packet, protocol negotiation, authentication (no I/O)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable

from pgtwist.auth import (
    AuthFailed,
    AuthProtocolError,
    Credential,
    ScramServerExchange,
    md5_verify,
    mock_scram_verifier,
)
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import WireError
from pgtwist.wire.framing import pop_message, pop_startup_packet


class LoginError(Exception):
    """Login refused: the session sends a FATAL ErrorResponse with this SQLSTATE and closes."""

    def __init__(self, code: str, message: str, detail: str | None = None):
        super().__init__(message)
        self.sqlstate = code
        self.message = message
        self.detail = detail


@dataclass(frozen=True)
class Reply:
    """Bytes to send to the client."""

    data: bytes


@dataclass(frozen=True)
class CancelReceived:
    process_id: int
    secret_key: bytes = field(repr=False)


@dataclass(frozen=True)
class Authenticated:
    """Startup finished and the client proved who it is; AuthenticationOk has been queued."""

    startup: m.StartupMessage
    credential: Credential | None = field(repr=False)
    client_key: bytes | None = field(default=None, repr=False)  # SCRAM pass-through to nodes


# States of the exchange.
STARTUP, MD5, SASL_INITIAL, SASL_FINAL, DONE = "startup", "md5", "sasl-initial", "sasl-final", "done"
_MAX_NEGOTIATIONS = 2  # one SSLRequest and one GSSENCRequest at most, as PostgreSQL allows


class ClientLogin:
    """Feed it the client's bytes; it answers with events until the client is authenticated.

    *lookup_user* returns the configured Credential or None; unknown users still run a full
    (always failing) exchange so that nobody can tell them from wrong passwords.
    """

    def __init__(
        self,
        auth_type: str,
        lookup_user: Callable[[str], Credential | None],
        mock_secret: bytes,
        *,
        token: Callable[[int], bytes] = secrets.token_bytes,
    ):
        self.auth_type = auth_type
        self.lookup_user = lookup_user
        self.mock_secret = mock_secret
        self.token = token
        self.state = STARTUP
        self.buffer = bytearray()
        self.startup: m.StartupMessage | None = None
        self.credential: Credential | None = None
        self.negotiations = 0
        self._salt = b""
        self._scram: ScramServerExchange | None = None

    def leftover(self) -> bytes:
        """Bytes the client sent after its login finished (pipelined queries)."""
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def feed(self, data: bytes) -> list:
        """Consume client bytes; return events. Raises LoginError or WireError to refuse the client."""
        self.buffer += data
        events: list = []
        while self.state != DONE:
            if self.state == STARTUP:
                body = pop_startup_packet(self.buffer, p.MAX_STARTUP_PACKET)
                if body is None:
                    break
                events.extend(self._startup_packet(body))
                if self.state == STARTUP and isinstance(events[-1], CancelReceived):
                    self.state = DONE
                    break
            else:
                msg = pop_message(self.buffer, p.MAX_AUTH_MESSAGE)
                if msg is None:
                    break
                events.extend(self._auth_message(*msg))
        return events

    # -- startup ----------------------------------------------------------------------------

    def _startup_packet(self, body: bytes) -> list:
        packet = m.decode_startup_packet(body)
        if isinstance(packet, m.CancelRequest):
            # Accepted after a refused SSLRequest/GSSENCRequest too, as PostgreSQL does: libpq >= 17
            # (PQcancelCreate) negotiates encryption first under the default sslmode=prefer.
            return [CancelReceived(packet.process_id, packet.secret_key)]
        if isinstance(packet, (m.SSLRequest, m.GSSENCRequest)):
            self.negotiations += 1
            if self.negotiations > _MAX_NEGOTIATIONS:
                raise WireError("too many encryption negotiation requests")
            return [Reply(b"N")]  # TLS termination arrives with its own issue
        assert isinstance(packet, m.StartupMessage)
        self.startup = packet
        if packet.parameters.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            raise LoginError(sqlstate.FEATURE_NOT_SUPPORTED, "replication connections are not supported by pgtwist")
        events: list = []
        if packet.minor > p.PROTOCOL_LATEST_MINOR or packet.unrecognized_options:
            events.append(Reply(m.negotiate_protocol_version(p.PROTOCOL_LATEST_MINOR, packet.unrecognized_options)))
        events.extend(self._begin_auth(packet.user))
        return events

    def _begin_auth(self, user: str) -> list:
        self.credential = self.lookup_user(user)
        if self.auth_type == "trust":
            if self.credential is None:
                raise LoginError(sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, f'role "{user}" does not exist')
            return self._done()
        # PostgreSQL upgrades md5 to SCRAM when the stored secret is a SCRAM verifier.
        if self.auth_type == "md5" and (self.credential is None or self.credential.kind != "scram"):
            self._salt = self.token(4)
            self.state = MD5
            return [Reply(m.authentication_md5_password(self._salt))]
        if self.credential is not None and self.credential.scram is not None:
            self._scram = ScramServerExchange(self.credential.scram)
        else:
            # Unknown user (or an md5-only secret under scram-sha-256): a full exchange that always fails.
            self._scram = ScramServerExchange(mock_scram_verifier(user, self.mock_secret), mock=True)
        self.state = SASL_INITIAL
        return [Reply(m.authentication_sasl(self._scram.mechanisms()))]

    # -- authentication messages -------------------------------------------------------------

    def _auth_message(self, msg_type: int, body: bytes) -> list:
        if msg_type != p.PASSWORD:
            raise WireError(f"expected password response, got message type {msg_type}")
        try:
            if self.state == MD5:
                response = m.decode_password(body)
                if self.credential is None or not md5_verify(self.credential, self._salt, response):
                    self._fail()
                return self._done()
            if self.state == SASL_INITIAL:
                mechanism, data = m.decode_sasl_initial_response(body)
                reply = self._scram.initial(mechanism, data)
                self.state = SASL_FINAL
                return [Reply(m.authentication_sasl_continue(reply))]
            if self.state == SASL_FINAL:
                reply = self._scram.final(body)
                return [Reply(m.authentication_sasl_final(reply))] + self._done(self._scram.client_key)
        except AuthFailed:
            self._fail()
        except AuthProtocolError as e:
            raise WireError(str(e)) from None
        raise WireError("unexpected authentication message")

    def _fail(self):
        user = self.startup.user if self.startup else ""
        raise LoginError(sqlstate.INVALID_PASSWORD, f'password authentication failed for user "{user}"')

    def _done(self, client_key: bytes | None = None) -> list:
        self.state = DONE
        return [Reply(m.authentication_ok()), Authenticated(self.startup, self.credential, client_key)]
