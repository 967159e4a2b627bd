"""twistd drop-in: `twistd pgbalance` runs pgtwist (pgtwist.service.tap has the options)."""

from twisted.application.service import ServiceMaker

pgbalance = ServiceMaker(
    "pgtwist PostgreSQL pooler and load balancer",
    "pgtwist.service.tap",
    "PostgreSQL-protocol-aware connection pooler and load balancer",
    "pgbalance",
)
