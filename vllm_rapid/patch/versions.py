"""The vLLM versions this plugin was built and tested against; version-specific code asks here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SUPPORTED_VLLM = ("0.32.", "0.33.")


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def require_supported_vllm(what: str) -> None:
    """Raise a clear error when ``what`` (a runtime patch) meets a vLLM version it was not made for."""
    version = vllm_version()
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vllm-rapid's {what} supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; found {version}"
        )


def replace_function_code(replacements: dict[Callable[..., Any], Callable[..., Any]], reads: str, what: str) -> None:
    """Apply ``what`` (a runtime patch) by giving each vLLM function the code of its replacement.

    The functions keep their identity, so every ``from vllm... import f`` made anywhere sees the change; the new
    code's globals resolve in the vLLM module. Refused on vLLM versions the patch was not made for, and when a
    function no longer reads the module global ``reads`` that the patch is about.
    """
    require_supported_vllm(what)
    for target in replacements:
        if reads not in target.__code__.co_names:
            raise RuntimeError(
                f"{target.__module__}.{target.__name__} no longer reads {reads}, which {what} is about; "
                "update vllm-rapid for this vLLM version"
            )
    for target, replacement in replacements.items():
        target.__code__ = replacement.__code__
