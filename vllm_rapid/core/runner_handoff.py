"""How the decode lane's runner takes over a request whose prompt the prefill lane computed (vLLM's V2 runner).

The V2 model runner keeps a request's state in per-slot tensors of its own, so no state object moves between the
two runners. A request the prefill lane has finished comes to the decode runner as vLLM sends a preempted request
back to a V2 runner: as a new request carrying every token so far (its prompt and the first sampled token), all of
its KV blocks and its computed-token count. The runner then computes the last sampled token as a one-token step
over the cached prompt, as it does for any resumed request, and rebuilds every per-request part (sampling
parameters, penalties' token counts, logits processors, LoRA, M-RoPE positions) from the request. Seeded sampling
is stateless on V2 (seed and position), so the samples are those the default scheduler would draw.

The scheduler keeps which requests the decode runner holds: those it scheduled there and that have stayed decoding
since. A request that left (finished, preempted, reset, back in the prefill lane to be recomputed) arrives again as
new, and V2's runner drops any stale state of it when it is added.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.request import Request


class DecodeRunnerHandoff:
    """The requests whose state the decode runner holds, and the resumption of those it does not."""

    def __init__(self, uses_mrope: bool) -> None:
        self.uses_mrope = uses_mrope
        self.held: set[str] = set()

    def resume_arrivals(
        self,
        decode: SchedulerOutput,
        requests: Mapping[str, Request],
        still_decoding: Callable[[Request], bool],
        block_ids_of: Callable[[str], tuple[list[int], ...]],
    ) -> SchedulerOutput:
        """``decode`` with every scheduled request the decode runner does not hold sent as a resumed new request."""
        self.held = {r for r in self.held if r in requests and still_decoding(requests[r])}
        self.held.difference_update(decode.preempted_req_ids or ())
        cached = decode.scheduled_cached_reqs
        arriving = [i for i, req_id in enumerate(cached.req_ids) if req_id not in self.held]
        self.held.update(decode.num_scheduled_tokens)
        if not arriving:
            return decode
        # vLLM has already advanced each request's computed tokens past this step: the runner needs them before it.
        resumed = []
        for i in arriving:
            request = requests[cached.req_ids[i]]
            new = NewRequestData.from_request(request, block_ids_of(request.request_id), _all_token_ids(request),
                                              uses_mrope=self.uses_mrope)
            resumed.append(dataclasses.replace(new, num_computed_tokens=cached.num_computed_tokens[i]))
        return dataclasses.replace(
            decode,
            scheduled_new_reqs=[*decode.scheduled_new_reqs, *resumed],
            scheduled_cached_reqs=_without(cached, set(arriving)),
        )


def _all_token_ids(request: Request) -> list[int]:
    # vLLM 0.34 names them (Request.prefill_token_ids); 0.32 and 0.33 pass the private list to a resumed request.
    tokens = getattr(request, "prefill_token_ids", None)
    return list(tokens if tokens is not None else request._all_token_ids)


def _without(cached: CachedRequestData, drop: set[int]) -> CachedRequestData:
    """``cached`` less the entries at the indices ``drop``: per-request lists lose those items, per-request sets and
    dicts those request ids (the fields differ between vLLM versions, so they are taken by shape)."""
    gone = {cached.req_ids[i] for i in drop}
    n = len(cached.req_ids)
    fields = {}
    for field in dataclasses.fields(cached):
        value = getattr(cached, field.name)
        if isinstance(value, list) and len(value) == n:
            value = [v for i, v in enumerate(value) if i not in drop]
        elif isinstance(value, set):
            value = value - gone
        elif isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in gone}
        fields[field.name] = value
    return CachedRequestData(**fields)
