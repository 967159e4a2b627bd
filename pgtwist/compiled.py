"""The compiled core: which modules mypyc compiles, and whether the compiled form is the source's.

The per-transaction path (framing, the client session, its placement, the pool, the relay, the
server connection, the counters) runs about 30 % fewer instructions compiled by mypyc than
interpreted (bench/instructions.sh; docs/BENCHMARKS.md). The same source is the pure-Python
form, and it is what runs whenever the compiled one is not this source's:

- setup.py builds the extension modules beside their .py files (`./dev` builds them in place,
  `pip install .` into the wheel) and, once the build has succeeded, writes SOURCE_HASH_FILE
  beside them: the hash of the sources it compiled (HASHED). It removes that file first, so a
  build that fails or is cut short leaves none;
- importing pgtwist compares that hash with the sources there now. A tree edited since its build,
  a missing extension, no hash, or PGTWIST_PURE=1 makes every pgtwist module load from its .py
  file (all or none: compiled modules call each other's classes directly, and a compiled caller
  would not accept an interpreted module's object).

So an edited tree does not run stale compiled code, and a machine without a C compiler runs the
pure form (setup.py falls back to it). `python -c "import pgtwist.compiled as c; print(c.FORM)"`
tells which form runs.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

# Dotted names, in build order. Each is type-checked loosely (setup.py): mypyc needs the
# attributes a class sets to be declared, not the whole program to be typed.
MODULES = (
    "pgtwist.wire.framing",
    "pgtwist.wire.frontend",
    "pgtwist.session.admission",
    "pgtwist.session.client",
    "pgtwist.session.placement",
    "pgtwist.session.lease",
    "pgtwist.pooling.pool",
    "pgtwist.pooling.relay",
    "pgtwist.backend.connection",
    "pgtwist.admin.counters",
    "pgtwist.transport.sendnow",
    "pgtwist.transport.producers",
)
# mypyc's shared library of the group, pgtwist/_core__mypyc: inside the package, so that a copy of
# the package (bench/run.py freezes one) carries it, and no other build's can stand in for it.
GROUP = "pgtwist._core"
# What the compiled code was made from: the modules, and the modules whose Final constants mypyc
# wrote into it (a test checks that no other pgtwist module declares a Final).
HASHED = MODULES + ("pgtwist.wire.protocol", "pgtwist.session.states", "pgtwist.backend.states")
SOURCE_HASH_FILE = "compiled.sha256"  # beside this file, written by setup.py
PURE_ENV = "PGTWIST_PURE"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def source_path(name: str, root: str) -> str:
    """*name*'s .py file under *root* (the directory that holds the pgtwist package)."""
    return os.path.join(root, *name.split(".")) + ".py"


def source_hash(root: str) -> str:
    """The hash of the sources the compiled core is made from (HASHED) under *root*."""
    digest = hashlib.sha256()
    for name in HASHED:
        with open(source_path(name, root), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()


def pure_requested() -> bool:
    """PGTWIST_PURE set (to anything but 0): neither build nor load the extensions."""
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def _built_hash() -> str | None:
    try:
        with open(os.path.join(_PACKAGE_DIR, SOURCE_HASH_FILE)) as f:
            return f.read().strip()
    except OSError:
        return None


def _has_extension(name: str) -> bool:
    base = source_path(name, os.path.dirname(_PACKAGE_DIR))[: -len(".py")]
    return any(os.path.exists(base + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Loads pgtwist's modules from their .py files, ahead of any extension module beside them
    (one an older build left included)."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("pgtwist."):
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path or ():
            source = os.path.join(entry, leaf + ".py")
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def _choose() -> str:
    """'compiled', 'pure' (PGTWIST_PURE=1, or not all built), or 'stale' (built from other sources, or
    a build that did not finish): the last two load the .py files."""
    if pure_requested():
        form = "pure"
    elif not all(_has_extension(name) for name in (GROUP + "__mypyc", *MODULES)):
        form = "pure"
    elif _built_hash() != source_hash(os.path.dirname(_PACKAGE_DIR)):
        form = "stale"
    else:
        return "compiled"
    if not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())
    return form


FORM = _choose()
