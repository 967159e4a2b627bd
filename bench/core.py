"""The session core's own cost per transaction, in memory: no sockets, no reactor, no kernel.

A transaction-pooling client keeping its server connection (tests/harness: the real Proxy on
StringTransports) sends SELECT 1 and gets its answer, N times; the figure is the best of R
timings of the process's CPU per transaction. Run it once as it is and once with PGTWIST_PURE=1
to see what the compiled core (pgtwist/compiled.py) does to the code it compiles:

    PYTHONPATH=. .venv/bin/python bench/core.py
    PGTWIST_PURE=1 PYTHONPATH=. .venv/bin/python bench/core.py
"""

import argparse
import time

from pgtwist import compiled
from pgtwist.wire import messages as m

from tests.harness.session import RESULT, Z_IDLE, Harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=5000, help="transactions per timing (default 5000)")
    parser.add_argument("-r", type=int, default=30, help="timings, the best reported (default 30)")
    args = parser.parse_args()
    session, client, server = Harness(pool_mode="transaction").lent()
    query, answer, node = m.query("SELECT 1"), RESULT + Z_IDLE, server.transport

    def run(n: int) -> None:
        for _ in range(n):
            session.got_data(query)
            server.got_data(answer)
        client.clear()
        node.clear()

    run(1000)
    best = min(_timed(run, args.n) for _ in range(args.r))
    print(f"{compiled.FORM}: {best * 1e6:.2f} us of CPU per transaction (best of {args.r} x {args.n}, in memory)")


def _timed(run, n: int) -> float:
    started = time.process_time()
    run(n)
    return (time.process_time() - started) / n


if __name__ == "__main__":
    main()
