"""A decode partition's CUDA graphs installed in vLLM's FULL-graph wrapper while the decode lane uses that partition.

vLLM's ``CUDAGraphWrapper`` holds one dict of graph entries keyed by ``BatchDescriptor``: it replays the entry of the
step's descriptor, and captures into the dict any descriptor it does not hold yet. A CUDA graph keeps the SM
partition of the stream it was captured on, so RAPID keeps one such dict per decode partition
(``vllm_rapid.worker.decode_graphs``) and installs it in the wrapper for the capture on that partition's stream and
for each decode step the lane runs there; vLLM's own dict is back in place outside them. Only the decode lane replays
graphs (the prefill runner dispatches none), so the dicts change in one thread, between steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def graph_entries(wrapper: Any, entries: dict[Any, Any]) -> Iterator[None]:
    """Let ``wrapper`` (a FULL ``CUDAGraphWrapper``) capture into and replay from ``entries`` inside the block."""
    own = wrapper.concrete_cudagraph_entries
    wrapper.concrete_cudagraph_entries = entries
    try:
        yield
    finally:
        wrapper.concrete_cudagraph_entries = own
