"""The folders keep their contract (README, "Layout"): who may import whom, and lanes/ and tools/ without vLLM."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vllm_rapid"

# folder -> folders of this package it must never import (at any depth: module level or inside functions)
FORBIDDEN = {
    "lanes": {"core", "worker", "patch", "metrics", "tools", "testing", "protocol"},
    "tools": {"core", "worker", "patch", "metrics", "testing", "protocol"},
    "core": {"worker", "tools", "testing"},
    "worker": {"core", "tools", "testing"},
    "metrics": {"worker", "tools", "testing"},
    "patch": {"worker", "tools", "testing"},
}


def _imported_folders(path: Path) -> set[str]:
    """The top-level parts of this package that ``path`` imports (``vllm_rapid.X...`` -> X)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "vllm_rapid" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folders_import_only_what_their_contract_allows(folder):
    breaches = {
        str(f.relative_to(PACKAGE)): sorted(_imported_folders(f) & FORBIDDEN[folder])
        for f in (PACKAGE / folder).rglob("*.py")
    }
    assert not {k: v for k, v in breaches.items() if v}


_WITHOUT_VLLM = """
import importlib, pkgutil, sys
sys.modules["vllm"] = None  # any import of vLLM now fails
import vllm_rapid.lanes, vllm_rapid.tools
for package in (vllm_rapid.lanes, vllm_rapid.tools):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
from vllm_rapid.lanes.arm import AdaptiveResourceManager
from vllm_rapid.lanes.partition import create_partition_backend
backend = create_partition_backend("auto", "cpu")
print("ok", backend.name, sorted(m for m in sys.modules if m.startswith("vllm_rapid")))
"""


def test_lanes_and_tools_import_and_run_without_vllm():
    """The profiler and the GPU mechanism benchmark run on machines without vLLM (the lent GPU has none)."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_VLLM], capture_output=True, text=True, timeout=120,
                          env={"VLLM_RAPID_AUTOLOAD": "0", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok threads"), done.stdout
