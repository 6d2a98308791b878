"""What RAPID reports of its lanes each engine step, from the scheduler (engine core) to the stat logger (frontend).

It travels as plain values in ``SchedulerStats.plugin_stats["rapid"]`` (see ``stats_patch``), the only way a
scheduler's own stats survive the engine-core -> frontend msgpack boundary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vllm_rapid.protocol import ArmState

PLUGIN_KEY = "rapid"


@dataclass
class LaneStats:
    """One engine step's view of the two lanes."""

    # Requests waiting for (the rest of) their prefill and not in the running prefill batch.
    prefill_queue_reqs: int
    # Requests in this step's decode batch.
    decode_batch_reqs: int
    # The prefill batch running on the prefill lane after this step (0/0: none).
    prefill_inflight_reqs: int
    prefill_inflight_tokens: int
    # This step's decode time on the decode lane (None: no decode work this step).
    decode_step_ms: float | None = None
    # A prefill batch that completed on this step: its time on the prefill lane and its tokens.
    prefill_batch_ms: float | None = None
    prefill_batch_tokens: int = 0
    # Requests finished with an error because their lane's batch raised, on this step.
    failed_reqs: int = 0
    arm: ArmState | None = None

    def to_plugin_stats(self) -> dict[str, Any]:
        return {PLUGIN_KEY: dataclasses.asdict(self)}

    @classmethod
    def from_scheduler_stats(cls, scheduler_stats: Any) -> LaneStats | None:
        """The RAPID payload of a (decoded) SchedulerStats, or None when it carries none."""
        payload = (getattr(scheduler_stats, "plugin_stats", None) or {}).get(PLUGIN_KEY)
        if payload is None:
            return None
        arm = payload.get("arm")
        return cls(**{**payload, "arm": ArmState(**arm) if arm is not None else None})
