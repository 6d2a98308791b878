"""The encoder outputs of a multimodal model, held by the prefill lane's runner and freed only while it is idle.

Only the prefill lane computes prompt tokens, so every encoder input runs with a prefill batch and its output lands
in the prefill runner's ``encoder_cache`` (the decode runner's stays empty). vLLM's scheduler tells the runner which
entries it evicted in a step's ``free_encoder_mm_hashes``. Those of a prefill launch are the prefill runner's own to
apply when its batch starts, as vLLM's runner does. Those that ride with the decode batch (evicted by a prefill pass
that launched nothing, or forgotten after a prefill batch failed) are meant for the prefill runner too, but may
arrive while a prefill batch runs: they wait until its lane is idle and are applied before the next launch, so a
batch never loses an entry it reads and a later batch that recomputes one keeps it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vllm_rapid.worker.runners import encoder_outputs


class PrefillEncoderCache:
    """The prefill runner's encoder cache and the frees that wait for its lane to be idle."""

    def __init__(self, prefill_runner: Any) -> None:
        self._runner = prefill_runner
        self._pending: list[str] = []

    def defer(self, mm_hashes: Iterable[str]) -> None:
        """Frees that arrived with the decode batch, in the order the scheduler evicted them."""
        self._pending.extend(mm_hashes)

    def release(self) -> None:
        """Apply the deferred frees; only while no prefill batch is in flight."""
        cache = encoder_outputs(self._runner)
        for mm_hash in self._pending:
            cache.pop(mm_hash, None)
        self._pending.clear()

    def clear(self) -> None:
        """Forget every entry (vLLM reset the encoder cache); only while no prefill batch is in flight."""
        encoder_outputs(self._runner).clear()
        self._pending.clear()

    def entries(self) -> list[str]:
        return sorted(encoder_outputs(self._runner))
