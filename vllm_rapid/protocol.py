"""What the RAPID scheduler and the RAPID worker exchange through vLLM's executor, on top of vLLM's own types.

The engine step is clocked by decode: its SchedulerOutput is the decode lane's batch. A prefill batch rides along
when the scheduler launches one, and a finished prefill's results ride back on a later step's ModelRunnerOutput.
Both are plain dataclass subclasses, so they cross vLLM's process boundary (pickle) unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput


@dataclass
class PrefillLaunch:
    """A prefill batch for the prefill lane: its own SchedulerOutput and grammar bitmask."""

    batch_id: int
    scheduler_output: SchedulerOutput
    grammar_output: GrammarOutput | None = None


@dataclass
class PrefillResult:
    """A finished prefill batch, sent back on whichever engine step first sees it done."""

    batch_id: int
    output: ModelRunnerOutput


@dataclass
class RapidSchedulerOutput(SchedulerOutput):
    """The decode lane's batch for this step (the inherited fields) plus, optionally, a prefill launch.

    The decode batch's grammar bitmask is computed at schedule time and travels here, so each lane runs a whole
    step (forward and sampling) as one unit.
    """

    grammar: GrammarOutput | None = None
    prefill: PrefillLaunch | None = None
    # What the ARM decides from: the decode batch's mean context and how long the oldest prefill has waited.
    mean_decode_context_len: float = 0.0
    oldest_prefill_wait_ms: float = 0.0

    @classmethod
    def wrap(cls, decode: SchedulerOutput, **rapid_fields) -> RapidSchedulerOutput:
        return cls(**_fields_of(decode, SchedulerOutput), **rapid_fields)


@dataclass
class RapidModelRunnerOutput(ModelRunnerOutput):
    """The decode lane's output for this step plus any prefill batch that finished since the last step."""

    finished_prefill: PrefillResult | None = None

    @classmethod
    def wrap(cls, decode: ModelRunnerOutput, finished_prefill: PrefillResult | None) -> RapidModelRunnerOutput:
        return cls(**_fields_of(decode, ModelRunnerOutput), finished_prefill=finished_prefill)


def _fields_of(obj: object, cls: type) -> dict:
    """Shallow field copy (dataclasses.asdict would deep-copy tensors and token lists)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if f.init}
