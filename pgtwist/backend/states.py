"""A server connection's states and the one table of the moves between them (ServerConnection._enter)."""

from __future__ import annotations

CONNECTING, LOGIN, IDLE, INTERNAL, LINKED, CLOSED = "connecting", "login", "idle", "internal", "linked", "closed"
# Every move a server connection's state may make, in one place (ServerConnection._enter). IDLE
# here is the connection's own state (nothing owed, no client); where it sits in its pool (idle
# list, busy, lent) is the pool's business. Closing is allowed from anywhere, twice included.
TRANSITIONS = {
    CONNECTING: frozenset((LOGIN, CLOSED)),
    LOGIN: frozenset((IDLE, CLOSED)),
    IDLE: frozenset((INTERNAL, LINKED, CLOSED)),
    INTERNAL: frozenset((IDLE, CLOSED)),
    LINKED: frozenset((IDLE, CLOSED)),
    CLOSED: frozenset((CLOSED,)),
}


class IllegalTransition(RuntimeError):
    """A server connection was asked to move where its state cannot go (a bug, never the node's doing)."""
