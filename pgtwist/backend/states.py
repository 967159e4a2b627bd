"""A server connection's states and the one table of the moves between them (ServerConnection._enter)."""

from __future__ import annotations

from typing import Final

# Final: inlined by the compiled core, as the session's states are (session/states.py).
CONNECTING: Final = "connecting"
LOGIN: Final = "login"
IDLE: Final = "idle"
INTERNAL: Final = "internal"
LINKED: Final = "linked"
CLOSED: Final = "closed"
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
