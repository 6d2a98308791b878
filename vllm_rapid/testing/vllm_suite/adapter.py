"""RapidScheduler seen through vLLM's one-batch step, so vLLM's own scheduler tests can drive it.

vLLM's tests (``tests/v1/core``) call ``schedule()``, expect every scheduled request in the SchedulerOutput, answer
with one ModelRunnerOutput and call ``update_from_output``. RAPID's step carries two batches: the decode lane's (the
inherited fields) and, when one is launched, the prefill lane's (``RapidSchedulerOutput.prefill``), whose result
comes back as ``RapidModelRunnerOutput.finished_prefill``. ``CombinedRapidScheduler`` plays RapidWorker with a
prefill lane that finishes within its launch step: it merges both batches into the output the test sees and, given
the test's ModelRunnerOutput, hands RapidScheduler the decode part and the prefill result. Everything else is
RapidScheduler's own code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.config import VllmConfig
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.kv_cache_interface import KVCacheConfig, MambaSpec
from vllm.v1.outputs import ModelRunnerOutput

from vllm_rapid.core.scheduler import RapidScheduler
from vllm_rapid.policy import check_rapid_config
from vllm_rapid.protocol import PrefillResult, RapidModelRunnerOutput, RapidSchedulerOutput

# Per-step (not per-request) fields of a ModelRunnerOutput: they belong to the decode part, whose update makes
# the step's stats, and must not be counted twice.
_PER_STEP_OUTPUT_FIELDS = ("kv_connector_output", "ec_connector_output", "cudagraph_stats")
# Per-request maps the engine core (or a test in its place) may change on a step's output between schedule() and
# update_from_output() (update_draft_token_ids_in_output does): carried back to each lane's own output.
_SET_AFTER_SCHEDULING = ("scheduled_spec_decode_tokens", "num_invalid_spec_tokens")
# A setting, not a count: each lane's pass picks it for its own batch.
_PER_BATCH_SETTING = "num_spec_tokens_to_schedule"
# vLLM 0.34: the runner may skip drafting for a batch none of whose requests can use drafts; the merged batch may
# only if every lane that scheduled work may (each RAPID lane's runner gets its own batch's flag).
_SKIP_FLAG = "skip_drafts"


@dataclass
class CombinedSchedulerOutput(SchedulerOutput):
    """Both lanes' batches of one RAPID step as one SchedulerOutput, and the step they came from."""

    rapid_step: RapidSchedulerOutput | None = None


class CombinedRapidScheduler(RapidScheduler):
    """RapidScheduler whose steps look like vLLM's: one batch out, one output in, the prefill done in the step."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, *args: Any, **kwargs: Any) -> None:
        # What `--scheduler rapid` refuses at start-up never reaches RapidScheduler; tests that build it are refused.
        check_rapid_config(vllm_config)
        if any(isinstance(g.kv_cache_spec, MambaSpec) for g in kv_cache_config.kv_cache_groups):
            raise ValueError("--scheduler rapid does not support hybrid (Mamba) models yet")
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self._built = True

    @property
    def use_v2_model_runner(self) -> bool:
        return False  # no runner plays the step: vLLM's tests see the V1 runner's view (no decode-runner handoff)

    @use_v2_model_runner.setter
    def use_v2_model_runner(self, value: bool) -> None:
        # vLLM's Scheduler copies the config's choice (0.33 defaults to V2); a test that asks for V2 later is refused.
        if value and getattr(self, "_built", False):
            raise ValueError("the combined RAPID step presents vLLM's V1 model runner only")

    def schedule(self, throttle_prefills: bool = False) -> CombinedSchedulerOutput:
        step = super().schedule(throttle_prefills)
        lanes = _lanes(step)
        merged = {f.name: _merge_values([getattr(o, f.name) for o in lanes]) for f in _init_fields(SchedulerOutput)}
        # The lanes that scheduled work must agree on it (the decode lane's when neither did).
        busy = [o for o in lanes if o.total_num_scheduled_tokens] or lanes[:1]
        settings = {getattr(o, _PER_BATCH_SETTING) for o in busy}
        if len(settings) > 1:
            raise ValueError(f"the lanes' batches chose different {_PER_BATCH_SETTING}: {sorted(settings)}")
        merged[_PER_BATCH_SETTING] = settings.pop()
        if _SKIP_FLAG in merged:
            merged[_SKIP_FLAG] = all(getattr(o, _SKIP_FLAG) for o in busy)
        return CombinedSchedulerOutput(**merged, rapid_step=step)

    def get_grammar_bitmask(self, scheduler_output: SchedulerOutput) -> GrammarOutput | None:
        """The bitmasks RAPID shipped with the step's two batches, stacked in the order of their request ids."""
        if not isinstance(scheduler_output, CombinedSchedulerOutput) or scheduler_output.rapid_step is None:
            return super().get_grammar_bitmask(scheduler_output)
        step = scheduler_output.rapid_step
        launched = step.prefill.grammar_output if step.prefill is not None else None
        grammars = [g for g in (step.grammar, launched) if g is not None]
        if not grammars:
            return None
        return GrammarOutput(
            [req_id for g in grammars for req_id in g.structured_output_request_ids],
            np.concatenate([g.grammar_bitmask for g in grammars]),
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> dict[int, EngineCoreOutputs]:
        """Split the test's output: requests are looked up by id, so both parts keep the whole per-request data."""
        if not isinstance(scheduler_output, CombinedSchedulerOutput) or scheduler_output.rapid_step is None:
            return super().update_from_output(scheduler_output, model_runner_output)
        step = scheduler_output.rapid_step
        for lane in _lanes(step):
            for name in _SET_AFTER_SCHEDULING:
                if (edited := getattr(scheduler_output, name)) is not None:
                    setattr(lane, name, {r: v for r, v in edited.items() if r in lane.num_scheduled_tokens})
        finished = None
        if step.prefill is not None:
            prefill_part = dataclasses.replace(model_runner_output, **dict.fromkeys(_PER_STEP_OUTPUT_FIELDS))
            finished = PrefillResult(step.prefill.batch_id, prefill_part)
        decode = RapidModelRunnerOutput.wrap(model_runner_output, finished_prefill=finished)
        return super().update_from_output(step, decode)


def _lanes(step: RapidSchedulerOutput) -> list[SchedulerOutput]:
    """The step's batches: the decode lane's, then the prefill lane's if one was launched."""
    return [step] if step.prefill is None else [step, step.prefill.scheduler_output]


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _merge_values(values: list[Any]) -> Any:
    """One field of the merged output: sequences concatenated, maps and sets united, flags or-ed, counts added;
    nested dataclasses field by field; anything else (connector metadata, which RAPID refuses) must be one object."""
    present = [v for v in values if v is not None]
    if len(present) <= 1:
        return present[0] if present else None
    first = present[0]
    if isinstance(first, bool):
        return any(present)
    if isinstance(first, int):
        return sum(present)
    if isinstance(first, list):
        return [x for v in present for x in v]
    if isinstance(first, dict):
        return {k: x for v in present for k, x in v.items()}
    if isinstance(first, set):
        return set().union(*present)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        cls: Any = type(first)
        return cls(**{f.name: _merge_values([getattr(v, f.name) for v in present]) for f in _init_fields(cls)})
    if any(v is not first for v in present):
        raise ValueError(f"each lane carries its own {type(first).__name__}; they cannot be merged")
    return first
