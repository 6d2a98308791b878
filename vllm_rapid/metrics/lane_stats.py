"""What RAPID reports of its lanes each engine step, from the scheduler (engine core) to the stat logger (frontend).

It travels as plain values in ``SchedulerStats.plugin_stats["rapid"]`` (see ``patch/scheduler_stats.py``), the only
way a scheduler's own stats survive the engine-core -> frontend msgpack boundary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vllm_rapid.lanes.partition.base import Split
from vllm_rapid.protocol import ArmState

PLUGIN_KEY = "rapid"


@dataclass
class StepStats:
    """What one engine step's outputs say of the lanes (filled in while the scheduler processes them)."""

    # Requests in this step's decode batch, and its time on the decode lane (None: no decode work this step).
    decode_batch_reqs: int = 0
    decode_step_ms: float | None = None
    # A prefill batch that completed on this step: its time on the prefill lane and its tokens.
    prefill_batch_ms: float | None = None
    prefill_batch_tokens: int = 0
    # Requests finished with an error because their lane's batch raised, on this step.
    failed_reqs: int = 0
    arm: ArmState | None = None


@dataclass
class LaneStats:
    """One engine step's view of the two lanes: the queues after the step, and the step's own stats."""

    # Requests waiting for (the rest of) their prefill and not in the running prefill batch.
    prefill_queue_reqs: int
    # The prefill batch running on the prefill lane after this step (0/0: none).
    prefill_inflight_reqs: int
    prefill_inflight_tokens: int
    step: StepStats = field(default_factory=StepStats)

    def to_plugin_stats(self) -> dict[str, Any]:
        return {PLUGIN_KEY: dataclasses.asdict(self)}

    @classmethod
    def from_scheduler_stats(cls, scheduler_stats: Any) -> LaneStats | None:
        """The RAPID payload of a (decoded) SchedulerStats, or None when it carries none."""
        payload = (getattr(scheduler_stats, "plugin_stats", None) or {}).get(PLUGIN_KEY)
        if payload is None:
            return None
        step = dict(payload["step"])
        if (arm := step.get("arm")) is not None:
            step["arm"] = ArmState(**{**arm, "split": Split(**arm["split"])})
        return cls(**{**payload, "step": StepStats(**step)})
