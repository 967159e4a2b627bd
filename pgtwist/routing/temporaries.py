"""The relations a session made temporary, and whether its DDL touches only those: pure, over analysis's DdlSteps."""

from __future__ import annotations

from dataclasses import dataclass

from pgtwist.routing.analysis import ALTERS, CREATES, CREATES_DROP, DISCARDS, DROPS, RENAMES, TEMP_SCHEMA, DdlStep

# Why this is decided statement by statement: DDL on temporary objects is seen by no other
# session, so it bounds nobody's replica reads (an ORM's temporary table per request would
# otherwise send every read to the primary each time); but a session pinned by its temporary
# table runs DDL on permanent tables too, which every session must see at once.
#
# Names are the session's own account, from the statements it sent: a CREATE TEMP that failed,
# or whose transaction rolled back, leaves its name here, and an unqualified name is taken for
# the temporary relation (pg_temp comes first in every search_path unless named later in it).
# Either can only count a statement on a permanent relation of the same name as temporary.


@dataclass(frozen=True, slots=True)
class Temporaries:
    names: frozenset[str] = frozenset()  # the temporary relations (tables, views, sequences, indexes) by name
    at_commit: frozenset[str] = frozenset()  # those of them made ON COMMIT DROP: gone when the transaction ends

    def after(self, steps: tuple[DdlStep, ...]) -> tuple[bool, Temporaries]:
        """Whether there is DDL among *steps* and all of it is on temporary relations (DDL other
        sessions cannot see), and the temporary relations once the steps ran."""
        names = set(self.names)
        at_commit = set(self.at_commit)
        ddl = False
        temporary = True
        for op, schema, name, new in steps:
            if op == DISCARDS:
                names.clear()
                at_commit.clear()
                continue
            ddl = True
            if op == CREATES or op == CREATES_DROP:
                names.add(name)
                if op == CREATES_DROP:
                    at_commit.add(name)
                else:
                    at_commit.discard(name)
                continue
            if not (schema == TEMP_SCHEMA or (not schema and name in names)):
                temporary = False  # (SHARED, or a relation this session did not make temporary)
                continue
            if op == DROPS or op == RENAMES:
                names.discard(name)
                if name in at_commit:
                    at_commit.discard(name)
                    if op == RENAMES:
                        at_commit.add(new)
            if new and (op == RENAMES or op == ALTERS):
                names.add(new)  # (the new name, or the index made on it)
        if names == self.names and at_commit == self.at_commit:
            return ddl and temporary, self
        return ddl and temporary, Temporaries(frozenset(names), frozenset(at_commit))

    def ended(self) -> Temporaries:
        """Once the transaction ended, committed or not: without its ON COMMIT DROP relations."""
        if not self.at_commit:
            return self
        return Temporaries(self.names - self.at_commit)


NONE = Temporaries()
