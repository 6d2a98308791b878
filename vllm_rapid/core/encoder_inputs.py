"""Multimodal encoder inputs across the two lanes, scheduler side.

vLLM's one ``EncoderCacheManager`` serves both scheduling passes. Only the prefill pass schedules prompt tokens, so
it alone schedules encoder inputs and evicts entries (the decode pass never does, checked with
``rapid.debug_invariants``), and the encoder outputs live in the prefill lane's runner. Two things vLLM's single
pass never has to handle:

* a prefill pass that evicted entries and then scheduled nothing (its requests' KV did not fit) launches no batch,
  so the evictions in its output would never reach the worker: they ride with the step's decode batch instead;
* a prefill batch that fails may not have computed the encoder outputs it was scheduled to, but the manager
  counts them as cached: a later request with the same item would skip its encoder and fail the next batch on the
  missing entry. They are evicted as the manager evicts, and the worker drops whatever the runner has of them.

In both cases the worker applies the frees to the prefill runner while its lane is idle
(``vllm_rapid.worker.encoder_cache``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from vllm.v1.core.encoder_cache_manager import EncoderCacheManager
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.request import Request


def encoder_outputs_of(batch: SchedulerOutput, requests: Mapping[str, Request]) -> frozenset[str]:
    """The multimodal items (their hashes) whose encoder outputs ``batch`` computes."""
    return frozenset(
        requests[req_id].mm_features[input_id].identifier
        for req_id, input_ids in batch.scheduled_encoder_inputs.items()
        for input_id in input_ids
    )


def forget_encoder_outputs(manager: EncoderCacheManager, mm_hashes: Iterable[str]) -> None:
    """Evict the entries of ``mm_hashes`` that no request references any more, as ``can_allocate`` evicts: their
    slots come back and their hashes reach the worker with the next step's batch."""
    for mm_hash in mm_hashes:
        if mm_hash not in manager.cached or manager.cached[mm_hash]:
            continue
        manager.num_free_slots += manager.freeable.pop(mm_hash)
        del manager.cached[mm_hash]
        del manager.num_embeds_by_hash[mm_hash]
        manager.freed.append(mm_hash)


def hand_on_evictions(decode: SchedulerOutput, prefill: SchedulerOutput) -> None:
    """A prefill pass launched nothing: the entries it evicted ride with the decode batch."""
    decode.free_encoder_mm_hashes = [*decode.free_encoder_mm_hashes, *prefill.free_encoder_mm_hashes]
