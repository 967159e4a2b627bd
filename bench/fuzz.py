"""The long fuzz drill: a million hostile frames at a live pgtwist in front of a primary + replica.

Not run by the test suite (tests/integration/test_fuzz.py is its bounded sibling, with the same
frame generators and judge: tests/harness/fuzzing.py). Several fuzzing clients send batches
of valid, mutated, random-type, bad-length and truncated frames, each batch judged by its answer;
a healthy client beside them must keep its right answers. It checks, and exits 1 unless all hold:
pgtwist never dies, never sends XX000 nor logs a traceback, no node changes health (SHOW NODES,
"marked down"/"is down" in the log), and its RSS stays bounded (growth after warm-up).

    PYTHONPATH=. python bench/fuzz.py                         # 1,000,000 frames, transaction mode
    PYTHONPATH=. python bench/fuzz.py --frames 50000 --pool-mode session --clients 2
    PYTHONPATH=. python bench/fuzz.py --frames 200000 --workers 2    # RSS is the process tree's
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pgtwist.tools.localcluster import LocalCluster  # noqa: E402

from tests.harness import fuzzing  # noqa: E402
from tests.harness.ops import ADMIN, ADMIN_PASSWORD, admin_show, nodes_up, pools_at_rest, show_nodes, start_ops_proxy  # noqa: E402
from tests.harness.proxy import wait_for  # noqa: E402

TABLE = "fuzz_healthy"
MAX_MESSAGE = 1 << 20


def say(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=1_000_000, help="frames to send in all (default 1,000,000)")
    ap.add_argument("--clients", type=int, default=4, help="fuzzing clients at once (default 4)")
    ap.add_argument("--pool-mode", choices=("session", "transaction"), default="transaction")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: chosen and printed)")
    ap.add_argument("--warmup", type=float, default=0.1, help="share of frames before the RSS baseline (default 0.1)")
    ap.add_argument("--rss-growth-mib", type=float, default=64, help="allowed RSS growth after warm-up (default 64 MiB)")
    ap.add_argument("--workers", type=int, default=1, help="pgtwist's workers = N (default 1); a worker that dies fails the drill")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (pgtwist's config and log)")
    return ap.parse_args(argv)


def tree_rss_kib(pid: int) -> int:
    """VmRSS of *pid* and its descendants (workers = N: the supervisor and its workers), in KiB."""
    from tests.harness.proxy import rss_kib

    total, todo = 0, [pid]
    while todo:
        pid = todo.pop()
        try:
            total += rss_kib(pid)
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, AssertionError):
            continue  # (gone meanwhile)
    return total


def fuzz_worker(host, port, user, password, rng, budget, counter, lock, out: list, stop: threading.Event) -> None:
    client = fuzzing.FuzzClient(host, port, user, password)
    chooser = fuzzing.RandomChooser(rng)
    try:
        while not stop.is_set():
            with lock:
                if counter[0] >= budget:
                    break
            frames, truncated = fuzzing.batch(chooser, MAX_MESSAGE)
            try:
                client.send(frames, truncated)
            except Exception as e:  # noqa: BLE001 (a login refused, a reset: the finding is in the verdicts)
                client.verdicts.violations.append((f"{type(e).__name__}: {e}", [f[:80] for f in frames]))
                client.close()
            with lock:
                counter[0] += len(frames)
            if len(client.verdicts.violations) > 20:
                break
    finally:
        client.close()
        out.append(client.verdicts)


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    say(f"fuzz: {args.frames:,} frames, {args.clients} clients, {args.pool_mode} mode, seed {seed}")
    work = Path(tempfile.mkdtemp(prefix="pgtwist-fuzz-"))
    problems: list[str] = []
    with LocalCluster.create(replicas=1) as cluster:
        cluster.psql(
            cluster.nodes[0],
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id serial PRIMARY KEY, v int); CREATE SEQUENCE IF NOT EXISTS fuzz_seq;",
            user=cluster.app_user,
            dbname=cluster.app_database,
        )
        cluster.wait_replicas_caught_up(30)
        with start_ops_proxy(
            cluster,
            work,
            {"admin": {"users": [ADMIN]}},
            check_log=False,
            auth_type="trust",
            pool_mode=args.pool_mode,
            pool_size=max(8, 2 * args.clients),
            query_wait_timeout=20,
            max_message_size=MAX_MESSAGE,
            health_check_interval=0.5,
            workers=args.workers,
            databases={"appdb": {"dbname": cluster.app_database, "nodes": [n.addr for n in cluster.nodes]}},
            users={cluster.app_user: {"password": cluster.app_password}, ADMIN: {"password": ADMIN_PASSWORD}},
        ) as px:
            nodes_before = nodes_up(px)
            healthy = fuzzing.HealthyClient(lambda: px.connect(autocommit=True), TABLE)
            healthy.start()
            counter, lock, stop, verdicts = [0], threading.Lock(), threading.Event(), []
            workers = [
                threading.Thread(
                    target=fuzz_worker,
                    args=(px.host, px.port, px.user, px.password, random.Random(seed + i), args.frames, counter, lock, verdicts, stop),
                    daemon=True,
                )
                for i in range(args.clients)
            ]
            started = time.monotonic()
            for w in workers:
                w.start()
            baseline = None
            peak = 0
            rss_start = tree_rss_kib(px.pid)
            while any(w.is_alive() for w in workers):
                time.sleep(5)
                if not px.alive():
                    problems.append("pgtwist died")
                    stop.set()
                    break
                rss = tree_rss_kib(px.pid)
                peak = max(peak, rss)
                done = counter[0]
                if baseline is None and done >= args.warmup * args.frames:
                    baseline = rss
                rate = done / max(1e-9, time.monotonic() - started)
                say(f"{done:,} frames ({rate:,.0f}/s), RSS {rss / 1024:.1f} MiB, healthy checks {healthy.checks}")
            for w in workers:
                w.join(30)
            healthy.finish()
            elapsed = time.monotonic() - started
            final_rss = tree_rss_kib(px.pid) if px.alive() else 0
            total = fuzzing.Verdicts()
            for v in verdicts:
                for name in ("batches", "frames", "answered", "closed", "vanished", "logins"):
                    setattr(total, name, getattr(total, name) + getattr(v, name))
                total.errors.update(v.errors)
                total.violations += v.violations
            say(total.summary(), f"; healthy client: {healthy.checks} checks")
            say(f"{elapsed:.0f} s; RSS start {rss_start / 1024:.1f} MiB, after warm-up {(baseline or 0) / 1024:.1f}, "
                f"peak {peak / 1024:.1f}, end {final_rss / 1024:.1f} MiB")
            for what, frames in total.violations[:10]:
                problems.append(f"violation: {what} after {frames!r}")
            if healthy.failures:
                problems.append(f"the healthy client failed: {healthy.failures[:5]}")
            if baseline is not None and peak - baseline > args.rss_growth_mib * 1024:
                problems.append(f"RSS grew {(peak - baseline) / 1024:.1f} MiB after warm-up (limit {args.rss_growth_mib})")
            if px.alive():
                if {name: row["up"] for name, row in show_nodes(px).items()} != nodes_before:
                    problems.append(f"node health changed: {show_nodes(px)}")
            if px.alive():
                try:
                    wait_for(lambda: pools_at_rest(px), 10, "every pool at rest")
                except Exception:  # noqa: BLE001
                    problems.append(
                        f"server connections left busy after every client left: {admin_show(px, 'POOLS')}"
                        f"\nclients: {admin_show(px, 'CLIENTS')}\nservers: {admin_show(px, 'SERVERS')}"
                    )
            text = px.log_text()
            for bad in ("marked down", "is down", "XX000", "internal error", "Traceback", "Unhandled Error", "; restarting it in"):
                if bad in text:
                    at = text.find(bad)
                    problems.append(f"{bad!r} in pgtwist's log: ...{text[max(0, at - 300) : at + 300]}...")
            if args.keep or problems:
                say(f"work directory kept: {work} (pgtwist's log: {px.log_path})")
    for problem in problems:
        say("FAIL:", problem)
    say("PASS" if not problems else f"FAIL ({len(problems)} problems), seed {seed}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
