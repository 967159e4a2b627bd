"""The pool's error: a client could not get a server connection.

(Its own module, outside the compiled core: mypyc compiles an exception class as a plain Python
class, and a class attribute such as ``severity`` would not override PgError's there.)
"""

from __future__ import annotations

from pgtwist.wire.errors import PgError


class PoolError(PgError):
    """A client could not get a server connection: FATAL, unless another node can serve it."""

    severity = "FATAL"
