"""vllm-rapid: RAPID-Serve for vLLM — prefill and decode as concurrent lanes on one GPU, sharing one KV cache.

Kept import-light on purpose: the ``.pth`` start-up hook imports ``vllm_rapid.patch.startup`` in every Python process.
"""

__version__ = "0.1.0"


def enable() -> None:
    """Make ``scheduler="rapid"`` and ``--scheduler`` known now (for processes started with VLLM_RAPID_AUTOLOAD=0)."""
    from vllm_rapid.patch.plugin import register

    register()
