"""pgtwist: a PostgreSQL-protocol-aware load balancer and connection pooler on Twisted."""

__version__ = "0.1.0"
