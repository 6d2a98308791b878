"""Two vLLM CPU kernels that are not safe to run from two threads at once, made safe for the CPU lanes."""

from __future__ import annotations

import threading
from typing import Any


def use_thread_safe_cpu_kernels() -> None:
    """GEMMs through torch's linear instead of vLLM's oneDNN handler, and CPU attention one lane at a time.

    vLLM's oneDNN GEMM handler keeps a per-weight primitive cache that is not thread-safe: two lanes calling one
    layer at once corrupt the heap (torch's own linear, MKL/oneDNN inside ATen, is thread-safe). vLLM's CPU
    attention kernel keeps scratch space per OpenMP thread number, which the two lanes' teams share, so two calls
    at once overwrite each other's scratch: attention runs one lane at a time; everything else still overlaps.
    Idempotent.
    """
    import vllm._custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    ops._supports_onednn = False
    if getattr(CPUAttentionBackendImpl.forward, "_rapid_serialized", False):
        return
    forward, lock = CPUAttentionBackendImpl.forward, threading.Lock()

    def serialized_forward(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return forward(*args, **kwargs)

    serialized_forward._rapid_serialized = True  # type: ignore[attr-defined]
    CPUAttentionBackendImpl.forward = serialized_forward
