"""The compiled core (pgtwist/compiled.py): which form runs, and what mypyc must not be given.

The suite runs on whichever form is built (./dev builds the compiled one in place); `./dev test`
runs the unit tests again on the pure one. These tests pin the choice between the two: an edited
tree or PGTWIST_PURE=1 loads every core module from its .py file, never a stale extension.
"""

import collections
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgtwist import compiled

ROOT = Path(__file__).resolve().parents[2]
FORM_AND_FILES = "import pgtwist.compiled as c, importlib; print(c.FORM, *(importlib.import_module(n).__file__ for n in c.MODULES))"


def _form_in(root: Path, **env) -> list[str]:
    """FORM and each core module's file, as a new interpreter with *root* first on its path sees them."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PGTWIST_PURE", "PYTHONPATH")}
    done = subprocess.run(
        [sys.executable, "-c", FORM_AND_FILES], cwd=root, env={**environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_core_modules_exist_and_the_package_imports_the_choice_first():
    for name in compiled.MODULES:
        assert Path(compiled.source_path(name, str(ROOT))).is_file(), name
    assert compiled.FORM in ("compiled", "pure", "stale")
    assert "from pgtwist import compiled" in (ROOT / "pgtwist" / "__init__.py").read_text()


def test_pgtwist_pure_loads_every_core_module_from_its_source():
    form, *files = _form_in(ROOT, PGTWIST_PURE="1")
    assert form == "pure" and all(f.endswith(".py") for f in files), files


def test_the_current_build_is_the_one_that_runs():
    if compiled.FORM != "compiled":
        pytest.skip(f"the core is not compiled here ({compiled.FORM}): ./dev builds it")
    form, *files = _form_in(ROOT)
    assert form == "compiled" and not any(f.endswith(".py") for f in files), files


def test_an_edited_tree_runs_its_sources_not_the_stale_build(tmp_path):
    """A tree copied with its build and then edited: every core module loads from its .py file
    (all or none: a compiled module calls the others' classes directly)."""
    if compiled.FORM != "compiled":
        pytest.skip(f"the core is not compiled here ({compiled.FORM}): ./dev builds it")
    shutil.copytree(ROOT / "pgtwist", tmp_path / "pgtwist", ignore=shutil.ignore_patterns("__pycache__"))
    assert _form_in(tmp_path)[0] == "compiled"  # (the copy as built)
    edited = Path(compiled.source_path(compiled.MODULES[-1], str(tmp_path)))
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    form, *files = _form_in(tmp_path)
    assert form == "stale" and all(f.endswith(".py") and f.startswith(str(tmp_path)) for f in files), files


@pytest.mark.parametrize("how", ["a protocol constant changed", "no hash (a build cut short)", "an extension missing"])
def test_a_build_that_is_not_this_sources_is_not_loaded(tmp_path, how):
    """The compiled code holds wire/protocol.py's Final numbers too; setup.py writes the hash
    only once every extension is built; a module without its extension would exist twice."""
    if compiled.FORM != "compiled":
        pytest.skip(f"the core is not compiled here ({compiled.FORM}): ./dev builds it")
    shutil.copytree(ROOT / "pgtwist", tmp_path / "pgtwist", ignore=shutil.ignore_patterns("__pycache__"))
    package = tmp_path / "pgtwist"
    if how == "a protocol constant changed":
        protocol = package / "wire" / "protocol.py"
        protocol.write_text(protocol.read_text().replace("MAX_STARTUP_PACKET: Final = 10_000", "MAX_STARTUP_PACKET: Final = 20_000"))
    elif how == "no hash (a build cut short)":
        (package / compiled.SOURCE_HASH_FILE).unlink()
    else:
        (extension,) = (package / "pooling").glob("relay.*.so")
        extension.unlink()
    form, *files = _form_in(tmp_path)
    assert form in ("stale", "pure") and all(f.endswith(".py") for f in files), (form, files)


def test_only_the_hashed_modules_declare_final_constants():
    """mypyc writes a Final's value into the compiled code: a module that declares one must be
    in HASHED, or an edit of it would leave a build that disagrees with its source loaded."""
    hashed = {Path(compiled.source_path(name, str(ROOT))) for name in compiled.HASHED}
    declaring = {path for path in (ROOT / "pgtwist").rglob("*.py") if ": Final" in path.read_text()}
    assert declaring <= hashed, sorted(str(p.relative_to(ROOT)) for p in declaring - hashed)


def test_no_compiled_class_has_a_field_twice():
    """A field declared in a class and again in a subclass is two slots to mypyc; the cyclic
    collector then counts the one reference twice and can never free what holds it (it kept
    every closed ClientSession of a test run alive, through its login's admit callback)."""
    if compiled.FORM != "compiled":
        pytest.skip("only the compiled form has mypyc's fields")
    for name in compiled.MODULES:
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if isinstance(cls, type) and cls.__module__ == name and hasattr(cls, "__mypyc_attrs__"):
                twice = [f for f, n in collections.Counter(cls.__mypyc_attrs__).items() if n > 1]
                assert not twice, (name, cls.__name__, twice)


def test_the_core_logs_under_its_module_names():
    """Twisted's Logger() names itself after the frame that made it, which a compiled module does
    not have (its log lines read "importlib._bootstrap"): each core module names its own."""
    for name in compiled.MODULES:
        log = getattr(importlib.import_module(name), "log", None)
        if log is not None:
            assert log.namespace == name, (name, log.namespace)


@pytest.mark.parametrize("end", [0, 1, 3])
def test_a_slice_that_ends_before_it_starts_is_empty_as_in_python(end):
    """A Bind whose length field says less than its header (hostile bytes, as the fuzz drill sends):
    the framing slices past its end. mypyc's runtime raised SystemError there (setup.py mends it);
    the client must get 08P01 like any other malformed message, in either form."""
    from pgtwist.pooling.relay import CLIENT_CAPTURE
    from pgtwist.wire.errors import ProtocolViolation
    from pgtwist.wire.framing import MessageScanner

    run = b"B" + end.to_bytes(4, "big") + b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00S\x00\x00\x00\x04"
    with pytest.raises(ProtocolViolation):
        MessageScanner(CLIENT_CAPTURE, 1 << 20, frontend=True).feed(run)


@pytest.mark.parametrize("value,pure", [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_pgtwist_pure_is_asked_for_by_any_value_but_0(monkeypatch, value, pure):
    # (One rule for setup.py, which builds nothing, and the import, which loads nothing.)
    if value is None:
        monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    else:
        monkeypatch.setenv(compiled.PURE_ENV, value)
    assert compiled.pure_requested() is pure
