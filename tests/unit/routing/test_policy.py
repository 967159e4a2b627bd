"""Routing policy: node choice, lag limits, read-your-writes, round robin, split brain fencing, route precedence."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgtwist.routing import policy
from pgtwist.routing.analysis import Classification, classify
from pgtwist.routing.policy import NodeState, choose, format_lsn, parse_lsn, resolve_primary, route, write_end_lsn, write_lsn


def primary(name="p:5432", **kw):
    kw.setdefault("up", True)
    kw.setdefault("timeline", 1)
    kw.setdefault("lsn", 1000)
    return NodeState(name, role="primary", **kw)


def replica(name, **kw):
    kw.setdefault("up", True)
    kw.setdefault("timeline", 1)
    kw.setdefault("lsn", 1000)
    kw.setdefault("lag_bytes", 0)
    kw.setdefault("lag_seconds", 0.0)
    return NodeState(name, role="replica", **kw)


def pick(nodes, want="replica", **kw):
    kw.setdefault("max_lag_bytes", None)
    kw.setdefault("max_lag_seconds", None)
    node, why = choose(nodes, want=want, **kw)
    return (node.name if node else None), why


# -- LSNs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("0/0", 0), ("0/16B3748", 0x16B3748), ("16/B374D848", 0x16B374D848), ("FFFFFFFF/FFFFFFFF", 2**64 - 1), ("a/b", 0xA0000000B)],
)
def test_parse_lsn(text, value):
    assert parse_lsn(text) == value


@pytest.mark.parametrize("text", ["", "16", "/1", "1/", "x/1", "1/2/3", "123456789/0"])
def test_parse_lsn_rejects(text):
    with pytest.raises(ValueError):
        parse_lsn(text)


def test_format_lsn_round_trips():
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    assert format_lsn(0) == "0/0"


# -- choose: primary --------------------------------------------------------------------------------


def test_primary_wanted():
    assert pick([replica("r1"), primary("p")], want="primary") == ("p", "primary")


def test_no_primary():
    assert pick([replica("r1")], want="primary") == (None, "no primary")
    assert pick([primary("p", up=False), replica("r1")], want="primary") == (None, "no primary")


def test_fenced_primary_is_never_chosen():
    assert pick([primary("old", fenced=True)], want="primary") == (None, "no primary")
    nodes = [primary("old", fenced=True, timeline=1), primary("new", timeline=2)]
    assert pick(nodes, want="primary") == ("new", "primary")


# -- choose: replica --------------------------------------------------------------------------------


def test_replica_wanted():
    assert pick([primary("p"), replica("r1")]) == ("r1", "replica")


def test_least_outstanding_replica():
    nodes = [primary("p"), replica("r1", outstanding=3), replica("r2", outstanding=1), replica("r3", outstanding=2)]
    assert pick(nodes) == ("r2", "replica")


def test_weight_scales_outstanding():
    # r1 has twice the capacity: (4+1)/2 = 2.5 beats (2+1)/1 = 3.
    nodes = [replica("r1", outstanding=4, weight=2.0), replica("r2", outstanding=2)]
    assert pick(nodes)[0] == "r1"
    nodes = [replica("r1", outstanding=6, weight=2.0), replica("r2", outstanding=2)]
    assert pick(nodes)[0] == "r2"


def test_zero_weight_drains_a_replica():
    nodes = [primary("p"), replica("r1", weight=0.0), replica("r2", outstanding=50)]
    assert pick(nodes)[0] == "r2"
    # ...but it still serves when it is the only replica (and ties rotate among drained ones).
    assert pick([primary("p"), replica("r1", weight=0.0)])[0] == "r1"


def test_round_robin_breaks_ties():
    nodes = [primary("p"), replica("r2"), replica("r1"), replica("r3")]
    picks = [pick(nodes, rr=i)[0] for i in range(6)]
    assert picks == ["r1", "r2", "r3", "r1", "r2", "r3"]


def test_round_robin_only_among_the_least_busy():
    nodes = [replica("r1"), replica("r2", outstanding=1), replica("r3")]
    assert {pick(nodes, rr=i)[0] for i in range(10)} == {"r1", "r3"}


def test_down_and_fenced_replicas_skipped():
    nodes = [primary("p"), replica("r1", up=False), replica("r2", fenced=True), replica("r3", outstanding=9)]
    assert pick(nodes)[0] == "r3"


def test_no_replica_up_falls_back_to_primary():
    assert pick([primary("p"), replica("r1", up=False)]) == ("p", "no replica up")
    assert pick([primary("p")]) == ("p", "no replica up")


def test_lag_bytes_limit():
    nodes = [primary("p"), replica("r1", lag_bytes=5000), replica("r2", lag_bytes=100, outstanding=5)]
    assert pick(nodes, max_lag_bytes=1000)[0] == "r2"
    assert pick(nodes, max_lag_bytes=10) == ("p", "replicas lagging")
    assert pick(nodes, max_lag_bytes=None)[0] == "r1"


def test_lag_seconds_limit():
    nodes = [primary("p"), replica("r1", lag_seconds=12.5), replica("r2", lag_seconds=0.5, outstanding=5)]
    assert pick(nodes, max_lag_seconds=1.0)[0] == "r2"
    assert pick(nodes, max_lag_seconds=0.1) == ("p", "replicas lagging")


def test_unknown_lag_is_not_held_against_a_replica():
    # No primary to compare with (failover in progress): replicas still serve reads.
    nodes = [primary("p", up=False), replica("r1", lag_bytes=None, lag_seconds=None)]
    assert pick(nodes, max_lag_bytes=10, max_lag_seconds=1.0) == ("r1", "replica")


def test_read_your_writes_min_lsn():
    nodes = [primary("p", lsn=500), replica("r1", lsn=300), replica("r2", lsn=450, outstanding=3)]
    assert pick(nodes, min_lsn=400)[0] == "r2"
    assert pick(nodes, min_lsn=450)[0] == "r2"
    assert pick(nodes, min_lsn=451) == ("p", "no replica caught up to the client's last write")
    assert pick(nodes, min_lsn=0)[0] == "r1"


def test_replica_on_an_older_timeline_is_lagging():
    nodes = [primary("p", timeline=2), replica("r1", timeline=1), replica("r2", timeline=0, outstanding=3)]
    assert pick(nodes)[0] == "r2"  # timeline 0 = unknown: not held against it
    assert pick([primary("p", timeline=2), replica("r1", timeline=1)]) == ("p", "replicas lagging")


def test_nothing_to_fall_back_to():
    assert pick([replica("r1", up=False)]) == (None, "no replica up and no primary")
    assert pick([replica("r1", lag_bytes=99)], max_lag_bytes=1) == (None, "replicas lagging and no primary")


# -- choose: any-read -------------------------------------------------------------------------------


def test_any_read_includes_the_primary():
    nodes = [primary("p"), replica("r1", outstanding=4)]
    assert pick(nodes, want="any-read") == ("p", "any-read")
    nodes = [primary("p", outstanding=4), replica("r1")]
    assert pick(nodes, want="any-read") == ("r1", "any-read")


def test_any_read_respects_limits_and_min_lsn():
    nodes = [primary("p", outstanding=9, lsn=800), replica("r1", lag_bytes=500, lsn=300)]
    assert pick(nodes, want="any-read", max_lag_bytes=100)[0] == "p"
    assert pick(nodes, want="any-read", min_lsn=400)[0] == "p"


def test_any_read_nothing_up():
    assert pick([primary("p", up=False)], want="any-read") == (None, "no node up")


# -- resolve_primary: split brain -------------------------------------------------------------------


def test_single_primary_wins():
    p, r = primary("p"), replica("r1")
    assert resolve_primary([p, r]) is p
    assert not p.fenced and not r.fenced


def test_higher_timeline_wins_and_the_other_is_fenced():
    old = primary("old", timeline=1, lsn=9000)  # more WAL, but on the abandoned history
    new = primary("new", timeline=2, lsn=5000)
    assert resolve_primary([old, new]) is new
    assert old.fenced and not new.fenced


def test_same_timeline_highest_lsn_wins():
    a = primary("a", timeline=3, lsn=100)
    b = primary("b", timeline=3, lsn=200)
    assert resolve_primary([a, b]) is b
    assert a.fenced


def test_full_tie_is_stable_by_name():
    a = primary("a")
    b = primary("b")
    assert resolve_primary([b, a]) is a
    assert b.fenced
    assert resolve_primary([a, b]) is a


def test_down_primary_not_a_claimant_and_not_fenced():
    old = primary("old", up=False, timeline=1)
    new = primary("new", timeline=2)
    assert resolve_primary([old, new]) is new
    assert not old.fenced


def test_no_primary_up():
    assert resolve_primary([primary("p", up=False), replica("r")]) is None
    assert resolve_primary([]) is None


def test_fencing_sticks_when_the_winner_goes_down():
    old = primary("old", timeline=1)
    new = primary("new", timeline=2)
    resolve_primary([old, new])
    new.up = False
    assert resolve_primary([old, new]) is None
    assert old.fenced


def test_fencing_lifted_when_seen_as_a_replica_again():
    old = primary("old", timeline=1)
    new = primary("new", timeline=2)
    resolve_primary([old, new])
    old.role = "replica"  # rebuilt with pg_rewind and re-attached
    assert resolve_primary([old, new]) is new
    assert not old.fenced


def test_old_primary_restarting_after_failover_is_fenced():
    # The failover story: primary dies, a replica is promoted, the old primary comes back.
    p, r1, r2 = primary("p", timeline=1, lsn=1000), replica("r1"), replica("r2")
    assert resolve_primary([p, r1, r2]) is p
    p.up = False
    r1.role, r1.timeline, r1.lsn = "primary", 2, 1100
    assert resolve_primary([p, r1, r2]) is r1
    p.up = True
    assert resolve_primary([p, r1, r2]) is r1
    assert p.fenced
    assert pick([p, r1, r2], want="primary") == ("r1", "primary")


# -- route ------------------------------------------------------------------------------------------


def r(sql, in_transaction=None, user_rule=None, db_rule=None):
    return route(classify(sql), in_transaction=in_transaction, user_rule=user_rule, db_rule=db_rule)


def test_route_by_statement():
    assert r("SELECT 1") == ("replica", "select")
    assert r("INSERT INTO t VALUES (1)") == ("primary", "insert")
    assert r("SELECT nextval('s')") == ("primary", "function nextval")
    assert r("SELEC") == ("primary", "unparsable")


def test_route_begin():
    assert r("BEGIN") == ("primary", "BEGIN")
    assert r("BEGIN READ ONLY") == ("replica", "BEGIN READ ONLY")
    assert r("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY") == ("replica", "BEGIN READ ONLY")


def test_route_inside_transactions():
    assert r("SELECT 1", in_transaction="begin") == ("primary", "transaction")
    assert r("SELECT 1", in_transaction="begin_read_only") == ("replica", "read-only transaction")
    assert r("COMMIT", in_transaction="begin_read_only") == ("replica", "read-only transaction")
    assert r("INSERT INTO t VALUES (1)", in_transaction="begin_read_only") == ("replica", "read-only transaction")
    assert r("SELECT 1", in_transaction="set_transaction_read_only") == ("replica", "read-only transaction")


def test_route_hint_beats_statement_and_transaction():
    assert r("/* pgtwist:primary */ SELECT 1") == ("primary", "hint: primary")
    assert r("/* pgtwist:replica */ SELECT f()") == ("replica", "hint: replica")
    assert r("-- pgtwist:replica\nSELECT 1", in_transaction="begin") == ("replica", "hint: replica")


def test_route_rules_beat_everything():
    assert r("/* pgtwist:replica */ SELECT 1", user_rule="primary") == ("primary", "rule: user")
    assert r("INSERT INTO t VALUES (1)", db_rule="replica") == ("replica", "rule: database")
    assert r("SELECT 1", user_rule="replica", db_rule="primary") == ("replica", "rule: user")
    assert r("SELECT 1", in_transaction="begin", db_rule="primary") == ("primary", "rule: database")


def test_route_ignores_other_rule_values():
    assert r("SELECT 1", user_rule="auto", db_rule="") == ("replica", "select")
    assert r("INSERT INTO t VALUES (1)", user_rule=None, db_rule="any") == ("primary", "insert")


def test_route_plain_classification_object():
    c = Classification(read_only=True, reason="select")
    assert route(c, in_transaction=None, user_rule=None, db_rule=None) == ("replica", "select")


@pytest.mark.parametrize(
    "insert, end",
    [
        (parse_lsn("0/4000018"), parse_lsn("0/4000000")),  # just past a page's header: the boundary
        (parse_lsn("0/3FFE018"), parse_lsn("0/3FFE000")),
        (parse_lsn("0/3FFE020"), parse_lsn("0/3FFE020")),  # a record's end
        (parse_lsn("0/3FFE000"), parse_lsn("0/3FFE000")),
        (parse_lsn("1/28"), parse_lsn("1/28")),  # a segment's first page (long header): left as is
    ],
)
def test_write_end_lsn(insert, end):
    assert write_end_lsn(insert) == end


def test_write_lsn_is_the_flush_position_after_a_synchronous_commit():
    insert, flush = parse_lsn("0/3000100"), parse_lsn("0/3000080")
    for setting in ("on", "local", "remote_write", "remote_apply", "ON"):
        assert write_lsn(insert, flush, setting) == flush
    # Asynchronous: the commit may not be flushed yet; only the insert position is safe.
    assert write_lsn(insert, flush, "off") == insert
    assert write_lsn(parse_lsn("0/4000018"), flush, "off") == parse_lsn("0/4000000")


# -- replicas left behind by a failover (read_exclusion) -----------------------------------------


from pgtwist.routing import policy as pol  # noqa: E402


def test_replica_on_the_old_timeline_is_excluded_even_when_its_lsn_is_ahead():
    # The old primary wrote further on timeline 1 than the promoted replica had received:
    # LSNs on two histories compare to nothing, so lag 0 must not let it serve reads.
    new = primary("new", timeline=2, lsn=5000)
    left = replica("left", timeline=1, lsn=9000, lag_bytes=0, upstream=True)
    assert pol.read_exclusion(left, new) == pol.OLD_TIMELINE
    assert pick([new, left], min_lsn=4000) == ("new", "replicas lagging")


def test_replica_without_upstream_is_excluded_while_there_is_a_primary():
    p = primary("p", timeline=2)
    orphan = replica("orphan", timeline=0, upstream=False)
    follower = replica("follower", timeline=2, upstream=True, outstanding=5)
    assert pol.read_exclusion(orphan, p) == pol.NO_UPSTREAM
    assert pol.read_exclusion(follower, p) is None
    assert pick([p, orphan, follower])[0] == "follower"
    assert pick([p, orphan]) == ("p", "replicas lagging")


def test_without_a_primary_replicas_that_lost_their_upstream_still_serve_reads():
    # The primary just died: every replica lost its upstream, and they are all there is.
    a = replica("a", timeline=1, upstream=False)
    b = replica("b", timeline=1, upstream=False, outstanding=2)
    assert pol.read_exclusion(a, None) is None
    assert pick([primary("p", up=False), a, b]) == ("a", "replica")


def test_without_a_primary_only_the_freshest_replicas_serve_reads():
    # lag_bytes, without a primary: behind the replica that replayed the most (the monitor's).
    a = replica("a", timeline=1, upstream=False, lag_bytes=0x80)
    b = replica("b", timeline=1, upstream=False, outstanding=2, lag_bytes=0)
    assert pol.read_exclusion(a, None, max_lag_bytes=1 << 20) == pol.LAG_BYTES
    assert pick([primary("p", up=False), a, b]) == ("b", "replica")
    # With a primary, a small lag is within max_replica_lag as before.
    a.upstream = True
    assert pol.read_exclusion(a, primary("p"), max_lag_bytes=1 << 20) is None


def test_replica_follows_the_new_primary_again_and_is_back():
    p = primary("p", timeline=2)
    r = replica("r", timeline=1, upstream=False)
    assert pol.read_exclusion(r, p) == pol.OLD_TIMELINE
    r.timeline, r.upstream = 2, True
    assert pol.read_exclusion(r, p) is None


def test_unknown_upstream_and_timeline_are_not_held_against_a_replica():
    # A health_user without pg_monitor sees no timeline; an old pgtwist state has no upstream.
    assert pol.read_exclusion(replica("r", timeline=0, upstream=None), primary("p", timeline=3)) is None


def test_lag_is_measured_against_the_current_primary_only():
    r = replica("r", lag_bytes=None, lag_seconds=None)  # no primary to compare with: unknown
    assert pol.read_exclusion(r, None, max_lag_bytes=10, max_lag_seconds=1.0) is None
    r.lag_bytes = 11
    assert pol.read_exclusion(r, primary("p"), max_lag_bytes=10) == pol.LAG_BYTES
    r.lag_bytes, r.lag_seconds = 0, 2.0
    assert pol.read_exclusion(r, primary("p"), max_lag_bytes=10, max_lag_seconds=1.0) == pol.LAG_SECONDS


def test_read_exclusions_names_every_node():
    nodes = [
        primary("p", timeline=2),
        primary("old", timeline=1, fenced=True),
        replica("down", up=False),
        replica("left", timeline=1),
        replica("ok", timeline=2),
    ]
    assert pol.read_exclusions(nodes) == {"p": None, "old": pol.FENCED, "down": pol.DOWN, "left": pol.OLD_TIMELINE, "ok": None}
    # The fenced old primary is never "the current primary", even with more WAL.
    assert pol.read_exclusions([primary("old", timeline=1, lsn=10**9, fenced=True), replica("r", timeline=1)])["r"] is None


# -- choose() against its specification, written the plain way --------------------------------

def choose_as_specified(nodes, *, want, min_lsn=0, max_lag_bytes=None, max_lag_seconds=None, rr=0):
    """choose() as first written (list by list); the one-pass version must agree with it."""
    claimants = [n for n in nodes if n.usable and n.role == "primary"]
    primary_ = max(claimants, key=lambda n: (n.timeline, n.lsn)) if claimants else None
    if want == "primary":
        return (primary_, "primary") if primary_ is not None else (None, "no primary")
    replicas = [n for n in nodes if n.usable and n.role == "replica"]
    fresh = [n for n in replicas if policy.read_exclusion(n, primary_, max_lag_bytes, max_lag_seconds) is None]
    caught_up = [n for n in fresh if n.lsn >= min_lsn]

    def least(candidates):
        best = min(policy._score(n) for n in candidates)
        tied = sorted((n for n in candidates if policy._score(n) == best), key=lambda n: n.name)
        return tied[rr % len(tied)]

    if want == "any-read":
        pool = caught_up + ([primary_] if primary_ is not None else [])
        return (least(pool), "any-read") if pool else (None, "no node up")
    if caught_up:
        return least(caught_up), "replica"
    why = "no replica up" if not replicas else "replicas lagging" if not fresh else "no replica caught up to the client's last write"
    return (None, f"{why} and no primary") if primary_ is None else (primary_, why)


node_states = st.builds(
    NodeState,
    name=st.sampled_from(["a:1", "b:1", "c:1", "d:1"]),
    role=st.sampled_from(["primary", "replica", "unknown"]),
    up=st.booleans(),
    lsn=st.integers(0, 5),
    timeline=st.integers(0, 3),
    lag_bytes=st.none() | st.integers(0, 5),
    lag_seconds=st.none() | st.floats(0, 5),
    weight=st.sampled_from([1.0, 2.0, 0.0]),
    outstanding=st.integers(0, 3),
    fenced=st.booleans(),
    upstream=st.none() | st.booleans(),
)


@settings(max_examples=500)
@given(
    st.lists(node_states, max_size=5),
    st.sampled_from(["primary", "replica", "any-read"]),
    st.integers(0, 6),
    st.none() | st.integers(0, 5),
    st.none() | st.floats(0, 5),
    st.integers(0, 7),
)
def test_choose_agrees_with_its_plain_specification(nodes, want, min_lsn, lag_bytes, lag_seconds, rr):
    kw = dict(want=want, min_lsn=min_lsn, max_lag_bytes=lag_bytes, max_lag_seconds=lag_seconds, rr=rr)
    assert choose(nodes, **kw) == choose_as_specified(nodes, **kw)
