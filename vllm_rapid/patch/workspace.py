"""A workspace lane of its own for each RAPID lane in vLLM's workspace manager.

vLLM's kernels with scratch buffers (MLA and sparse attention, DCP, fused MoE) take them from one process-wide
``WorkspaceManager``, per workspace lane (``vllm.v1.worker.workspace.use_workspace_lane``; vLLM itself uses a second
lane for a drafter). On one lane, a prefill batch and a decode step running at once write the same scratch. vLLM's
GPU worker sizes the manager by ``_num_workspace_lanes``; RAPID asks it for two: the decode lane keeps vLLM's lane 0
(vLLM captures the decode CUDA graphs there, and a graph keeps the buffers it was captured with), the prefill lane
takes lane 1.
"""

from __future__ import annotations

import functools
from typing import Any

DECODE_WORKSPACE_LANE = 0
PREFILL_WORKSPACE_LANE = 1


def use_two_workspace_lanes() -> None:
    """Make vLLM's GPU worker build its workspace manager with a lane per RAPID lane. Idempotent."""
    import vllm.v1.worker.gpu_worker as gpu_worker

    lanes = gpu_worker._num_workspace_lanes
    if getattr(lanes, "_rapid_lanes", False):
        return

    @functools.wraps(lanes)
    def one_per_rapid_lane(*args: Any, **kwargs: Any) -> int:
        return max(PREFILL_WORKSPACE_LANE + 1, lanes(*args, **kwargs))

    one_per_rapid_lane._rapid_lanes = True  # type: ignore[attr-defined]
    gpu_worker._num_workspace_lanes = one_per_rapid_lane
