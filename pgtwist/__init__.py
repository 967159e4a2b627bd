"""pgtwist: a PostgreSQL-protocol-aware load balancer and connection pooler on Twisted."""

__version__ = "0.1.0"

# First: whether the compiled core or its .py files load (pgtwist/compiled.py).
from pgtwist import compiled as _compiled  # noqa: E402,F401
