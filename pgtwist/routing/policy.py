"""Pure routing policy: which role a statement wants, which node serves it, and who is primary after a split brain."""

from __future__ import annotations

import math
from dataclasses import dataclass

PRIMARY = "primary"
REPLICA = "replica"
ANY_READ = "any-read"
# A min_lsn no replica has replayed: reads go to the primary. A client whose last write's
# position could not be read back (ClientSession.min_lsn), and every client while a DDL's
# position is being read back (DatabaseRouter.ddl_pending).
UNREPLAYED = 1 << 64

# in_transaction values (the tx of the statement that opened it) meaning "began read only".
_READ_ONLY_TX = frozenset(("begin_read_only", "set_transaction_read_only", "read_only"))


@dataclass
class NodeState:
    name: str  # "127.0.0.1:5432" as written in config
    role: str = "unknown"  # "primary" | "replica" | "unknown"
    up: bool = False
    lsn: int = 0  # primary: current WAL LSN; replica: replay LSN (as integer)
    timeline: int = 0
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    outstanding: int = 0  # work in flight (busy server connections), for least-outstanding choice
    weight: float = 1.0
    fenced: bool = False  # a primary that lost a split brain: never routed to
    receive_lsn: int = 0  # replica: WAL received (>= lsn); what it will have replayed once promoted
    last_error: str | None = None  # why the last probe failed (None after a success)
    checked_at: float | None = None  # reactor time of the last successful probe
    upstream: bool | None = None  # replica: a WAL receiver is streaming to it (None: not probed / not a replica)
    # The last probe's login was refused for the database itself (3D000: dropped, not yet made):
    # down for this database's clients, but no sign that the node is (auto_promote leaves it be).
    database_missing: bool = False

    @property
    def usable(self) -> bool:
        return self.up and not self.fenced


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> 0x16B374D848 (PostgreSQL's pg_lsn text form: two hex halves)."""
    hi, sep, lo = text.strip().partition("/")
    if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
        raise ValueError(f"invalid LSN {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


_WAL_PAGE = 8192  # XLOG_BLCKSZ
_SHORT_PAGE_HEADER = 24  # SizeOfXLogShortPHD: what starts every WAL page but a segment's first


def write_end_lsn(insert_lsn: int) -> int:
    """Where a client's write ends in the WAL, from pg_current_wal_insert_lsn() read right after it.

    The insert position of a page boundary is reported past the next page's header, while a
    replica's pg_last_wal_replay_lsn() stops at the boundary itself: taken as it is, such a
    position would hold the client's reads on the primary until some other WAL is written.
    No record ends inside a page header, so that position means the boundary. (A segment's
    first page has a longer header; that rarer case errs the safe way: reads on the primary.)
    """
    if insert_lsn % _WAL_PAGE == _SHORT_PAGE_HEADER:
        return insert_lsn - _SHORT_PAGE_HEADER
    return insert_lsn


def write_lsn(insert_lsn: int, flush_lsn: int, synchronous_commit: str) -> int:
    """Where replicas must have replayed to before a client may read its own write there, from
    the primary's insert and flush positions and the session's synchronous_commit, read right
    after the write committed.

    A synchronous commit (any setting but "off") returned only once its commit record was
    flushed: the flush position covers it, and is the least that does. An asynchronous one may
    not be flushed yet, so only the insert position is safe; it may also cover other sessions'
    WAL not yet flushed, which can keep this client's reads on the primary a while longer.
    """
    if synchronous_commit.lower() != "off":
        return flush_lsn
    return write_end_lsn(insert_lsn)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _primary_key(n: NodeState):
    return (n.timeline, n.lsn)


def _primary(nodes: list[NodeState]) -> NodeState | None:
    # Normally one claimant; with an unresolved split brain the newest history is the safest
    # bet (the first of equals, as max() would keep). One pass: this runs for every placement.
    best = None
    for n in nodes:
        if n.role == PRIMARY and n.up and not n.fenced and (best is None or _primary_key(n) > _primary_key(best)):
            best = n
    return best


def _score(n: NodeState) -> float:
    # +1 so weights matter on an idle cluster too; weight <= 0 drains a node (used only in a tie of drained nodes).
    return (n.outstanding + 1) / n.weight if n.weight > 0 else math.inf


def _name(n: NodeState) -> str:
    return n.name


def _least_outstanding(candidates: list[NodeState], rr: int) -> NodeState:
    if len(candidates) == 1:
        return candidates[0]
    scores = [_score(n) for n in candidates]
    best = min(scores)
    tied = sorted((n for n, score in zip(candidates, scores) if score == best), key=_name)
    return tied[rr % len(tied)]


# Why a node gets no reads (SHOW NODES "excluded", /metrics pgbalance_node_excluded{reason}).
DOWN = "down"
FENCED = "fenced"
OLD_TIMELINE = "old_timeline"
NO_UPSTREAM = "no_upstream"
LAG_BYTES = "lag_bytes"
LAG_SECONDS = "lag_seconds"
EXCLUSIONS = (DOWN, FENCED, OLD_TIMELINE, NO_UPSTREAM, LAG_BYTES, LAG_SECONDS)


def read_exclusion(
    n: NodeState, primary: NodeState | None, max_lag_bytes: int | None = None, max_lag_seconds: float | None = None
) -> str | None:
    """Why *n* may not serve reads now (one of EXCLUSIONS), or None when it may.

    *primary* is the current primary (resolve_primary's winner), or None during a failover.
    A replica left behind by a failover must not serve reads: it never sees a write made on
    the new primary, and comparing its position with the new primary's means nothing (the
    two histories share LSNs). So, once there is a current primary, a replica on an older
    timeline, or with no WAL receiver streaming to it (its upstream is gone: it cannot be
    following the current primary), gets none until it follows the primary again. Without
    a primary the replicas are all there is to read from, and all have lost their upstream:
    only the primary's absence is held against nothing. Lag is measured against the current
    primary's position (unknown lag is not held against a replica); without one, against
    what the replicas of the same timeline replayed the most of (ClusterMonitor._settle), and
    then any lag at all excludes: nothing new is written, so a replica behind another stays
    behind, and the freshest ones serve the reads.
    """
    if not n.up:
        return DOWN
    if n.fenced:
        return FENCED
    if n.role != REPLICA:
        return None
    if primary is not None:
        # A replica's timeline is 0 when unknown (never probed with a WAL receiver, or a
        # health_user without pg_monitor): not held against it.
        if 0 < n.timeline < primary.timeline:
            return OLD_TIMELINE
        if n.upstream is False:
            return NO_UPSTREAM
    if max_lag_bytes is not None and n.lag_bytes is not None and n.lag_bytes > max_lag_bytes:
        return LAG_BYTES
    if primary is None and n.lag_bytes:
        return LAG_BYTES
    if max_lag_seconds is not None and n.lag_seconds is not None and n.lag_seconds > max_lag_seconds:
        return LAG_SECONDS
    return None


def read_exclusions(
    nodes: list[NodeState], max_lag_bytes: int | None = None, max_lag_seconds: float | None = None
) -> dict[str, str | None]:
    """read_exclusion() of every node, by name, against the current primary."""
    primary = _primary(nodes)
    return {n.name: read_exclusion(n, primary, max_lag_bytes, max_lag_seconds) for n in nodes}


def choose(
    nodes: list[NodeState],
    *,
    want: str,
    min_lsn: int = 0,
    max_lag_bytes: int | None = None,
    max_lag_seconds: float | None = None,
    rr: int = 0,
) -> tuple[NodeState | None, str]:
    """The node for work wanting *want* ("primary" | "replica" | "any-read"), and why; (None, why) if none can."""
    primary = _primary(nodes)
    if want == PRIMARY:
        return (primary, "primary") if primary is not None else (None, "no primary")
    # (One pass, as read for every placement: replicas up, those of them that may serve reads,
    # those of these that have replayed the client's last write.)
    replicas = fresh = 0
    caught_up = []
    for n in nodes:
        if n.role != REPLICA or not n.up or n.fenced:
            continue
        replicas += 1
        if read_exclusion(n, primary, max_lag_bytes, max_lag_seconds) is None:
            fresh += 1
            if n.lsn >= min_lsn:
                caught_up.append(n)
    if want == ANY_READ:
        pool = caught_up + ([primary] if primary is not None else [])
        if not pool:
            return None, "no node up"
        return _least_outstanding(pool, rr), "any-read"
    if caught_up:
        return _least_outstanding(caught_up, rr), "replica"
    if not replicas:
        why = "no replica up"
    elif not fresh:
        why = "replicas lagging"  # (or left behind by a failover: read_exclusion says which)
    else:
        why = "no replica caught up to the client's last write"
    if primary is None:
        return None, f"{why} and no primary"
    return primary, why


def resolve_primary(nodes: list[NodeState]) -> NodeState | None:
    """Settle a split brain in place: among up nodes claiming primary the highest (timeline, lsn) wins, the others are fenced.

    Fencing sticks: a fenced node never wins again while it still claims to be primary, even
    when the winner goes down (an old primary that comes back must not take writes on a dead
    history). It is lifted only when the node is seen as a replica again (rebuilt and
    re-attached), or by an operator clearing ``fenced``.
    """
    for n in nodes:
        if n.up and n.role == REPLICA:
            n.fenced = False
    claimants = sorted((n for n in nodes if n.up and n.role == PRIMARY and not n.fenced), key=lambda n: n.name)
    if not claimants:
        return None
    # max() keeps the first of equals: on a (timeline, lsn) tie the smallest name wins, stable from round to round.
    winner = max(claimants, key=_primary_key)
    for n in nodes:
        if n.up and n.role == PRIMARY and n is not winner:
            n.fenced = True
    return winner


def route(classification, *, in_transaction: str | None, user_rule: str | None, db_rule: str | None) -> tuple[str, str]:
    """The role work wants ("primary" | "replica") and why, before any node is chosen.

    *in_transaction* is the tx of the statement that opened the current explicit transaction
    ("begin", "begin_read_only", ...), or None outside one. Precedence: user rule, database
    rule, hint, the transaction, then the statement itself.
    """
    for rule, who in ((user_rule, "user"), (db_rule, "database")):
        if rule in (PRIMARY, REPLICA):
            return rule, f"rule: {who}"
    hint = getattr(classification, "hint", None)
    if hint in (PRIMARY, REPLICA):
        return hint, f"hint: {hint}"
    if in_transaction is not None:
        if in_transaction in _READ_ONLY_TX:
            return REPLICA, "read-only transaction"
        return PRIMARY, "transaction"
    tx = getattr(classification, "tx", None)
    if tx == "begin_read_only":
        return REPLICA, "BEGIN READ ONLY"
    if tx == "begin":
        return PRIMARY, "BEGIN"
    if classification.read_only:
        return REPLICA, classification.reason
    return PRIMARY, classification.reason
