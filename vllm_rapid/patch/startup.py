"""Start-up hook (run by ``vllm_rapid.pth`` in every Python process): patch vLLM modules as they are imported.

The registry's ``STARTUP_HOOK`` entries (``patch/registry.py``) name the vLLM module whose import applies each:
``EngineArgs`` must accept ``scheduler=`` before vLLM loads any plugin (``LLM(**kwargs)`` builds it first), the
``vllm`` command must start with the CPU wheel, and ``SchedulerStats`` must gain its field before other vLLM modules
import the name.

It costs one tiny import at start-up and does nothing until those modules are imported. Opt out with
``VLLM_RAPID_AUTOLOAD=0`` (then call ``vllm_rapid.enable()`` before building an ``LLM``, or pass
``scheduler_cls="vllm_rapid.core.scheduler.RapidScheduler"``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

from vllm_rapid.patch.registry import PATCHES as REGISTRY
from vllm_rapid.patch.registry import Stage

# module imported by vLLM -> "module:function" that patches it (imported only when needed)
PATCHES = {p.on_import: p.applied_by for p in REGISTRY if p.stage == Stage.STARTUP_HOOK and p.on_import}


def _apply(name: str, module) -> None:
    patch_module, patch_function = PATCHES[name].split(":")
    getattr(importlib.import_module(patch_module), patch_function)(module)


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a PATCHES module with the other finders, then patches the freshly executed module."""

    def __init__(self) -> None:
        self._loaders: dict[str, importlib.abc.Loader] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES or fullname in self._loaders:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        self._loaders[fullname], spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module) -> None:
        self._loaders[module.__name__].exec_module(module)
        _apply(module.__name__, module)


def install() -> None:
    if os.environ.get("VLLM_RAPID_AUTOLOAD", "1").lower() in ("0", "false", "no"):
        return
    for name in PATCHES:
        if name in sys.modules:
            _apply(name, sys.modules[name])
    if not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


install()
