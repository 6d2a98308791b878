"""Instance overrides on the two lanes' model runners: the prefill runner binds the KV tensors the primary runner
allocated (one KV cache, no copy), and each runner's device syncs wait for its own lane's stream only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vllm_rapid.lanes.lane import current_lane


def share_kv_tensors(prefill_runner: Any, primary: Any) -> None:
    """Make ``prefill_runner.initialize_kv_cache`` build its own backends, metadata builders and block tables over
    the tensors the primary runner allocated and bound to the (shared) attention layers, instead of allocating."""

    def primary_kv_tensors(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        layers = primary.compilation_config.static_forward_context
        return {name: layer.kv_cache for name, layer in layers.items()
                if isinstance(getattr(layer, "kv_cache", None), torch.Tensor)}

    prefill_runner.initialize_kv_cache_tensors = primary_kv_tensors


@contextlib.contextmanager
def one_kv_allocation(allocation: dict[str, torch.Tensor]) -> Iterator[None]:
    """V2 runner: while the primary runner initializes its KV cache, keep what vLLM's ``allocate_kv_cache`` returns
    in ``allocation``; while the prefill runner does, return that again instead of allocating. Each runner still
    builds its own attention backends, metadata builders and block tables over the tensors, and binds them to the
    (shared) attention layers: one KV cache, no copy."""
    from vllm.v1.worker.gpu import attn_utils

    allocate = attn_utils.allocate_kv_cache

    def allocate_once(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if not allocation:
            allocation.update(allocate(*args, **kwargs))
        return dict(allocation)

    attn_utils.allocate_kv_cache = allocate_once
    try:
        yield
    finally:
        attn_utils.allocate_kv_cache = allocate


def sync_lane_stream_only(runner: Any) -> None:
    """Make ``runner._sync_device()`` wait for the calling lane's stream instead of the whole device.

    vLLM calls it after non-blocking copies to the host (prompt logprobs, pooling outputs), which run on the current
    stream; inside a lane that is the lane's stream (its partition's). A whole-device sync would also wait for the other
    lane's work: a prefill batch with prompt logprobs for the decode step running beside it, and the other way round.
    Outside the lanes (start-up, profiling) vLLM's own sync runs.
    """
    device_sync = runner._sync_device

    def sync_lane_stream() -> None:
        if current_lane() is None:
            device_sync()
        else:
            torch.cuda.current_stream(runner.device).synchronize()

    runner._sync_device = sync_lane_stream
