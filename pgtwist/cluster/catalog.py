"""Catalog facts routing needs ahead of time, read by the cluster monitor: which functions pg_proc calls volatile."""

from __future__ import annotations

from dataclasses import dataclass

# Volatility by bare name (any volatile overload counts): the router sees names as written, not
# resolved. One row per name, a few thousand on a fresh cluster.
FUNCTIONS_SQL = "SELECT proname, bool_or(provolatile = 'v') FROM pg_catalog.pg_proc GROUP BY proname"


@dataclass(frozen=True)
class FunctionVolatility:
    """pg_proc's answer at the last fetch. A function unknown then (created since, or nothing
    fetched yet) counts as volatile: a read calling it goes to the primary."""

    known: frozenset[str] | None = None  # every proname at the last fetch (None: not fetched)
    volatile: frozenset[str] = frozenset()

    def is_volatile(self, name: str) -> bool:
        known = self.known
        return known is None or name not in known or name in self.volatile


NOT_FETCHED = FunctionVolatility()


def function_volatility(rows) -> FunctionVolatility:
    """FUNCTIONS_SQL's rows (bytes/None, as the monitor's connection returns them)."""
    known, volatile = set(), set()
    for name, is_volatile in rows:
        if name is None:
            continue
        text = name.decode("utf-8", "replace")
        known.add(text)
        if is_volatile == b"t":
            volatile.add(text)
    return FunctionVolatility(frozenset(known), frozenset(volatile))
