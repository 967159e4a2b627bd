"""Builds pgtwist: setup.cfg holds the metadata; this adds the compiled core (pgtwist/compiled.py).

mypyc compiles the modules pgtwist.compiled.MODULES names into extension modules beside their
.py files. Without mypyc or a C compiler, or with PGTWIST_PURE=1, the build is the pure-Python
form, which runs the same code. `python setup.py build_ext --inplace` builds them in the source
tree (what `./dev` does).
"""

import importlib.util
import os
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _compiled_spec():
    # pgtwist/compiled.py by path: importing the pgtwist package would choose a form already.
    spec = importlib.util.spec_from_file_location("_pgtwist_compiled", os.path.join(HERE, "pgtwist", "compiled.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Loose checking for mypyc: a type error stops mypyc, and the pure form runs these modules
# unchecked today (pyproject.toml's [tool.mypy] lists the strictly checked part). What mypyc needs
# is every attribute's type, declared where it is first set.
MYPYC_CONFIG = """\
[mypy]
python_version = 3.11
follow_imports = silent
ignore_missing_imports = True
ignore_errors = True
"""


def _extensions():
    compiled = _compiled_spec()
    if compiled.pure_requested():
        print("pgtwist: PGTWIST_PURE is set: building the pure-Python form", file=sys.stderr)
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("pgtwist: mypyc is not installed: building the pure-Python form", file=sys.stderr)
        return []
    config = tempfile.NamedTemporaryFile("w", suffix=".ini", delete=False)
    with config:
        config.write(MYPYC_CONFIG)
    paths = [os.path.relpath(compiled.source_path(name, HERE), HERE) for name in compiled.MODULES]
    try:
        modules = mypycify(["--config-file", config.name, *paths], opt_level="3", group_name=compiled.GROUP)
    except SystemExit as e:  # (mypyc reports what it cannot compile and exits)
        print(f"pgtwist: mypyc cannot compile the core ({e}): building the pure-Python form", file=sys.stderr)
        return []
    finally:
        os.unlink(config.name)
    _mend_runtime(modules)
    return modules


# mypyc's runtime, as mypy 2.4 ships it, slices bytes without clamping a slice that ends before it
# starts (data[5:1], which Python answers with b""): PyBytes_FromStringAndSize gets a negative size
# and raises SystemError. Hostile lengths make exactly such slices in the framing code, so the
# compiled core is built with that one line mended (until mypyc's own source has it).
_SLICE_BUG = "Py_ssize_t slice_len = endn - startn;"
_SLICE_FIX = _SLICE_BUG + "\n        if (slice_len < 0) slice_len = 0;  /* pgtwist: as Python slices */"


def _mend_runtime(modules):
    from mypyc.build import include_dir

    with open(os.path.join(include_dir(), "bytes_ops.c")) as f:
        source = f.read()
    if _SLICE_BUG not in source:
        return  # (a mypyc that clamps it, or slices otherwise: its own runtime as it is)
    mended = os.path.join(HERE, "build", "mypyc-mended")
    os.makedirs(mended, exist_ok=True)
    with open(os.path.join(mended, "bytes_ops.c"), "w") as f:
        f.write(source.replace(_SLICE_BUG, _SLICE_FIX))
    for ext in modules:  # (ahead of lib-rt: the generated C includes it as <bytes_ops.c>)
        ext.include_dirs.insert(0, mended)


class OptionalBuildExt(build_ext):
    """The compiled core when it can be built; otherwise the pure-Python form, said once.

    The hash of the sources compiled (pgtwist/compiled.py) is taken before the build and written
    beside the extensions only once all of them are built: into the tree for an in-place build,
    into the build directory for a wheel. The one an earlier in-place build left is removed
    first, so that a build that fails or is cut short leaves a tree that runs its .py files."""

    def run(self):
        if not self.extensions:
            return
        compiled = _compiled_spec()
        digest = compiled.source_hash(HERE)
        inplace = self.inplace  # (setuptools clears it while it builds, then copies the results)
        stamp = os.path.join(HERE if inplace else self.build_lib, "pgtwist", compiled.SOURCE_HASH_FILE)
        if os.path.exists(stamp):
            os.unlink(stamp)
        try:
            super().run()
        except Exception as e:  # (no C compiler or Python headers: distutils' errors, OSError)
            print(f"pgtwist: the compiled core did not build ({e}): the pure-Python form is installed", file=sys.stderr)
            return
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        with open(stamp, "w") as f:
            f.write(digest + "\n")


os.chdir(HERE)  # (mypyc takes paths relative to the tree)
setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
