"""Statement audit log for the users listed in `audit`: Query and Parse texts, never Bind values."""

from __future__ import annotations

import re

from twisted.logger import Logger

from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire.errors import WireError

log = Logger(namespace="pgtwist.audit")

# What an audited session-mode client's scanner captures besides what it needs anyway.
CAPTURE = frozenset((p.QUERY, p.PARSE))
MAX_TEXT = 64 * 1024  # longer statements are cut (and say so)
REDACTED = "'********'"
# CREATE/ALTER ROLE ... [ENCRYPTED] PASSWORD 'x' (also E'x', U&'x', $tag$x$tag$): the literal never reaches the log.
_PASSWORD = re.compile(
    r"""(\bPASSWORD\s+)(?:(?:[EeUu]&?)?'(?:[^'\\]|\\.|'')*'?|(\$[A-Za-z_0-9]*\$).*?(?:\2|$))""",
    re.IGNORECASE | re.DOTALL,
)


def redact(text: str) -> str:
    """*text* with every PASSWORD literal replaced by asterisks (an unterminated one to the end)."""
    if "assword" not in text and "ASSWORD" not in text:
        return text
    return _PASSWORD.sub(lambda match: match.group(1) + REDACTED, text)


def statement(session, msg_type: int, body: bytes) -> None:
    """Log one statement text a client sent: simple Query or extended-protocol Parse."""
    try:
        if msg_type == p.QUERY:
            kind, name, text = "query", None, m.decode_query(body)
        elif msg_type == p.PARSE:
            name, text = m.decode_parse(body)
            kind = "parse"
        else:
            return
    except WireError:
        return  # the session's own checks deal with malformed messages
    session.proxy.counters.audited += 1
    text = redact(text)  # (before cutting: a cut must not leave half a password behind)
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + f"... [{len(text) - MAX_TEXT} more characters]"
    database = session.database
    log.info(
        "audit {user}@{database} {client} {kind}{named}: {statement}",
        user=session.user,
        database=database.name if database is not None else None,
        client=session.id,
        kind=kind,
        named=f" {name!r}" if name else "",
        statement=text,
    )
