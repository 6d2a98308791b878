"""Every change to vLLM is in the registry (vllm_rapid/patch/registry.py), and only patch/ modules make them.

No engine is started: the registry is data, the scan reads the package's source.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from vllm_rapid.patch.registry import PATCHES, Stage, markdown_table

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vllm_rapid"
# patch/ modules that apply nothing themselves: the list, the gates, the hook and the entry point that run entries.
PATCH_INFRASTRUCTURE = {"__init__", "__main__", "registry", "versions", "internals", "startup", "plugin"}


def _resolve(dotted: str):
    module, _, attribute = dotted.partition(":")
    obj = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_every_entry_is_complete_and_its_code_exists(patch):
    assert patch.target and patch.why and patch.until
    assert callable(_resolve(patch.applied_by)), patch.applied_by
    assert (patch.stage == Stage.STARTUP_HOOK) == (patch.on_import is not None)
    if patch.upstream is not None:
        assert (ROOT / patch.upstream).is_file(), patch.upstream


def test_names_are_unique_and_every_upstream_diff_is_claimed_once():
    assert len({p.name for p in PATCHES}) == len(PATCHES)
    diffs = sorted(str(d.relative_to(ROOT)) for d in (ROOT / "patches").glob("*.diff"))
    assert sorted(p.upstream for p in PATCHES if p.upstream) == diffs


def test_every_patch_module_is_named_by_an_entry():
    applied = {p.applied_by.split(":")[0].rsplit(".", 1)[-1] for p in PATCHES
               if p.applied_by.startswith("vllm_rapid.patch.")}
    modules = {f.stem for f in (PACKAGE / "patch").glob("*.py")} - PATCH_INFRASTRUCTURE
    assert modules == applied


def test_readme_lists_exactly_the_registry():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- patches:start -->\n", "\n<!-- patches:end -->"
    assert start in readme and end in readme, "README needs the generated 'Changes to vLLM' table"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == markdown_table(), "README's table is stale: paste `python -m vllm_rapid.patch` output"


# ---- no undeclared changes: code outside patch/ does not change vLLM or process-wide state -----------------------


def _changes_in(path: Path) -> list[str]:
    """Lines of ``path`` that change vLLM or process-wide state (the shapes RAPID's own patches take)."""
    tree = ast.parse(path.read_text(), str(path))
    vllm_names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            vllm_names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "vllm"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
            vllm_names |= {a.asname or a.name for a in node.names}
    functions = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    found = []

    def root(expr: ast.expr) -> str | None:
        while isinstance(expr, (ast.Attribute, ast.Subscript)):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) else None

    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if not isinstance(target, (ast.Attribute, ast.Subscript)):
                    continue
                base = root(target)
                if isinstance(target, ast.Attribute) and target.attr == "__code__":
                    found.append(f"{where} swaps a function's code")
                elif base in vllm_names:
                    found.append(f"{where} assigns to vLLM's {base}")
                elif base in ("os", "sys", "importlib"):
                    found.append(f"{where} assigns process-wide {base} state")
                elif _is_function(node.value, functions) and not _own_attribute(target):
                    found.append(f"{where} replaces a method of another object")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            call = ast.unparse(node.func)
            if call in ("sys.setswitchinterval", "os.putenv", "os.environ.setdefault", "os.environ.update",
                        "sys.meta_path.insert", "sys.meta_path.append"):
                found.append(f"{where} calls {call}")
    return found


def _is_function(value: ast.expr, functions: set[str]) -> bool:
    return isinstance(value, ast.Lambda) or (isinstance(value, ast.Name) and value.id in functions)


def _own_attribute(target: ast.expr) -> bool:
    """``self.x = ...``: an object setting its own attribute, not changing another's."""
    return isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"


# Test-only start-up hooks that RAPID never imports: they change Triton's interpreter for the processes of a test.
TEST_ONLY_HOOKS = {PACKAGE / "testing" / "triton_cpu" / "sitecustomize.py"}


def test_no_module_outside_patch_changes_vllm_or_process_wide_state():
    outside = [f for f in PACKAGE.rglob("*.py")
               if "patch" not in f.relative_to(PACKAGE).parts and f not in TEST_ONLY_HOOKS]
    changes = [change for f in outside for change in _changes_in(f)]
    assert not changes, "declare in vllm_rapid/patch/registry.py and move into patch/:\n" + "\n".join(changes)


def test_the_scan_sees_the_patches_that_patch_modules_make():
    """The scan is not blind: run on patch/ it finds the changes the registry declares there."""
    found = "\n".join(c for f in (PACKAGE / "patch").glob("*.py") for c in _changes_in(f))
    for expected in ("forward_context.py", "cpu_kernels.py", "process.py", "engine_args.py", "versions.py",
                     "runner.py", "kv_publication.py", "cli_version.py", "workspace.py"):
        assert expected in found, expected


def test_patch_imports_nothing_from_core():
    """patch/ changes vLLM; core/ is RAPID's scheduler, built on those changes: never the other way round."""
    imports = []
    for path in (PACKAGE / "patch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            imports += [f"{path.relative_to(ROOT)}:{node.lineno} {m}" for m in modules
                        if m.startswith("vllm_rapid.core")]
    assert not imports
