"""twistd drop-in: `twistd pgbalance` runs pgtwist (pgtwist.tap has the options)."""

from twisted.application.service import ServiceMaker

pgbalance = ServiceMaker(
    "pgtwist PostgreSQL pooler and load balancer",
    "pgtwist.tap",
    "PostgreSQL-protocol-aware connection pooler and load balancer",
    "pgbalance",
)
