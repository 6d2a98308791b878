"""A partition backend with pre-created splits and no device behind them (ARM and selection logic tests)."""

from __future__ import annotations

import contextlib

from vllm_rapid.lanes.partition.base import PartitionBackend, Split


class FakeBackend(PartitionBackend):
    """Pre-created splits without any device behind them."""

    name = "fake"

    def __init__(self, total: int, decode_units: list[int]) -> None:
        super().__init__(total)
        for units in decode_units:
            self._register(Split(units, total - units, total, False), contextlib.nullcontext, contextlib.nullcontext)
        self._register(self.full_split(), contextlib.nullcontext, contextlib.nullcontext)

    def close(self) -> None:
        self._contexts.clear()
