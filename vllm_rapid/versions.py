"""The vLLM versions this plugin was built and tested against; version-specific code asks here."""

from __future__ import annotations

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
