"""A partition backend with pre-created splits and no device behind them (ARM and selection logic tests)."""

from __future__ import annotations

import contextlib

from vllm_rapid.lanes.partition.base import PartitionBackend, Split


class FakeBackend(PartitionBackend):
    """Pre-created splits without any device behind them."""

    name = "fake"

    def __init__(self, total: int, decode_units: list[int], shared_units: int = 0) -> None:
        """``shared_units`` > 0: the shared_pool layout, each decode partition (``decode_units``) and its prefill
        partition meeting in that many units."""
        super().__init__(total)
        self.layout = "shared_pool" if shared_units else "disjoint"
        for units in decode_units:
            split = Split(units, total - units + shared_units, total, False, shared_units)
            self._register(split, contextlib.nullcontext, contextlib.nullcontext)
        self._register(self.full_split(), contextlib.nullcontext, contextlib.nullcontext)

    def close(self) -> None:
        self._contexts.clear()
