"""The prefill lane's own tensor-parallel communicator: same ranks as vLLM's TP group, a group of its own.

Two lanes must never share a communicator (their all-reduces would interleave). ``patch/tp_group.py`` makes vLLM's
TP-group lookups answer per thread; this module creates the prefill lane's group and names the group a thread uses.
"""

from __future__ import annotations

from typing import Any

PREFILL_GROUP_NAME = "tp_rapid_prefill"  # the "tp" prefix selects vLLM's shared-memory path on CPU


def create_lane_tp_group() -> Any:
    """A second TP coordinator over the same ranks, for the prefill lane.

    Creating it is a collective: every rank calls this once, at the same point of its start-up.
    """
    import vllm.distributed.parallel_state as ps

    tp = ps.get_tp_group()
    return ps.init_model_parallel_group(
        tp.group_ranks, tp.local_rank, tp.torch_distributed_backend, group_name=PREFILL_GROUP_NAME
    )


def current_tp_group_name() -> str:
    """The unique name of the TP group the calling thread's collectives use."""
    import vllm.distributed.parallel_state as ps

    return ps.get_tp_group().unique_name
