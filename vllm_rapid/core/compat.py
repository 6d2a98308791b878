"""The engine-core side's differences between the vLLM releases RAPID supports (0.32, 0.33, 0.34), in one place.

Each name below says which releases it is about; the internals they touch are entries of
``vllm_rapid/patch/internals.py`` restricted to the same releases, so a vLLM that moves them still fails at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request

from vllm_rapid.patch.versions import vllm_in

# 0.32, 0.33: vLLM's scheduler tells the V1 runner which requests it scheduled in the previous step
# (Scheduler.prev_step_scheduled_req_ids); 0.34 removed it with the V1 runner.
HAS_PREV_STEP_SCHEDULED_REQ_IDS = vllm_in(before="0.34")

# The scheduler's waiting queues beyond ``waiting`` and ``kv_holding_waiting``, which the decode pass empties (it
# admits nobody). 0.34: requests that may load KV asynchronously (--max-num-inflight-kv-loads) wait apart.
EXTRA_WAITING_QUEUES: tuple[str, ...] = ("async_kv_waiting",) if vllm_in(since="0.34") else ()


def model_runner_output(req_ids: list[str], **fields: Any) -> ModelRunnerOutput:
    """A ModelRunnerOutput of ``req_ids``; 0.32 and 0.33 also index them (``req_id_to_index``, gone in 0.34)."""
    if vllm_in(before="0.34"):
        fields["req_id_to_index"] = {r: i for i, r in enumerate(req_ids)}
    return ModelRunnerOutput(req_ids=req_ids, **fields)


class PrefillCadence:
    """vLLM 0.33's local prefill cadence (``--prefill-schedule-interval N``), counted in engine steps.

    vLLM holds prefill while a request decodes until N executed steps have passed since the last step that carried
    prefill, unless the last release step could not drain the waiting queue (``prefill_capacity_bound``). Its
    counters advance in every ``Scheduler.schedule`` call; RAPID calls that twice per engine step, once per lane, so
    vLLM's own gate is turned off (``local_prefill_interval = 1``) and applied here once per engine step: a prefill
    batch is launched only on a step vLLM's rule would let prefill run, and the step that launches it restarts the
    interval. A batch in flight spans several steps; the next one may launch as soon as it completes once the
    interval has passed since its launch. ``num_executed_steps`` and ``last_prefill_step`` keep vLLM's meaning, in
    engine steps. On 0.32 (no local cadence) it never holds.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.interval: int = getattr(scheduler, "local_prefill_interval", 1)
        if self.interval > 1:
            scheduler.local_prefill_interval = 1  # vLLM's per-call gate off: both lanes' passes see no cadence
        self.executed_steps = 0
        self.last_prefill_step = -self.interval  # a full interval back, so the first step is never held

    def holds(self, capacity_bound: bool, running: Iterable[Request]) -> bool:
        """Whether this engine step holds prefill back (decided before the lanes' passes, as vLLM does)."""
        if self.interval <= 1 or capacity_bound:
            return False
        if (self.executed_steps + 1) - self.last_prefill_step >= self.interval:
            return False
        return any(not r.is_prefill_chunk for r in running)

    def count(self, scheduled_tokens: int, launched_prefill: bool) -> None:
        """After the passes: count the engine step if it scheduled anything; a prefill launch restarts the interval."""
        if not hasattr(self.scheduler, "num_executed_steps"):  # 0.32
            return
        if scheduled_tokens > 0:
            self.executed_steps += 1
        if launched_prefill:
            self.last_prefill_step = self.executed_steps
        self.scheduler.num_executed_steps = self.executed_steps
        self.scheduler.last_prefill_step = self.last_prefill_step
