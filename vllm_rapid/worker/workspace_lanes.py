"""The prefill lane's workspace in vLLM's workspace manager: sized before vLLM locks the manager, and counted.

vLLM grows its workspace lazily, during the profile run and graph capture on lane 0, then locks it (capture_model):
a lane still empty at that point fails its first batch that needs scratch. The prefill lane's lane 1
(``vllm_rapid.patch.workspace``) is therefore grown at start-up by a batch of ``max_num_batched_tokens``, as vLLM's
profile run grows lane 0, and what it keeps joins the worker's memory reserve.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.worker.workspace import is_workspace_manager_initialized, use_workspace_lane

from vllm_rapid.patch.workspace import PREFILL_WORKSPACE_LANE


def grow_prefill_workspace(runner: Any) -> int:
    """Run a profile-sized batch in the prefill lane's workspace; return the bytes that workspace keeps (0 where vLLM
    has no workspace manager, e.g. on CPU)."""
    if not is_workspace_manager_initialized() or runner.device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with use_workspace_lane(PREFILL_WORKSPACE_LANE):
        runner._dummy_run(runner.max_num_tokens, is_profile=True)
    torch.cuda.synchronize()
    return max(torch.cuda.memory_allocated() - before, 0)
