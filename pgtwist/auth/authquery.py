"""auth_query: the secrets PostgreSQL stores for users pgtwist has no entry for, cached by user with a TTL (no I/O)."""

from __future__ import annotations

from pgtwist.auth.credentials import Credential
from pgtwist.wire import messages as m

__all__ = ["AuthCache", "credential_from_rows", "lookup_messages", "SAFE_SEARCH_PATH"]

# What auth_query runs under, whatever the auth_user's defaults say: pg_catalog first and pg_temp
# last (else pg_temp is searched first for relations), so nobody's objects can stand in for
# pg_shadow or an operator the query uses (CVE-2025-12819 was a search_path injection here).
SAFE_SEARCH_PATH = "pg_catalog, pg_temp"
# A burst of logins for distinct unknown names must not grow memory without bound.
CACHE_LIMIT = 10_000


def lookup_messages(query: str, user: str) -> tuple[bytes, int]:
    """The bytes to send on the auth_user's connection, and how many ReadyForQuery answer them.

    The search_path is set in its own Query (SET LOCAL would need a transaction block); the user
    name travels as the bound parameter $1 of the unnamed statement, never inside SQL text.
    """
    data = (
        m.query(f"SET search_path TO {SAFE_SEARCH_PATH}")
        + m.parse("", query)
        + m.bind("", "", [user.encode("utf-8")])
        + m.execute("", 2)  # (more than one row for a name is refused; two show it)
        + m.sync()
    )
    return data, 2


def credential_from_rows(user: str, rows: list[list[bytes | None]]) -> Credential | None:
    """The Credential auth_query's answer gives *user*, or None (no such role, no password, not one row).

    A NULL or unusable secret, or a row naming another role, is the same as no role: the client
    gets the same 28P01 either way.
    """
    if len(rows) != 1 or len(rows[0]) < 2 or rows[0][1] is None:
        return None
    if rows[0][0] != user.encode("utf-8"):
        # A query (or SECURITY DEFINER function) answering with another role's row must not let
        # this name in with that role's secret.
        return None
    try:
        return Credential.parse(user, rows[0][1].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


class AuthCache:
    """Looked-up secrets by user name, each good for *ttl* seconds from when it was fetched.

    Keyed by the exact name the client gave: one user's answer is never another's. Absence is
    cached too, so a client hammering an unknown name costs one query per TTL, not one per try.
    """

    __slots__ = ("ttl", "_entries")

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Credential | None]] = {}

    def get(self, user: str, now: float) -> tuple[bool, Credential | None]:
        """(True, credential or None) while fresh; (False, None) when it must be fetched."""
        entry = self._entries.get(user)
        if entry is None:
            return False, None
        if now - entry[0] >= self.ttl:
            del self._entries[user]
            return False, None
        return True, entry[1]

    def put(self, user: str, credential: Credential | None, now: float) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= CACHE_LIMIT and user not in self._entries:
            self.expire(now)
            if len(self._entries) >= CACHE_LIMIT:
                self._entries.pop(next(iter(self._entries)))  # the oldest insertion
        self._entries[user] = (now, credential)

    def expire(self, now: float) -> None:
        for user in [u for u, (at, _) in self._entries.items() if now - at >= self.ttl]:
            del self._entries[user]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
