"""The core's import rule: the packages a client's bytes cross never import pgtwist.admin.

The service wires the admin side in (proxy.admin_session, proxy.audit_statement), so that the
console and the metrics can change without the core knowing them.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "pgtwist"
CORE = ("wire", "auth", "frontend", "backend", "pooling", "routing", "cluster", "session", "transport")


def imported_modules(path: pathlib.Path):
    """Every module *path* imports (at any depth: a function's lazy import counts too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def admin_imports(path: pathlib.Path):
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
        for line, name in imported_modules(path)
        if name == "pgtwist.admin" or name.startswith("pgtwist.admin.")
    ]


@pytest.mark.parametrize("package", CORE)
def test_core_does_not_import_admin(package):
    found = [hit for path in sorted((PACKAGE / package).rglob("*.py")) for hit in admin_imports(path)]
    assert found == [], "the service passes these in instead:\n" + "\n".join(found)


def test_the_rule_sees_an_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from pgtwist import admin\ndef later():\n    from pgtwist.admin.console import AdminConsole\n")
    assert [name for _, name in imported_modules(sample) if name.startswith("pgtwist.admin")] == ["pgtwist.admin", "pgtwist.admin.console", "pgtwist.admin.console.AdminConsole"]
