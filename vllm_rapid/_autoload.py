"""Start-up hook (run by ``vllm_rapid.pth`` in every Python process): patch vLLM's EngineArgs as it is imported.

``LLM(model, scheduler="rapid")`` builds ``EngineArgs(**kwargs)`` before vLLM loads any plugin, so the plugin alone
comes too late for the keyword. This hook costs one tiny import at start-up and does nothing until
``vllm.engine.arg_utils`` is imported. Opt out with ``VLLM_RAPID_AUTOLOAD=0`` (then call
``vllm_rapid.enable()`` before building an ``LLM``, or pass ``scheduler_cls="vllm_rapid.scheduler.RapidScheduler"``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

TARGET = "vllm.engine.arg_utils"


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds TARGET with the other finders, then runs ``patch_engine_args`` on the freshly executed module."""

    def __init__(self) -> None:
        self._loader: importlib.abc.Loader | None = None

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET or self._loader is not None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        sys.meta_path.remove(self)
        from vllm_rapid.engine_args import patch_engine_args

        patch_engine_args(module)


def install() -> None:
    if os.environ.get("VLLM_RAPID_AUTOLOAD", "1").lower() in ("0", "false", "no"):
        return
    if TARGET in sys.modules:
        from vllm_rapid.engine_args import patch_engine_args

        patch_engine_args(sys.modules[TARGET])
    elif not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


install()
