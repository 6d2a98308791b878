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
