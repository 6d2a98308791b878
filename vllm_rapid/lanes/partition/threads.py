"""CPU: the lanes' own threads are the concurrency; torch's CPU kernels release the GIL."""

from __future__ import annotations

import contextlib
import os

from vllm_rapid.lanes.partition.base import PartitionBackend


class ThreadsBackend(PartitionBackend):
    """CPU: the lanes' own threads are the concurrency; torch's CPU kernels release the GIL."""

    name = "threads"

    def __init__(self) -> None:
        super().__init__(os.cpu_count() or 1)
        self._register(self.full_split(), contextlib.nullcontext, contextlib.nullcontext)

    def close(self) -> None:
        self._contexts.clear()
