"""Lease: what belongs to one lending of a server connection to a client, made fresh and dropped whole."""

from __future__ import annotations


class Lease:
    """One lending of the session's server connection (``ClientSession.server``) to its work.

    Made at link time (ClientSession._prepared) and, while the client keeps its connection
    between transactions, afresh for each transaction on it; dropped whole when the connection
    goes back to its pool or is lost, so that nothing is reset by hand. One small object per
    lending, none per message: the fast paths only set its fields.
    """

    __slots__ = ("sent", "replied", "used", "wrote", "watch", "async_commit", "read_link", "holding", "lent", "ddl")

    def __init__(self, read_link: bool = False) -> None:
        self.sent: list = []  # what this lending forwarded before any reply (replayable reads)
        self.replied = False  # the client got bytes of this lending's work: it is not replayed
        self.used = False  # the client's work (not only its login) ran on it
        self.wrote = False  # read-your-writes: it may have written on the primary (ClientSession._watch_link)
        self.watch = 0  # ... and what is still to be looked at to know (_WATCH_* bits)
        self.async_commit = False  # its transaction's commit may have been asynchronous (SET LOCAL)
        self.read_link = read_link  # on a replica for an autocommit read: writes behind it wait
        self.holding = False  # a write waits in the backlog for this read's replica to go
        self.lent = False  # kept between transactions: the pool may reclaim it (Pool.lend)
        # Its work changed the schema other sessions see (not only its temporary relations): where
        # its commit ends bounds every session's replica reads.
        # True, or under workers = N the token of the other workers' wait (DatabaseRouter.ddl_sent).
        self.ddl: bool | int = False

    @property
    def told(self) -> int | None:
        """The token of the other workers' wait for this lending's DDL (workers = N), else None."""
        ddl = self.ddl
        return ddl if type(ddl) is int else None

    def __repr__(self) -> str:
        flags = [name for name in ("replied", "used", "wrote", "read_link", "holding", "lent") if getattr(self, name)]
        return f"<Lease {' '.join(flags) or '-'} sent={len(self.sent)}>"
