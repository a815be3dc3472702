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


def _names(requirements: list[str]) -> set[str]:
    """Normalised distribution names of PEP 508 requirement strings."""
    return {_norm(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in requirements}


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _distributions(module: str) -> set[str]:
    """The installed distributions that provide ``module`` (its own name when none is installed: an optional extra)."""
    return {_norm(d) for d in md.packages_distributions().get(module, [module])}


def test_every_third_party_import_is_declared():
    project = _project()
    declared = _names(
        project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    )
    missing = {
        module: str(where.relative_to(REPO))
        for module, where in _imported_top_level().items()
        if not _distributions(module) & declared
    }
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"


def test_every_runtime_dependency_is_imported_or_says_why_not():
    imported = set().union(*map(_distributions, _imported_top_level()))
    unused = _names(_project()["dependencies"]) - imported - set(USED_INDIRECTLY)
    assert unused == set(), f"declared in pyproject.toml but never imported: {sorted(unused)}"
