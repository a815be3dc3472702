"""pyproject.toml declares what the suite imports, and imports what it declares."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI's); 3.10 has no TOML reader in the standard library

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_modules", "datamodules", "experiments")
# declared but never imported by name: used through another library
USED_INDIRECTLY = {"torch-fidelity": "torchmetrics' FID feature extractor"}


def _imported_top_level() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], path)
    return {m: p for m, p in found.items() if m not in sys.stdlib_module_names and m not in PACKAGES}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {_norm(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in reqs}


def test_every_third_party_import_is_declared():
    dists = md.packages_distributions()
    declared = _declared()
    missing = {}
    for module, where in _imported_top_level().items():
        names = {_norm(d) for d in dists.get(module, [])} or {_norm(module)}  # not installed: an optional extra
        if not names & declared:
            missing[module] = str(where.relative_to(REPO))
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"


def test_every_runtime_dependency_is_imported_or_says_why_not():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_norm(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in project["dependencies"]}
    dists = md.packages_distributions()
    imported = {_norm(d) for m in _imported_top_level() for d in dists.get(m, [m])}
    unused = runtime - imported - set(USED_INDIRECTLY)
    assert unused == set(), f"declared in pyproject.toml but never imported: {sorted(unused)}"
