"""What the end of one server connection says about its node: down, unsure (probe it), or nothing."""

from __future__ import annotations

from pgtwist.wire import sqlstate

# The node is down (or the way to it is): mark it so at once; the monitor's probes bring it back.
DOWN = "down"
# Maybe the node, maybe only that one connection: probe the node now; only a failed probe marks it down.
UNSURE = "unsure"
# Only that connection (or its client) is concerned: the node's health stays as it is.
NOT_THE_NODE = "not the node"

# FATALs (and login refusals) that only a node in trouble sends: a crash of another backend
# (57P02: crash recovery follows), a shutdown or recovery in progress (57P03); and 08006, which
# pgtwist itself makes for a refused, reset or timed-out connection to the node.
_NODE_TROUBLE = frozenset((sqlstate.CRASH_SHUTDOWN, sqlstate.CANNOT_CONNECT_NOW, sqlstate.CONNECTION_FAILURE))


def connection_ended(fields: dict | None) -> str:
    """What a server connection that ended says about its node, given the FATAL (or login
    refusal) the node sent before it hung up, or None when it hung up without a word.

    A connection reset or closed without a word is evidence about the node (or the network to
    it). PostgreSQL words a fast shutdown and pg_terminate_backend() of one backend the same
    (57P01 "terminating connection due to administrator command"), so 57P01 only asks for a
    probe. Every other FATAL concerns that session alone: a client's protocol violation (08P01),
    idle_in_transaction_session_timeout (25P03), idle_session_timeout (57P05), out of memory...
    and must never take the node out of rotation for everyone else (nor, with auto_promote,
    let one client provoke a promotion).
    """
    if fields is None:
        return DOWN
    code = fields.get("C")
    if code in _NODE_TROUBLE:
        return DOWN
    if code == sqlstate.ADMIN_SHUTDOWN:
        return UNSURE
    return NOT_THE_NODE


def deliberate(fields: dict | None) -> bool:
    """Whether the node ended the connection on purpose, for this connection's own sake (a
    terminated backend, a timeout, a protocol violation): its work must not be run again
    elsewhere, unlike work cut off by a node crashing or going away."""
    return fields is not None and fields.get("C") not in _NODE_TROUBLE
