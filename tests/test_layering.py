"""The rooms' layering: data code depends on nothing above it (torchtitan's rule, ../shared/HOUSE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UPWARD = {"datamodules": ("lightning_modules", "experiments", "benchmarks"), "lightning_modules": ("experiments",)}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("room", sorted(UPWARD))
def test_no_module_imports_a_room_above_it(room):
    files = sorted((REPO / room).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(REPO)): sorted(imported_roots(f) & set(UPWARD[room])) for f in files}
    assert {f: r for f, r in bad.items() if r} == {}


def test_the_check_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from lightning_modules.evaluation import x\n    import experiments.cli\n")
    assert imported_roots(f) >= {"lightning_modules", "experiments"}
