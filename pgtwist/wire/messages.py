"""Encoders and decoders for the messages the proxy generates or has to look inside."""

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from struct import Struct
from types import MappingProxyType
from typing import NoReturn

from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import (  # noqa: F401 (re-exported: the codec's callers name them m.FIELD_...)
    FIELD_DETAIL,
    FIELD_HINT,
    FIELD_MESSAGE,
    FIELD_SEVERITY,
    FIELD_SEVERITY_NONLOCALIZED,
    FIELD_SQLSTATE,
    ProtocolViolation,
    UnsupportedProtocol,
    encode_fields,
    error_fields,
)
from pgtwist.wire.framing import frame

_I32 = Struct("!I")
_i32 = Struct("!i")
_I16 = Struct("!H")
_II = Struct("!II")


# -- helpers -------------------------------------------------------------------------------


def cstring(value: str) -> bytes:
    data = value.encode()
    if b"\x00" in data:
        raise ValueError("a protocol string cannot contain a NUL byte")
    return data + b"\x00"


class Reader:
    """Bounds-checked cursor over a message body: every overrun is a ProtocolViolation."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str):
        self.data = data
        self.pos = 0
        self.what = what

    def _fail(self, why: str) -> NoReturn:
        raise ProtocolViolation(f"invalid {self.what} message: {why}")

    def int32(self) -> int:
        if self.pos + 4 > len(self.data):
            self._fail("truncated")
        (v,) = _i32.unpack_from(self.data, self.pos)
        self.pos += 4
        return v

    def uint32(self) -> int:
        return self.int32() & 0xFFFFFFFF

    def int16(self) -> int:
        if self.pos + 2 > len(self.data):
            self._fail("truncated")
        (v,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return v

    def byte(self) -> int:
        if self.pos >= len(self.data):
            self._fail("truncated")
        v = self.data[self.pos]
        self.pos += 1
        return v

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            self._fail("truncated")
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(v)

    def cstring(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            self._fail("unterminated string")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode()
        except UnicodeDecodeError:
            self._fail("invalid UTF-8 in string")

    def rest(self) -> builtins.bytes:  # (bytes, in this class, is the method above)
        v = bytes(self.data[self.pos :])
        self.pos = len(self.data)
        return v

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def end(self) -> None:
        if self.pos != len(self.data):
            self._fail("trailing bytes")


# -- startup phase (untyped packets) ------------------------------------------------------


@dataclass(frozen=True)
class StartupMessage:
    major: int
    minor: int
    parameters: Mapping[str, str]  # read-only (decode_startup_packet): one decoding may serve many logins
    unrecognized_options: tuple[str, ...] = ()  # _pq_.* protocol options we do not support

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        return self.parameters.get("database") or self.user


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    process_id: int
    secret_key: bytes = field(repr=False)


MAX_CANCEL_KEY = 256  # protocol 3.2 allows secret keys up to 256 bytes


def decode_startup_packet(body: bytes):
    """Decode a startup-phase packet body (code included): StartupMessage, SSLRequest, GSSENCRequest or CancelRequest."""
    r = Reader(body, "startup packet")
    code = r.uint32()
    if code == p.SSL_REQUEST_CODE:
        r.end()
        return SSLRequest()
    if code == p.GSSENC_REQUEST_CODE:
        r.end()
        return GSSENCRequest()
    if code == p.CANCEL_REQUEST_CODE:
        pid = r.uint32()
        key = r.rest()
        if not 4 <= len(key) <= MAX_CANCEL_KEY:
            raise ProtocolViolation("invalid length of cancel request packet")
        return CancelRequest(pid, key)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise UnsupportedProtocol(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.{p.PROTOCOL_LATEST_MINOR}"
        )
    params: dict[str, str] = {}
    unrecognized = []
    # Every login's packet: its name/value pairs in one decode and one split when it is well
    # formed (each string NUL-terminated, no empty name before the final NUL); otherwise the
    # reader below goes string by string and names what is wrong.
    region = body[4:]
    whole = False
    if region[-1:] == b"\x00":
        try:
            fields = region[:-1].decode().split("\x00")  # (a NUL is never inside a UTF-8 sequence)
        except UnicodeDecodeError:
            fields = None
        if fields is not None and len(fields) % 2 and fields[-1] == "" and all(fields[0:-1:2]):
            for i in range(0, len(fields) - 1, 2):
                name = fields[i]
                if name.startswith("_pq_."):
                    unrecognized.append(name)
                else:
                    params[name] = fields[i + 1]
            r.pos = len(body)
            whole = True
    while not whole:
        name = r.cstring()
        if not name:
            break
        value = r.cstring()
        if name.startswith("_pq_."):
            unrecognized.append(name)
            continue
        params[name] = value
    r.end()
    if "user" not in params or not params["user"]:
        raise ProtocolViolation("no PostgreSQL user name specified in startup packet", sqlstate.INVALID_AUTHORIZATION_SPECIFICATION)
    return StartupMessage(major, minor, MappingProxyType(params), tuple(unrecognized))


def startup_message(parameters: dict[str, str], version: int = p.PROTOCOL_3_0) -> bytes:
    if "" in parameters:
        # An empty name is the list terminator: the server would stop there and reject the rest.
        raise ValueError("a startup parameter name cannot be empty")
    body = _I32.pack(version) + b"".join(cstring(k) + cstring(v) for k, v in parameters.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _II.pack(8, p.SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return _II.pack(8, p.GSSENC_REQUEST_CODE)


def cancel_request(process_id: int, secret_key: bytes) -> bytes:
    body = _II.pack(p.CANCEL_REQUEST_CODE, process_id) + secret_key
    return _I32.pack(len(body) + 4) + body


# -- authentication --------------------------------------------------------------------------


def authentication(code: int, data: bytes = b"") -> bytes:
    return frame(p.AUTHENTICATION, _I32.pack(code) + data)


def authentication_ok() -> bytes:
    return _AUTHENTICATION_OK  # (every login's: made once)


_AUTHENTICATION_OK = authentication(p.AUTH_OK)


def authentication_cleartext_password() -> bytes:
    return authentication(p.AUTH_CLEARTEXT_PASSWORD)


def authentication_md5_password(salt: bytes) -> bytes:
    return authentication(p.AUTH_MD5_PASSWORD, salt)


def authentication_sasl(mechanisms: list[str]) -> bytes:
    if "" in mechanisms:
        # An empty name is the list terminator: the client would not see the mechanisms after it.
        raise ValueError("a SASL mechanism name cannot be empty")
    return authentication(p.AUTH_SASL, b"".join(cstring(m) for m in mechanisms) + b"\x00")


def authentication_sasl_continue(data: bytes) -> bytes:
    return authentication(p.AUTH_SASL_CONTINUE, data)


def authentication_sasl_final(data: bytes) -> bytes:
    return authentication(p.AUTH_SASL_FINAL, data)


def decode_authentication(body: bytes) -> tuple[int, bytes]:
    """Split an Authentication message into its request code and payload."""
    r = Reader(body, "authentication request")
    return r.int32(), r.rest()


def decode_sasl_mechanisms(data: bytes) -> list[str]:
    r = Reader(data, "AuthenticationSASL")
    out: list[str] = []
    while True:
        name = r.cstring()
        if not name:
            return out
        out.append(name)


def password_message(data: bytes) -> bytes:
    """PasswordMessage / SASLResponse: the payload as is (callers add the NUL for passwords)."""
    return frame(p.PASSWORD, data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return frame(p.PASSWORD, cstring(mechanism) + _i32.pack(len(data)) + data)


def decode_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    r = Reader(body, "SASLInitialResponse")
    mechanism = r.cstring()
    n = r.int32()
    data = b"" if n == -1 else r.bytes(n)
    r.end()
    return mechanism, data


def decode_password(body: bytes) -> bytes:
    """A PasswordMessage: a NUL-terminated string; returned without the NUL."""
    if not body.endswith(b"\x00") or b"\x00" in body[:-1]:
        raise ProtocolViolation("invalid password packet")
    return body[:-1]


# -- session start and status --------------------------------------------------------------


def parameter_status(name: str, value: str) -> bytes:
    return frame(p.PARAMETER_STATUS, cstring(name) + cstring(value))


def decode_parameter_status(body: bytes) -> tuple[str, str]:
    r = Reader(body, "ParameterStatus")
    name, value = r.cstring(), r.cstring()
    return name, value


def backend_key_data(process_id: int, secret_key: bytes) -> bytes:
    return frame(p.BACKEND_KEY_DATA, _I32.pack(process_id) + secret_key)


def decode_backend_key_data(body: bytes) -> tuple[int, bytes]:
    r = Reader(body, "BackendKeyData")
    pid = r.uint32()
    key = r.rest()
    if not 4 <= len(key) <= MAX_CANCEL_KEY:
        raise ProtocolViolation("invalid BackendKeyData secret key length")
    return pid, key


def ready_for_query(status: int = p.TX_IDLE) -> bytes:
    return frame(p.READY_FOR_QUERY, bytes((status,)))


def negotiate_protocol_version(newest_minor: int, unrecognized: tuple[str, ...]) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unrecognized)) + b"".join(cstring(o) for o in unrecognized)
    return frame(p.NEGOTIATE_PROTOCOL_VERSION, body)


def decode_negotiate_protocol_version(body: bytes) -> tuple[int, list[str]]:
    r = Reader(body, "NegotiateProtocolVersion")
    minor = r.int32()
    count = r.int32()
    if count < 0 or count > len(body):
        raise ProtocolViolation("invalid NegotiateProtocolVersion option count")
    return minor, [r.cstring() for _ in range(count)]


# -- errors and notices ----------------------------------------------------------------------

# The fields and their encoding belong to the error type (wire/errors.py); named here too for the codec's callers.
_encode_fields = encode_fields


def error_response_from_fields(fields: dict[str, str]) -> bytes:
    return frame(p.ERROR_RESPONSE, _encode_fields(fields))


def error_response(severity: str, code: str, message: str, detail: str | None = None, hint: str | None = None) -> bytes:
    return frame(p.ERROR_RESPONSE, _encode_fields(error_fields(severity, code, message, detail, hint)))


def notice_response(code: str, message: str, severity: str = "NOTICE", detail: str | None = None) -> bytes:
    return frame(p.NOTICE_RESPONSE, _encode_fields(error_fields(severity, code, message, detail)))


def decode_fields(body: bytes) -> dict[str, str]:
    """Decode ErrorResponse/NoticeResponse fields, tolerating anything a broken server sends.

    Missing fields (even SQLSTATE), unknown field types, invalid UTF-8 and a missing final
    terminator are all accepted: a bad error message must never take the proxy down.
    """
    fields: dict[str, str] = {}
    pos = 0
    n = len(body)
    while pos < n:
        kind = body[pos]
        if kind == 0:
            break
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            end = n
        fields[chr(kind)] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return fields


# -- queries (what routing and pooling need) ----------------------------------------------


def query(sql: str) -> bytes:
    return frame(p.QUERY, cstring(sql))


def decode_query(body: bytes) -> str:
    if not body.endswith(b"\x00"):
        raise ProtocolViolation("invalid Query message: unterminated string")
    return body[:-1].decode("utf-8", "replace")


def terminate() -> bytes:
    return frame(p.TERMINATE)


def sync() -> bytes:
    return frame(p.SYNC)


def flush() -> bytes:
    return frame(p.FLUSH)


def parse(name: str, sql: str, param_types: Sequence[int] = ()) -> bytes:
    body = cstring(name) + cstring(sql) + _I16.pack(len(param_types)) + b"".join(_I32.pack(t) for t in param_types)
    return frame(p.PARSE, body)


def bind(portal: str, statement: str, params: Sequence[bytes | None] = (), param_formats=(), result_formats=()) -> bytes:
    out = [cstring(portal), cstring(statement), _I16.pack(len(param_formats))]
    out += [_I16.pack(f) for f in param_formats]
    out.append(_I16.pack(len(params)))
    for value in params:
        out.append(_i32.pack(-1) if value is None else _i32.pack(len(value)) + value)
    out.append(_I16.pack(len(result_formats)))
    out += [_I16.pack(f) for f in result_formats]
    return frame(p.BIND, b"".join(out))


def describe(kind: str, name: str) -> bytes:
    return frame(p.DESCRIBE, kind.encode() + cstring(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return frame(p.EXECUTE, cstring(portal) + _I32.pack(max_rows))


def close(kind: str, name: str) -> bytes:
    return frame(p.CLOSE, kind.encode() + cstring(name))


def copy_data(data: bytes) -> bytes:
    return frame(p.COPY_DATA, data)


def copy_done() -> bytes:
    return frame(p.COPY_DONE)


def copy_fail(message: str) -> bytes:
    return frame(p.COPY_FAIL, cstring(message))


def command_complete(tag: str) -> bytes:
    return frame(p.COMMAND_COMPLETE, cstring(tag))


def decode_data_row(body: bytes) -> list[bytes | None]:
    # (Reader's checks, spelt out: after every writing transaction in a cluster the
    # read-your-writes position comes back as one of these, and the monitor reads pg_proc so.)
    body = bytes(body)
    end = len(body)
    if end < 2:
        raise ProtocolViolation("invalid DataRow message: truncated")
    (count,) = _I16.unpack_from(body, 0)
    pos = 2
    out: list[bytes | None] = []
    for _ in range(count):
        if pos + 4 > end:
            raise ProtocolViolation("invalid DataRow message: truncated")
        (n,) = _i32.unpack_from(body, pos)
        pos += 4
        if n == -1:
            out.append(None)
            continue
        if n < 0 or pos + n > end:
            raise ProtocolViolation("invalid DataRow message: truncated")
        out.append(body[pos : pos + n])
        pos += n
    return out


# -- result sets the proxy answers itself (admin console) -------------------------------------

# Type OIDs and lengths of the column types the proxy's own result sets use.
OID_BOOL, OID_INT8, OID_TEXT, OID_FLOAT8 = 16, 20, 25, 701
_TYPE_LENGTHS = {OID_BOOL: 1, OID_INT8: 8, OID_TEXT: -1, OID_FLOAT8: 8}
_FIELD = Struct("!IhIhih")


def row_description(columns: list[tuple[str, int]], formats: list[int] | tuple[int, ...] = ()) -> bytes:
    """RowDescription for (name, type OID) columns; *formats* per column (0 text, 1 binary; default text)."""
    out = [_I16.pack(len(columns))]
    for i, (name, oid) in enumerate(columns):
        fmt = formats[i] if i < len(formats) else 0
        out.append(cstring(name) + _FIELD.pack(0, 0, oid, _TYPE_LENGTHS.get(oid, -1), -1, fmt))
    return frame(p.ROW_DESCRIPTION, b"".join(out))


def data_row(values: list[bytes | None]) -> bytes:
    out = [_I16.pack(len(values))]
    for value in values:
        out.append(_i32.pack(-1) if value is None else _i32.pack(len(value)) + value)
    return frame(p.DATA_ROW, b"".join(out))


def parameter_description(type_oids: list[int] | tuple[int, ...] = ()) -> bytes:
    return frame(p.PARAMETER_DESCRIPTION, _I16.pack(len(type_oids)) + b"".join(_I32.pack(t) for t in type_oids))


def no_data() -> bytes:
    return frame(p.NO_DATA)


def parse_complete() -> bytes:
    return frame(p.PARSE_COMPLETE)


def bind_complete() -> bytes:
    return frame(p.BIND_COMPLETE)


def close_complete() -> bytes:
    return frame(p.CLOSE_COMPLETE)


def empty_query_response() -> bytes:
    return frame(p.EMPTY_QUERY_RESPONSE)


def decode_bind(body: bytes) -> tuple[str, str, list[bytes | None], list[int]]:
    """A Bind message: (portal, statement, parameter values, result format codes)."""
    r = Reader(body, "Bind")
    portal, statement = r.cstring(), r.cstring()
    for _ in range(r.int16()):
        r.int16()  # parameter format codes
    params: list[bytes | None] = []
    for _ in range(r.int16()):
        n = r.int32()
        params.append(None if n == -1 else r.bytes(n))
    result_formats = [r.int16() for _ in range(r.int16())]
    r.end()
    return portal, statement, params, result_formats


def bind_statement_span(body: bytes) -> tuple[int, int]:
    """Where a Bind body's statement name lies: body[start:end], the portal name and its NUL
    before it, the name's NUL and the parameters after. For reading or renaming the statement
    without decoding the parameters (the prepared-statement fast path); (-1, -1) when a name is
    unterminated."""
    start = body.find(b"\x00") + 1
    end = body.find(b"\x00", start) if start else -1
    return (start, end) if end >= 0 else (-1, -1)


def decode_parse(body: bytes) -> tuple[str, str]:
    """A Parse message: (statement name, query text); parameter types are not needed here."""
    r = Reader(body, "Parse")
    return r.cstring(), r.cstring()


def decode_target(body: bytes, what: str = "Describe") -> tuple[str, str]:
    """Describe/Close: ('S' or 'P', name)."""
    r = Reader(body, what)
    kind = chr(r.byte())
    if kind not in "SP":
        r._fail(f"unknown target type {kind!r}")
    return kind, r.cstring()


def decode_execute(body: bytes) -> tuple[str, int]:
    r = Reader(body, "Execute")
    return r.cstring(), r.int32()
