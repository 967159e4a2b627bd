"""Micro-benchmark of the SQL analysis on the hot path: per statement, session effects (every
Query/Parse) and routing classification (every placement), for pgbench's and drivers' texts.

    python bench/sql_analysis.py

CPU time (thread_time), best of 9, so that a busy shared machine's descheduling does not count.
"""

import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgtwist.routing import analysis  # noqa: E402

REPEATING = {
    "pgbench -S (simple, 2000 aids)": ["SELECT abalance FROM pgbench_accounts WHERE aid = %d;" % i for i in range(1, 2001)],
    "pgbench UPDATE (simple)": ["UPDATE pgbench_accounts SET abalance = abalance + %d WHERE aid = %d;" % (i % 5000 - 2500, i) for i in range(1, 2001)],
    "pgbench INSERT (simple)": [
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (%d, 1, %d, %d, CURRENT_TIMESTAMP);" % (i % 10, i, i - 1000)
        for i in range(1, 2001)
    ],
    "pgbench UPDATE (-M extended)": ["UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2;"],
    "BEGIN/END/COMMIT": ["BEGIN;", "END;", "BEGIN", "COMMIT"],
    "psycopg SELECT $1": ["SELECT id, name, created_at FROM users WHERE id = $1 AND tenant_id = $2"],
    "asyncpg introspection": ["SELECT t.oid, t.typelem, t.typname FROM pg_catalog.pg_type AS t WHERE t.oid = any($1::oid[])"],
}
# pgbench's real workload: every aid new (100k rows per scale), so no text repeats.
FRESH = {
    "pgbench UPDATE, every aid new": ["UPDATE pgbench_accounts SET abalance = abalance + %d WHERE aid = %d;" % (i % 5000 - 2500, i) for i in range(100000, 130000)],
    "pgbench -S, every aid new": ["SELECT abalance FROM pgbench_accounts WHERE aid = %d;" % i for i in range(100000, 130000)],
}


def effects(text, body):
    analysis.query_effects(body)


def both(text, body):
    analysis.query_effects(body)
    analysis.classify(text)


def cycling(fn, texts, number=5000):
    bodies = [t.encode() + b"\0" for t in texts]
    k = len(texts)
    i = [0]

    def one():
        j = i[0] = (i[0] + 1) % k
        fn(texts[j], bodies[j])

    for _ in range(3 * k):
        one()
    return min(timeit.repeat(one, number=number, repeat=9, timer=time.thread_time)) / number * 1e6


def once_each(fn, texts, number=1000):
    it = iter([(t, t.encode() + b"\0") for t in texts])

    def one():
        fn(*next(it))

    return min(timeit.repeat(one, number=number, repeat=9, timer=time.thread_time)) / number * 1e6


if __name__ == "__main__":
    print(f"{'us per statement':32}{'effects':>10}{'effects+classify':>18}")
    for label, texts in REPEATING.items():
        print(f"{label:32}{cycling(effects, texts):10.2f}{cycling(both, texts):18.2f}")
    for label, texts in FRESH.items():
        print(f"{label:32}{once_each(effects, texts[:10000]):10.2f}{once_each(both, texts[10000:20000]):18.2f}")
