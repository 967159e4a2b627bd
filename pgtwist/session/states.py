"""A client session's states and the one table of the moves between them (docs/ARCHITECTURE.md shows it)."""

from __future__ import annotations

from typing import Final

# Final: compiled, a test of the state is a comparison with a constant, not a lookup of a global
# (pgtwist/compiled.py hashes this file with the core that inlines them).
LOGIN: Final = "login"
IDLE: Final = "idle"  # transaction mode only: logged in, holding no server connection
WAITING: Final = "waiting"
PREPARING: Final = "preparing"
LINKED: Final = "linked"
CLOSED: Final = "closed"
ADMIN: Final = "admin"  # logged in to the admin console (dbname "pgbalance"): no pool, no server

# (state, event, next state): every move ClientSession._enter() allows, and nothing else.
# PREPARING is a server connection being made ready for the client's work (settings synced),
# or, at release, read back (settings, the primary's WAL position) before it goes to its pool.
TRANSITIONS: tuple[tuple[str, str, str], ...] = (
    (LOGIN, "login needs a server connection", WAITING),
    (LOGIN, "login answered from a known pool", IDLE),
    (LOGIN, "admin console login", ADMIN),
    (LOGIN, "cancel request, timeout, bad input", CLOSED),
    (IDLE, "work arrives", WAITING),
    (IDLE, "terminate, fatal, client gone", CLOSED),
    (WAITING, "retry after a failed attempt", WAITING),
    (WAITING, "server connection got", PREPARING),
    (WAITING, "server connection handed over in place, settings as they are", LINKED),
    (WAITING, "open batch on a replica, or the work failed", IDLE),
    (WAITING, "fatal, client gone", CLOSED),
    (PREPARING, "server connection ready", LINKED),
    (PREPARING, "server connection lost while preparing", WAITING),
    (PREPARING, "read-back done or failed", IDLE),
    (PREPARING, "fatal, client gone", CLOSED),
    (LINKED, "release with a read-back", PREPARING),
    (LINKED, "release, reclaim, server lost", IDLE),
    (LINKED, "lost autocommit read replayed elsewhere", WAITING),
    (LINKED, "terminate, fatal, server lost, client gone", CLOSED),
    (ADMIN, "terminate, client gone", CLOSED),
    (CLOSED, "already closed", CLOSED),
)

# state -> the states it may move to: _enter() makes one dict lookup and one set membership test.
NEXT: dict[str, frozenset[str]] = {
    state: frozenset(to for frm, _, to in TRANSITIONS if frm == state) for state in (LOGIN, IDLE, WAITING, PREPARING, LINKED, ADMIN, CLOSED)
}


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug in pgtwist, never something a client did."""

    def __init__(self, frm: str, to: str):
        super().__init__(f"client session cannot move from {frm} to {to}")
        self.frm = frm
        self.to = to
