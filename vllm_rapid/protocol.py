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

from vllm_rapid.lanes.arm import ArmInputs, DecodeObservation
from vllm_rapid.lanes.partition.base import Split


@dataclass(frozen=True)
class ArmState:
    """The split the lanes run on and why: what logs, tests and metrics see of the ARM."""

    backend: str
    split: Split
    reason: str  # an ArmReason value
    detail: str
    predicted_decode_ms: float | None

    @property
    def label(self) -> str:
        return self.split.label


@dataclass
class PrefillLaunch:
    """A prefill batch for the prefill lane: its own SchedulerOutput and grammar bitmask."""

    batch_id: int
    scheduler_output: SchedulerOutput
    grammar_output: GrammarOutput | None = None


@dataclass
class PrefillResult:
    """A finished prefill batch, sent back on whichever engine step first sees it done.

    A batch that raised has no output and an ``error``: its requests fail, nothing else does.
    """

    batch_id: int
    output: ModelRunnerOutput | None
    elapsed_ms: float = 0.0  # the batch's time on the prefill lane
    error: str | None = None


@dataclass
class RapidSchedulerOutput(SchedulerOutput):
    """The decode lane's batch for this step (the inherited fields) plus, optionally, a prefill launch.

    The decode batch's grammar bitmask is computed at schedule time and travels here, so each lane runs a whole
    step (forward and sampling) as one unit.
    """

    grammar: GrammarOutput | None = None
    prefill: PrefillLaunch | None = None
    # What every rank's ARM decides this step from, and the last decode step the output rank measured: the same
    # values on every tensor-parallel rank, so every rank runs the same split.
    arm_inputs: ArmInputs = ArmInputs(0, 0.0, 0.0, False)
    decode_observation: DecodeObservation | None = None
    # The last prefill batch whose result the scheduler has processed (from the output rank). With tensor
    # parallelism, a rank whose prefill lane finished that batch later than the output rank's waits for it here.
    last_completed_prefill: int = -1

    @classmethod
    def wrap(cls, decode: SchedulerOutput, **rapid_fields) -> RapidSchedulerOutput:
        return cls(**_fields_of(decode, SchedulerOutput), **rapid_fields)


@dataclass
class RapidModelRunnerOutput(ModelRunnerOutput):
    """The decode lane's output for this step plus any prefill batch that finished since the last step, and what
    the scheduler's stats report of the lanes (the decode step's time, the ARM's split)."""

    finished_prefill: PrefillResult | None = None
    decode_step_ms: float | None = None  # the decode lane's time for this step's batch (None: no decode work)
    arm_state: ArmState | None = None
    # The decode batch raised: its requests fail (the inherited fields are then empty).
    decode_error: str | None = None

    @classmethod
    def wrap(cls, decode: ModelRunnerOutput, **rapid_fields) -> RapidModelRunnerOutput:
        return cls(**_fields_of(decode, ModelRunnerOutput), **rapid_fields)


def _fields_of(obj: object, cls: type) -> dict:
    """Shallow field copy (dataclasses.asdict would deep-copy tensors and token lists)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if f.init}
