"""Names and paths that the README and the package's docstrings point to exist (they go stale in refactors)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
PATH = re.compile(r"`((?:vllm_rapid|tests|benchmarks|examples|patches|scripts)/[\w./-]+?)`")
NAME = re.compile(r"``?(vllm_rapid(?:\.\w+)+)``?")
FILES = {"vllm_rapid.pth"}  # a file, not a module


def _docstrings() -> list[tuple[str, str]]:
    found = []
    for path in (ROOT / "vllm_rapid").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            if isinstance(node, kinds) and (doc := ast.get_docstring(node)):
                found.append((f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}", doc))
    return found


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return False
        return True
    return False


def test_paths_in_the_readmes_exist():
    missing = [(doc.name, p) for doc in DOCUMENTS for p in PATH.findall(doc.read_text())
               if not any((ROOT / candidate).exists() for candidate in (p, p.rstrip("/")))]
    assert not missing


@pytest.mark.parametrize("source", ["readmes", "docstrings"])
def test_dotted_names_resolve(source):
    texts = [(d.name, d.read_text()) for d in DOCUMENTS] if source == "readmes" else _docstrings()
    stale = [(where, name) for where, text in texts for name in NAME.findall(text)
             if name not in FILES and not _resolves(name)]
    assert not stale


def _support_rows() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- support:start -->\n", 1)[1].split("\n<!-- support:end -->", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_every_working_feature_names_tests_that_exist():
    for feature, status, tests in _support_rows():
        if not status.startswith("works"):
            continue
        names = re.findall(r"`(tests/\w+\.py)::(\w+)`", tests)
        assert names, f"{feature}: a 'works' row names its test"
        for path, name in names:
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{feature}: {path}::{name}"


def test_every_start_up_refusal_is_in_the_support_table():
    from vllm_rapid.policy import REFUSALS

    refused = {feature for feature, status, _ in _support_rows() if status.startswith("refused")}
    for refusal in REFUSALS:
        short = refusal.feature.split(" (")[0]
        assert any(short in row for row in refused), f"{refusal.feature!r} is refused but not in README's table"
