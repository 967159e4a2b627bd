#!/usr/bin/env python3
"""Failure drills under load: a replica killed, the primary frozen, the primary killed and a replica promoted.

By name also: a replica frozen (replica-freeze), a replica's replay paused (replica-lag), the primary
stopped and started again (primary-restart: pg_ctl stop -m fast; primary-crash: -m immediate, so it
starts with crash recovery), each for --freeze seconds.
And switchover: the primary stopped cleanly and a replica promoted by the operator (pg_ctl promote),
the other replica following it; like kill-promote it changes the roles, so it goes last.
Each drill assumes the roles the cluster started with: kill-promote changes them, so it goes last.

    PYTHONPATH=. python bench/drills.py [--sessions 32] [--drill replica-kill --drill freeze --drill kill-promote]
                                        [--settle 3] [--phase 10] [--freeze 10] [--stale-after 3] [--json FILE]
                                        [--set workers=2 --set pool_size=4 ...]

One throwaway cluster (a primary and two streaming replicas, pgtwist.tools.localcluster), one pgtwist
in front of it (transaction pooling, auto_promote on), and --sessions client sessions (psycopg,
one thread each) mixing reads and writes through it. Each drill: --settle seconds of load, the
event, then --phase seconds of load. Reported per drill, as an operator would judge it:

- sessions kept: sessions whose connection never broke (a broken one reconnects and counts as lost);
- errors by SQLSTATE;
- write unavailability: the longest gap between two acknowledged writes from the event to the end
  of the phase, and when (after the event) writes came back at the end of it;
- read-your-writes misses: a session's read that did not see that session's own last acknowledged
  write (0 expected);
- stale reads: a read that missed a write acknowledged to any session more than --stale-after
  seconds before the read began (0 expected: a replica left behind, or lagging past the limits,
  must not serve reads);
- lost acknowledged writes (kill-promote): commits acknowledged before the promotion (by the old primary) and missing on the
  promoted node. With asynchronous replication (this cluster's synchronous_commit = off) a few are
  PostgreSQL's contract, not pgtwist's: the README says what is guaranteed.

Writes lost that way are left out of the read checks (no read can see them). Not part of the test
suite; the integration tests in tests/integration/test_failure_drills.py are the bounded versions.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from pgtwist.tools.localcluster import LocalCluster  # noqa: E402

from tests.harness.load import ClientThreads  # noqa: E402
from tests.harness.proxy import DATABASE, proxy_config, start_proxy, wait_for, write_config  # noqa: E402

DRILLS = ("replica-kill", "freeze", "kill-promote")
# Not in the default run (drill them by name): a replica hung, a replica falling behind, and the
# primary restarted (pg_ctl restart: fast, as for a configuration change or a minor upgrade; or
# after a crash, immediate, with crash recovery) and back as the primary, with no promotion.
MORE_DRILLS = ("replica-freeze", "replica-lag", "primary-restart", "primary-crash", "switchover")
# Drills after which the cluster's roles are not what it started with: the last of a run.
LAST_DRILLS = ("kill-promote", "switchover")

PROXY_SETTINGS = {
    "pool_mode": "transaction",
    "pool_size": 16,
    "query_wait_timeout": 30,
    "health_check_interval": 0.5,
    "health_check_timeout": 1.0,
    "query_timeout": 5.0,
    "failover_wait": 10.0,
    "failover_timeout": 2.0,
    "auto_promote": False,  # on (SIGHUP) for kill-promote only: a frozen primary must not be replaced
    "max_replica_delay": 1.0,
    "tcp_keepidle": 5,
    "tcp_keepintvl": 1,
    "tcp_keepcnt": 3,
}

SETUP_SQL = """
CREATE TABLE drill (id bigserial PRIMARY KEY, session int NOT NULL, seq int NOT NULL, at timestamptz DEFAULT now());
CREATE INDEX ON drill (session, seq);
"""
WRITE_SQL = "INSERT INTO drill (session, seq) VALUES (%s, %s) RETURNING id, inet_server_port()"
READ_SQL = "SELECT inet_server_port(), (SELECT max(seq) FROM drill WHERE session = %s), (SELECT max(id) FROM drill)"


@dataclass
class Write:
    session: int
    seq: int
    id: int
    acked: float


@dataclass
class Read:
    session: int
    started: float
    own_seq: int | None
    max_id: int | None
    port: int
    own_acked_seq: int  # the session's last acknowledged seq when the read began


@dataclass
class Session:
    n: int
    writes: list[Write] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    breaks: list[float] = field(default_factory=list)


class Load(ClientThreads):
    """--sessions client threads: each reads (its own rows and the table's newest id) or writes, ~1 in 3 a write."""

    join_timeout = 30.0
    fail_if_stuck = False

    def __init__(self, px, sessions: int, write_share: float = 0.35, pause: float = 0.01):
        super().__init__(sessions)
        self.px = px
        self.sessions = [Session(i) for i in range(sessions)]
        self.write_share = write_share
        self.pause = pause

    def run_client(self, i: int) -> None:
        s = self.sessions[i]
        rng = random.Random(s.n)
        seq = 0
        acked_seq = 0
        conn = None
        while not self.stop.is_set():
            if conn is None or conn.closed or conn.broken:
                if conn is not None:
                    s.breaks.append(time.monotonic())
                    conn.close()
                try:
                    conn = self.px.connect(connect_timeout=10)
                except psycopg.Error as e:
                    s.errors.append((time.monotonic(), e.sqlstate or type(e).__name__))
                    conn = None
                    time.sleep(0.2)
                    continue
            try:
                if rng.random() < self.write_share:
                    seq += 1
                    row_id, _port = conn.execute(WRITE_SQL, (s.n, seq)).fetchone()
                    s.writes.append(Write(s.n, seq, row_id, time.monotonic()))
                    acked_seq = seq
                else:
                    started = time.monotonic()
                    port, own, max_id = conn.execute(READ_SQL, (s.n,)).fetchone()
                    s.reads.append(Read(s.n, started, own, max_id, port, acked_seq))
            except psycopg.Error as e:
                s.errors.append((time.monotonic(), e.sqlstate or type(e).__name__))
                if not conn.broken and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.rollback()
                time.sleep(0.05)
            time.sleep(self.pause)
        if conn is not None:
            conn.close()



def summarize(name: str, load: Load, event: float, end: float, lost: set[tuple[int, int]], stale_after: float, ports: dict) -> dict:
    """The figures of one drill, from the outcomes between *event* and *end*; *lost*: (session, seq) of lost writes."""
    sessions = load.sessions
    errors = collections.Counter(code for s in sessions for t, code in s.errors if t >= event and t <= end)
    writes = sorted((w for s in sessions for w in s.writes if (w.session, w.seq) not in lost), key=lambda w: w.acked)
    after = [w.acked for w in writes if event <= w.acked <= end]
    phase_acks = [event] + after + [end]
    longest_gap, back = max((b - a, b) for a, b in zip(phase_acks, phase_acks[1:]))
    writes_back = None if back >= end else back - event
    # Read-your-writes: a session's own last acknowledged write (not lost) must be visible to it.
    ryw_misses = 0
    ryw_ports: collections.Counter = collections.Counter()
    ryw_when: list[float] = []  # (seconds after the event)
    for s in sessions:
        lost_seqs = {seq for session, seq in lost if session == s.n}
        for r in s.reads:
            if not event <= r.started <= end or r.own_acked_seq == 0 or r.own_acked_seq in lost_seqs:
                continue
            if (r.own_seq or 0) < r.own_acked_seq:
                ryw_misses += 1
                ryw_ports[ports.get(r.port, r.port)] += 1
                ryw_when.append(round(r.started - event, 2))
    # Stale: a read missing a write acknowledged to anyone more than stale_after before it began.
    acked_ids = [(w.acked, w.id) for w in writes]
    stale = 0
    stale_ports: collections.Counter = collections.Counter()
    running_max, i = 0, 0
    reads = sorted((r for s in sessions for r in s.reads if event <= r.started <= end), key=lambda r: r.started)
    for r in reads:
        while i < len(acked_ids) and acked_ids[i][0] <= r.started - stale_after:
            running_max = max(running_max, acked_ids[i][1])
            i += 1
        if (r.max_id or 0) < running_max:
            stale += 1
            stale_ports[ports.get(r.port, r.port)] += 1
    kept = sum(1 for s in sessions if not any(event <= t <= end for t in s.breaks))
    return {
        "drill": name,
        "sessions": len(sessions),
        "sessions_kept": kept,
        "reads": len(reads),
        "writes": len(after),
        "errors": dict(sorted(errors.items())),
        "write_unavailable_s": round(longest_gap, 2),
        "writes_back_after_s": None if writes_back is None else round(writes_back, 2),
        "ryw_misses": ryw_misses,
        "ryw_misses_by_node": dict(ryw_ports),
        "ryw_misses_after_s": [min(ryw_when), max(ryw_when)] if ryw_when else None,
        "stale_reads": stale,
        "stale_reads_by_node": dict(stale_ports),
        "lost_acknowledged_writes": len(lost),
    }


def set_auto_promote(px, cluster, nodes: list[str], on: bool, base: dict) -> None:
    """Rewrite the proxy's config (*base*) with auto_promote on/off and reload it (SIGHUP), as an operator would."""
    import signal

    settings = {**base, "auto_promote": on}
    databases = {DATABASE: {"dbname": cluster.app_database, "nodes": nodes}}
    write_config(px.config_path, *proxy_config(cluster, px.port, {**settings, "databases": databases}))
    mark = px.log_size()
    px.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload:" in px.log_text(mark), 10, "the reload")


def for_a_while(begin, end, args) -> None:
    """*begin*(), --freeze seconds of load, *end*() whatever happens, then the rest of --phase."""
    begin()
    try:
        time.sleep(args.freeze)
    finally:
        end()
    time.sleep(max(0.0, args.phase - args.freeze))


def lost_on(cluster, node, load: Load, before: float) -> set[tuple[int, int]]:
    """The writes acknowledged before *before* that *node* does not hold, by (session, seq), not
    id: a sequence's WAL can be lost with the rows and its ids issued again."""
    acked = {(w.session, w.seq) for s in load.sessions for w in s.writes if w.acked < before}
    kept = cluster.psql(node, "SELECT string_agg(session || ':' || seq, ',') FROM drill", user=cluster.app_user, dbname=cluster.app_database)
    return acked - {tuple(int(v) for v in x.split(":")) for x in kept.split(",") if x}


def role_of(cluster, node) -> str | None:
    try:
        return "replica" if cluster.psql(node, "SELECT pg_is_in_recovery()") == "t" else "primary"
    except Exception:  # noqa: BLE001 - a stopped node
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument(
        "--drill", action="append", choices=DRILLS + MORE_DRILLS,
        help=f"repeatable; default: {', '.join(DRILLS)}, in this order ({', '.join(MORE_DRILLS)} by name)",
    )
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of load before each event")
    ap.add_argument("--phase", type=float, default=10.0, help="seconds of load after each event")
    ap.add_argument("--freeze", type=float, default=10.0, help="how long the primary stays SIGSTOPped (a replica, a primary stopped)")
    ap.add_argument("--stale-after", type=float, default=3.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp"))
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a pgtwist setting over the drills' own (repeatable; TOML value): workers=2, pool_size=4, pool_mode='\"session\"'",
    )
    args = ap.parse_args(argv)
    settings = dict(PROXY_SETTINGS)
    for item in args.set:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key or key in ("databases", "users"):
            ap.error(f"--set {item!r}: KEY=VALUE of a top-level setting (databases and users are the drills' own)")
        try:
            settings[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as e:
            ap.error(f"--set {item!r}: the value is not TOML ({e}); strings need quotes: pool_mode='\"session\"'")
    drills = args.drill or list(DRILLS)
    if any(name in LAST_DRILLS for name in drills[:-1]):
        ap.error(f"{' and '.join(LAST_DRILLS)} change the cluster's roles: either must be the last drill")
    results = []
    with LocalCluster.create(replicas=2) as cluster:
        primary, r1, r2 = cluster.nodes
        ports = {n.port: n.name for n in cluster.nodes}
        cluster.psql(primary, SETUP_SQL, user=cluster.app_user, dbname=cluster.app_database)
        for node in cluster.nodes:
            # PostgreSQL's default, which the throwaway cluster turns off for speed: a commit is
            # acknowledged once its WAL is on the primary's disk, so the replicas can have it.
            # Off, a commit acknowledged just before a freeze or a crash never left the primary
            # (a "stale read" on every replica for as long as it is frozen, a "lost" write).
            cluster.psql(node, "ALTER SYSTEM SET synchronous_commit = on")
            cluster.psql(node, "SELECT pg_reload_conf()")
        cluster.psql(primary, f"GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO {cluster.app_user};")
        cluster.wait_replicas_caught_up(30)
        work = Path(args.work) / f"pgtwist-drills-{int(time.time())}"
        nodes = [n.addr for n in cluster.nodes]
        with start_proxy(
            cluster, work, databases={DATABASE: {"dbname": cluster.app_database, "nodes": nodes}}, **settings
        ) as px:
            for name in drills:
                print(f"drill {name}: {args.sessions} sessions, {args.settle:g}s settle, {args.phase:g}s phase", flush=True)
                lost: set[tuple[int, int]] = set()
                if name == "kill-promote":
                    set_auto_promote(px, cluster, nodes, True, settings)
                with Load(px, args.sessions) as load:
                    time.sleep(args.settle)
                    event = time.monotonic()
                    if name == "replica-kill":
                        cluster.stop(r2, mode="immediate")
                        time.sleep(args.phase)
                    elif name == "replica-freeze":
                        for_a_while(lambda: cluster.freeze(r2), lambda: cluster.thaw(r2), args)
                    elif name == "replica-lag":
                        # Replay stops (WAL still arrives): r2 falls further behind every second.
                        for_a_while(
                            lambda: cluster.psql(r2, "SELECT pg_wal_replay_pause()"),
                            lambda: cluster.psql(r2, "SELECT pg_wal_replay_resume()"),
                            args,
                        )
                    elif name in ("primary-restart", "primary-crash"):
                        mode = "fast" if name == "primary-restart" else "immediate"
                        stopped: list[float] = []

                        def stop(m=mode, stopped=stopped):
                            cluster.stop(primary, mode=m)
                            stopped.append(time.monotonic())  # (dead by now: writes acknowledged until here)

                        def start(stopped=stopped, event=event):
                            cluster.start(primary)
                            print(f"  {primary.name} stopped after {stopped[0] - event:.2f}s, back (pg_ctl start returned) after {time.monotonic() - event:.2f}s", flush=True)

                        for_a_while(stop, start, args)
                    elif name == "switchover":
                        # Planned, by an operator and not by pgtwist (auto_promote stays off): the
                        # primary stopped cleanly (every acknowledged write reaches the replicas
                        # first), a replica promoted with pg_ctl, the other pointed at it.
                        cluster.stop(primary, mode="fast")
                        stopped_at = time.monotonic()
                        cluster.promote(r1)
                        print(f"  {r1.name} promoted after {time.monotonic() - event:.2f}s", flush=True)
                        cluster.follow(r2, r1)
                        time.sleep(args.phase)
                    elif name == "freeze":
                        for_a_while(lambda: cluster.freeze(primary), lambda: cluster.thaw(primary), args)
                    else:
                        cluster.stop(primary, mode="immediate")
                        promoted = wait_for(
                            lambda: next((n for n in (r1, r2) if role_of(cluster, n) == "primary"), None),
                            30, "auto_promote to promote a replica",
                        )
                        promoted_at = time.monotonic()
                        other = r2 if promoted is r1 else r1
                        print(f"  pgtwist promoted {promoted.name} after {time.monotonic() - event:.1f}s", flush=True)
                        time.sleep(args.phase / 2)
                        cluster.follow(other, promoted)  # the one left behind follows the new primary
                        time.sleep(args.phase / 2)
                    end = time.monotonic()
                if name == "primary-crash":
                    # With synchronous_commit = on (set above) nothing acknowledged may be missing
                    # after crash recovery; counted as lost if it is, as for kill-promote.
                    lost = lost_on(cluster, primary, load, stopped[0])
                if name == "switchover":
                    # A fast shutdown sends the replicas every WAL record before it ends: nothing
                    # acknowledged by the old primary may be missing on the new one.
                    lost = lost_on(cluster, r1, load, stopped_at)
                if name == "kill-promote":
                    # Acknowledged by the old primary: up to its death, which comes some time after the
                    # event (pg_ctl stop takes a while), so anything acknowledged before the promotion
                    # was seen (what the new primary acknowledged is on it, never "lost").
                    lost = lost_on(cluster, promoted, load, promoted_at)
                result = summarize(name, load, event, end, lost, args.stale_after, ports)
                results.append(result)
                print("  " + json.dumps(result), flush=True)
                if name == "replica-kill":
                    cluster.start(r2)
                    time.sleep(2.0)
    print()
    print("| drill | sessions kept | errors by SQLSTATE | writes unavailable | writes back after | reads | writes | RYW misses | stale reads | lost acked writes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
        back = "never" if r["writes_back_after_s"] is None else f"{r['writes_back_after_s']:.2f} s"
        print(
            f"| {r['drill']} | {r['sessions_kept']}/{r['sessions']} | {errors} | {r['write_unavailable_s']:.2f} s | {back}"
            f" | {r['reads']} | {r['writes']} | {r['ryw_misses']} | {r['stale_reads']} | {r['lost_acknowledged_writes']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["ryw_misses"] == 0 and r["stale_reads"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
