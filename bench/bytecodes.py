"""Bytecodes (and calls) per Python function of a pgtwist process: where its instructions go.

callgrind (bench/instructions.sh) counts a run's instructions but sees CPython's C functions
only: more than half is the bytecode loop itself, whatever Python function it runs. This
counts, per Python function, the bytecodes executed and the calls made, with sys.settrace and
f_trace_opcodes (exact, not sampled; the process runs some 50 times slower). Two runs of
different lengths, subtracted and divided by the units between them, give a unit's figures
with start-up and logins cancelled out, as instructions.sh does.

    python bench/bytecodes.py report FIRST.ops SECOND.ops UNITS [TOP]

`install(path)` (called by instructions.sh --bytecodes in the pooler's process) starts
counting and writes the counts to *path* at exit.
"""

from __future__ import annotations

import atexit
import pickle
import sys


def install(path: str) -> None:
    ops: dict = {}
    calls: dict = {}

    def local(frame, event, arg):
        if event == "opcode":
            code = frame.f_code
            ops[code] = ops.get(code, 0) + 1
        return local

    def called(frame, event, arg):
        code = frame.f_code
        calls[code] = calls.get(code, 0) + 1
        frame.f_trace_opcodes = True
        return local

    def dump() -> None:
        sys.settrace(None)
        out: dict = {}
        for counts, kind in ((ops, "ops"), (calls, "calls")):
            for code, n in counts.items():
                key = (kind, f"{_short(code.co_filename)}:{code.co_firstlineno}({code.co_name})")
                out[key] = out.get(key, 0) + n
        with open(path, "wb") as f:
            pickle.dump(out, f)

    sys.settrace(called)
    atexit.register(dump)


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/pgtwist/"):
        at = filename.rfind(marker)
        if at >= 0:
            return ("pgtwist/" if marker == "/pgtwist/" else "") + filename[at + len(marker):]
    return filename


def report(first: str, second: str, units: float, top: int = 40) -> str:
    with open(first, "rb") as f:
        a = pickle.load(f)
    with open(second, "rb") as f:
        b = pickle.load(f)
    per = {key: (b.get(key, 0) - a.get(key, 0)) / units for key in set(a) | set(b)}
    ops = sorted(((n, name) for (kind, name), n in per.items() if kind == "ops"), reverse=True)
    calls = {name: n for (kind, name), n in per.items() if kind == "calls"}
    lines = [
        f"bytecodes per unit: {sum(n for n, _ in ops):,.0f}; Python calls per unit: {sum(calls.values()):,.1f}",
        f"{'bytecodes':>10} {'calls':>6}  function",
    ]
    lines += [f"{n:10.1f} {calls.get(name, 0):6.2f}  {name}" for n, name in ops[:top] if n >= 0.5]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] != "report":
        sys.exit(__doc__)
    print(report(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 40))
