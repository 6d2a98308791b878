"""The ``vllm.general_plugins`` entry point: runs in every vLLM process (API server, engine core, workers)."""

from __future__ import annotations


def register() -> None:
    """Make ``--scheduler`` / ``scheduler=`` known (a no-op when the start-up hook already did it), and route
    RAPID's log lines through vLLM's logging."""
    import vllm.engine.arg_utils as arg_utils

    from vllm_rapid.patch.engine_args import patch_engine_args
    from vllm_rapid.patch.log import adopt_vllm_logging

    patch_engine_args(arg_utils)
    adopt_vllm_logging()
