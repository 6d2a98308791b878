"""The Adaptive Resource Manager's seat in the worker: each step, pick the split and give each lane its partition.

The partition backend (green contexts, CU masks, streams or CPU threads) pre-creates the splits; the ARM chooses
one per engine step from the decode batch, its context length and the prefill queue's wait, and learns from the
decode steps it observes. A prefill batch keeps the partition it was launched on (a running batch cannot move).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_rapid.lanes.arm import (
    AdaptiveResourceManager,
    ArmDecision,
    ArmReason,
    RooflineEstimate,
)
from vllm_rapid.config import RapidConfig
from vllm_rapid.lanes.lane import ContextFactory
from vllm_rapid.lanes.partition import create_partition_backend
from vllm_rapid.protocol import ArmState, RapidSchedulerOutput


@dataclass(frozen=True)
class LaneContexts:
    """The decision for one step and the context each lane enters for it."""

    decision: ArmDecision
    decode: ContextFactory
    prefill: ContextFactory


class LaneController:
    """Owns the partition backend and the ARM of one worker."""

    def __init__(self, config: RapidConfig, device_kind: str, device_index: int) -> None:
        self.config = config
        self.device_kind = device_kind
        self.device_index = device_index
        self.backend = create_partition_backend(config.partition_backend, device_kind, device_index=device_index)
        self.arm: AdaptiveResourceManager | None = None
        self.last_decision = ArmDecision(self.backend.full_split(), ArmReason.START_UP, "start-up")

    def attach_model(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], num_kv_tokens: int) -> None:
        """Build the ARM once weights and KV are known (its roofline estimate needs their sizes)."""
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        kv_bytes = sum(t.numel() * t.element_size() for t in kv_caches)
        device_name = torch.cuda.get_device_name(self.device_index) if self.device_kind == "cuda" else "cpu"
        roofline = RooflineEstimate.for_device(
            device_name, weight_bytes, kv_bytes / max(num_kv_tokens, 1), self.backend.total_units
        )
        self.arm = AdaptiveResourceManager(self.config, self.backend, roofline=roofline)

    def contexts_for(self, step: RapidSchedulerOutput, prefill_inflight: bool) -> LaneContexts:
        if self.arm is None:
            raise RuntimeError("LaneController.attach_model() must run before the first step")
        decision = self.arm.decide(
            step.total_num_scheduled_tokens, step.mean_decode_context_len, step.oldest_prefill_wait_ms,
            prefill_inflight,
        )
        self.last_decision = decision
        decode, prefill = self.backend.lane_contexts(decision.split)
        return LaneContexts(decision, decode, prefill)

    def observe_decode(self, step: RapidSchedulerOutput, measured_ms: float) -> None:
        if self.arm is not None and step.total_num_scheduled_tokens:
            self.arm.observe_decode_step(
                self.last_decision.split, step.total_num_scheduled_tokens, round(step.mean_decode_context_len),
                measured_ms,
            )

    def state(self) -> ArmState:
        """The split in use and why."""
        decision = self.last_decision
        return ArmState(
            backend=self.backend.name,
            split=decision.split.label,
            decode_units=decision.split.decode_units,
            prefill_units=decision.split.prefill_units,
            total_units=decision.split.total_units,
            reason_kind=decision.kind.value,
            reason=decision.reason,
            predicted_decode_ms=decision.predicted_decode_ms,
        )

    def close(self) -> None:
        self.backend.close()
