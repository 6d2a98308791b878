"""The splits of a backend that the lanes can really run on: what the ARM is offered.

A backend pre-creates its partitions before the model is loaded. On a GPU a decode partition is only in effect if the
decode step runs as a CUDA graph captured on that partition's stream (a graph keeps the partition it was captured on,
and eager decode on a small partition starves through the launch queue), so the worker offers the ARM the partitions
it captured graphs for, and the full split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vllm_rapid.lanes.partition.base import PartitionBackend, Split


class OfferedSplits(PartitionBackend):
    """``backend`` limited to ``splits`` (and its full split, which every backend offers); its lanes' contexts."""

    def __init__(self, backend: PartitionBackend, splits: Iterable[Split]) -> None:
        super().__init__(backend.total_units)
        self.name = backend.name
        self.full_split_runs_both_lanes = backend.full_split_runs_both_lanes
        self.inline_decode_lane = backend.inline_decode_lane
        self.layout = backend.layout
        self._backend = backend
        for split in {backend.full_split(), *splits}:
            self._register(split, *backend.lane_contexts(split))

    def thread_init(self, lane: str) -> Callable[[], None] | None:
        return self._backend.thread_init(lane)

    def close(self) -> None:
        self._contexts.clear()  # the backend's resources stay with the backend, which its owner closes
