"""The one version gate: the vLLM versions vllm-rapid was built and tested against.

A RAPID engine on any other vLLM fails at start-up with one message (``require_supported_vllm``, called when the
engine's config is built and again in the engine-core and worker processes), never mid-serve. Changes that every
process gets whatever the scheduler (the start-up hook's) are skipped on such a vLLM, so ``--scheduler default``
keeps working there untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SUPPORTED_VLLM = ("0.32.", "0.33.", "0.34.")


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is not one vllm-rapid supports, or lacks an internal it relies on."""


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def release(version: str) -> tuple[int, int]:
    """The (major, minor) release of a version string: "0.34.0rc1" -> (0, 34)."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def vllm_in(since: str | None = None, before: str | None = None) -> bool:
    """Whether the installed vLLM's release is at least ``since`` and below ``before`` ("0.34": 0.34.x on)."""
    installed = release(vllm_version())
    return (since is None or installed >= release(since)) and (before is None or installed < release(before))


def is_supported_vllm() -> bool:
    return vllm_version().startswith(SUPPORTED_VLLM)


def require_supported_vllm() -> None:
    """Raise the gate's one clear error on an unsupported vLLM."""
    if not is_supported_vllm():
        raise UnsupportedVllmError(
            f"vllm-rapid supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; found {vllm_version()}. "
            "--scheduler rapid is refused on it (--scheduler default is unaffected)."
        )


def replace_function_code(replacements: dict[Callable[..., Any], Callable[..., Any]], reads: str, what: str) -> None:
    """Apply ``what`` (a runtime patch) by giving each vLLM function the code of its template.

    The functions keep their identity, so every ``from vllm... import f`` made anywhere sees the change; the new
    code's globals resolve in the vLLM module. Refused by the version gate, and when a function no longer reads
    the module global ``reads`` that the patch is about.
    """
    require_supported_vllm()
    for target in replacements:
        if reads not in target.__code__.co_names:
            raise UnsupportedVllmError(
                f"{target.__module__}.{target.__name__} no longer reads {reads}, which {what} is about; "
                "update vllm-rapid for this vLLM version"
            )
    for target, template in replacements.items():
        target.__code__ = template.__code__
