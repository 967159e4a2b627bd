"""Where the compiled core still goes through Python's API: generic attribute and method operations per function.

mypyc compiles a call or attribute access natively only when it knows the object's class: on an
untyped parameter or field (Any), or on an object of a class it does not compile (Twisted's, the
routing policy's), it emits a Python-level lookup that costs several times a native call or slot
read. This lists them per compiled function, from the IR that mypyc writes beside the build
(build/ops.txt, made by `./dev setup` or `python setup.py build_ext --inplace`), as
LINE:OPERATION:NAME. A union with a compiled class (`Lease | None`) is listed too, though mypyc
tries the native access first.

usage: python bench/generic_ops.py [FUNCTION ...]   e.g. ClientSession._ready Pool.hand_over
       (no FUNCTION: every compiled function that has any, most first)

Which of them run per transaction is callgrind's to say: `bench/instructions.sh --keep DIR`, then
`callgrind_annotate --tree=caller DIR/pgtwist.60.callgrind` and look for the callers of
PyObject_GetAttr and PyObject_VectorcallMethod.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

IR = Path(__file__).resolve().parents[1] / "build" / "ops.txt"
_GENERIC = re.compile(r"(CPyObject_GetAttr|PyObject_SetAttr|PyObject_VectorcallMethod|PyObject_Vectorcall)\((\w+), (\w+)")
_STRING = re.compile(r"\s+(r\d+) = '(.*)'$")
_LINE = re.compile(r"error at \w+:(\d+)")
_SHORT = {"CPyObject_GetAttr": "get", "PyObject_SetAttr": "set", "PyObject_VectorcallMethod": "call", "PyObject_Vectorcall": "call()"}


def generic_ops(function_ir: list[str]) -> list[str]:
    names: dict[str, str] = {}
    found = []
    for i, line in enumerate(function_ir):
        m = _STRING.match(line)
        if m:
            names[m.group(1)] = m.group(2)
            continue
        m = _GENERIC.search(line)
        if m is None:
            continue
        op, first, second = m.groups()
        where = next((lm.group(1) for lm in map(_LINE.search, function_ir[i : i + 4]) if lm), "?")
        name = names.get(first if op == "PyObject_VectorcallMethod" else second, "")
        found.append(f"{where}:{_SHORT[op]}:{name}")
    return found


def main(wanted: list[str]) -> int:
    if not IR.exists():
        print(f"{IR} is missing: build the compiled core first (./dev setup)", file=sys.stderr)
        return 1
    rows = []
    for block in IR.read_text().split("\ndef ")[1:]:
        function = block.split("(", 1)[0]
        if wanted and function not in wanted:
            continue
        ops = generic_ops(block.splitlines())
        if ops or wanted:
            rows.append((len(ops), function, ops))
    for count, function, ops in sorted(rows, key=lambda r: -r[0]):
        print(f"{function} ({count}): {'  '.join(ops)}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # (piped into head: stop quietly)
    sys.exit(main(sys.argv[1:]))
