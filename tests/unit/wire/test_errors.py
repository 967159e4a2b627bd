"""PgError, the proxy's one error type, and the rule that every SQLSTATE is named in wire/sqlstate.py."""

import ast
import pathlib
import re

import pytest

from pgtwist.auth import AuthFailed, AuthProtocolError
from pgtwist.backend.login import ServerLoginError
from pgtwist.frontend.login import LoginError
from pgtwist.pooling.pool import PoolError
from pgtwist.wire import messages as m
from pgtwist.wire import sqlstate
from pgtwist.wire.errors import MessageTooLarge, PgError, ProtocolViolation, UnsupportedProtocol, WireError

PACKAGE = pathlib.Path(__file__).resolve().parents[3] / "pgtwist"
# A SQLSTATE: five of 0-9A-Z with a digit among them (which tells it from FATAL, RESET, PAUSE...).
_SQLSTATE = re.compile(r"(?=.*[0-9])[0-9A-Z]{5}")


def test_encodes_as_the_error_response_postgresql_sends():
    e = PgError(sqlstate.TOO_MANY_CONNECTIONS, "sorry, too many clients already", "why", "try later", severity="FATAL")
    assert e.encode() == m.error_response("FATAL", "53300", "sorry, too many clients already", "why", "try later")
    assert m.decode_fields(e.encode()[5:]) == {"S": "FATAL", "V": "FATAL", "C": "53300", "M": "sorry, too many clients already", "D": "why", "H": "try later"}
    assert str(e) == "sorry, too many clients already"


def test_severity_can_be_overridden_when_encoding():
    e = PgError(sqlstate.CONNECTION_FAILURE, "gone", severity="FATAL")
    assert e.encode("ERROR") == m.error_response("ERROR", "08006", "gone")


def test_a_nodes_error_keeps_its_fields_whole():
    fields = {"S": "FATAL", "V": "FATAL", "C": "3D000", "M": "no such database", "D": "node says so", "R": "InitPostgres"}
    e = ServerLoginError.from_fields(fields)
    assert (e.sqlstate, e.message, e.detail, e.severity) == ("3D000", "no such database", "node says so", "FATAL")
    assert e.fields == fields
    assert e.encode() == m.error_response_from_fields(fields)


@pytest.mark.parametrize(
    "error, code, severity",
    [
        (ProtocolViolation("bad"), "08P01", "FATAL"),
        (MessageTooLarge("big"), "08P01", "FATAL"),
        (UnsupportedProtocol("v4"), "0A000", "FATAL"),
        (WireError("odd", sqlstate.INVALID_AUTHORIZATION_SPECIFICATION), "28000", "FATAL"),
        (AuthProtocolError("malformed"), "08P01", "FATAL"),
        (AuthFailed("wrong proof"), "28P01", "FATAL"),
        (LoginError(sqlstate.INVALID_PASSWORD, "password authentication failed"), "28P01", "FATAL"),
        (ServerLoginError(sqlstate.CONNECTION_FAILURE, "could not connect"), "08006", "FATAL"),
        (PoolError(sqlstate.TOO_MANY_CONNECTIONS, "no server"), "53300", "FATAL"),
    ],
)
def test_every_error_type_is_a_pg_error(error, code, severity):
    assert isinstance(error, PgError)
    assert (error.sqlstate, error.severity, error.detail) == (code, severity, None)
    assert error.fields == m.error_fields(severity, code, str(error))


def _literals(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            value = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            if _SQLSTATE.fullmatch(value):
                yield node.lineno, value


def test_sqlstates_are_named_only_in_sqlstate_py():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {value!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "wire" / "sqlstate.py"
        for line, value in _literals(path)
    ]
    assert found == [], "name these SQLSTATEs in pgtwist/wire/sqlstate.py:\n" + "\n".join(found)


def test_the_rule_sees_a_literal(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('code = "57P01"\nnot_one = "FATAL"\n')
    assert list(_literals(sample)) == [(1, "57P01")]
