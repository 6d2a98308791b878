"""Blocks reach the prefix cache only once a lane has written them, where vLLM would publish them earlier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def defer_prefix_cache_publication(kv_cache_manager: Any, when: Callable[[], bool]) -> None:
    """Make ``allocate_slots`` of this manager delay publishing full blocks to the prefix cache while ``when()``.

    vLLM publishes a full block when it schedules the step that writes it; with two lanes a request could then be
    admitted onto KV that the other lane is still writing. While ``when()`` holds (the RAPID scheduler's decode
    pass), the scheduler calls ``cache_blocks`` itself once the lane that wrote the blocks is done.
    """
    allocate_slots = kv_cache_manager.allocate_slots

    def allocate_slots_unpublished(*args: Any, **kwargs: Any) -> Any:
        if when():
            kwargs["delay_cache_blocks"] = True
        return allocate_slots(*args, **kwargs)

    kv_cache_manager.allocate_slots = allocate_slots_unpublished
