"""The house's rules, checked by tools: the import layers (import-linter's contract in pyproject.toml), every package
inside one layer, and tests that share code through tests/helpers/, never by importing each other."""

from __future__ import annotations

import ast
import shutil
import subprocess

import pytest
import tomllib

import gpt4llm
from helpers.configs import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_layers_contract_holds():
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_every_module_of_the_package_is_in_a_layer():
    (contract,) = PYPROJECT["tool"]["importlinter"]["contracts"]
    layered = {name.strip() for layer in contract["layers"] for name in layer.replace(":", "|").split("|")}
    package = ROOT / "src" / "gpt4llm"
    found = {f"gpt4llm.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    found |= {f"gpt4llm.{p.name}" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert found - layered == set(), "a module outside the layers escapes the contract: add it to pyproject.toml"
    assert gpt4llm.__name__ == PYPROJECT["tool"]["importlinter"]["root_package"]


def test_no_test_imports_another_test_file():
    tests = ROOT / "tests"
    for path in [*tests.glob("*.py"), *(tests / "helpers").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.split(".")[-1].startswith("test_") or n.split(".")[-1] == "conftest"]
            assert not bad, f"{path.name} imports {bad}: share it through tests/helpers/ instead"
