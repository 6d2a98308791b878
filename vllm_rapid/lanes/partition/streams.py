"""Plain streams: no spatial partitioning on a GPU, the fallback when green contexts or CU masks are unavailable.

Only the full-overlap split: the lanes still overlap, the hardware scheduler decides who runs where.
"""

from __future__ import annotations

import functools

from vllm_rapid.lanes.lane import ContextFactory
from vllm_rapid.lanes.partition.base import PartitionBackend

# Lower numbers are higher priorities; torch clamps to the device's range, so -1 means "the highest" on any GPU.
DECODE_STREAM_PRIORITY = -1
PREFILL_STREAM_PRIORITY = 0


def whole_device_stream_contexts(device_index: int) -> tuple[ContextFactory, ContextFactory]:
    """(decode, prefill) contexts on two new streams over the whole device; also the full-overlap split of the
    partitioning backends."""
    import torch

    decode = torch.cuda.Stream(device=device_index, priority=DECODE_STREAM_PRIORITY)
    prefill = torch.cuda.Stream(device=device_index, priority=PREFILL_STREAM_PRIORITY)
    return functools.partial(torch.cuda.stream, decode), functools.partial(torch.cuda.stream, prefill)


class StreamsBackend(PartitionBackend):
    """Two plain streams on the whole device, the decode stream at higher priority."""

    name = "streams"

    def __init__(self, device_index: int = 0) -> None:
        import torch

        super().__init__(torch.cuda.get_device_properties(device_index).multi_processor_count)
        self._register(self.full_split(), *whole_device_stream_contexts(device_index))

    def close(self) -> None:
        self._contexts.clear()  # torch owns the streams and frees them with their last reference
