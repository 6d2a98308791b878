"""Adaptive Resource Manager (ARM): how many compute units the decode lane gets at each engine step.

Light load: both lanes on the whole device (the paper's P100-D100), since decode still meets its ITL SLO with a
prefill overlapping it. Heavy load: the smallest decode partition predicted to meet the ITL SLO, so prefill gets the
rest. Predictions come from a step-time model (:mod:`vllm_rapid.lanes.step_time`), corrected online by the decode
steps observed. Pure Python: no torch, no vLLM.

Decisions depend only on the ``ArmInputs`` and ``DecodeObservation`` values fed in, so ARMs fed the same values (one
per tensor-parallel rank, fed by the scheduler) choose the same splits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_rapid.config import RapidConfig
from vllm_rapid.lanes.lane import Label
from vllm_rapid.lanes.partition.base import PartitionBackend, Split
from vllm_rapid.lanes.step_time import DecodeProfile, ProfileError, RooflineEstimate, StepTimeModel

logger = logging.getLogger(__name__)


class ArmReason(Label):
    """Why the ARM chose a split, as a closed set (a metrics label); ``ArmDecision.detail`` says more."""

    START_UP = "start_up"
    POLICY = "policy"
    NO_DECODE = "no_decode"
    LIGHT_LOAD = "light_load"
    HEAVY_LOAD = "heavy_load"
    NO_SPLIT_MEETS_ITL = "no_split_meets_itl"
    TTFT_GUARD = "ttft_guard"
    HYSTERESIS = "hysteresis"
    # On a GPU: the decode batch has no CUDA graph captured on the chosen partition, so decode runs on the whole device
    # this step (set by the worker, never by the ARM).
    NO_DECODE_GRAPH = "no_decode_graph"


@dataclass(frozen=True)
class ArmInputs:
    """What the ARM decides one step from."""

    decode_batch_size: int
    mean_context_len: float  # of the decode batch
    prefill_wait_ms: float  # how long the oldest request waiting for (the rest of) its prefill has waited; 0: none
    prefill_inflight: bool  # a prefill batch runs (or starts) on the prefill lane during this step

    @classmethod
    def of(
        cls, decode_context_lens: Sequence[int], pending_prefill_arrivals: Sequence[float], prefill_inflight: bool,
        now: float | None = None,
    ) -> ArmInputs:
        """From the decode batch's context lengths and the arrival times (``time.time()`` clock, unless ``now`` is
        given on another) of the requests still waiting for (the rest of) their prefill."""
        now = time.time() if now is None else now
        mean = sum(decode_context_lens) / len(decode_context_lens) if decode_context_lens else 0.0
        wait = max(0.0, (now - min(pending_prefill_arrivals)) * 1e3) if pending_prefill_arrivals else 0.0
        return cls(len(decode_context_lens), mean, wait, prefill_inflight)


@dataclass(frozen=True)
class DecodeObservation:
    """One decode step as it ran: what the ARM corrects its predictions from."""

    split: Split
    batch_size: int
    context_len: int
    step_ms: float


@dataclass(frozen=True)
class ArmDecision:
    """The split for the next step, why, and the (corrected) decode step time predicted on it."""

    split: Split
    reason: ArmReason
    detail: str
    predicted_decode_ms: float | None = None


class AdaptiveResourceManager:
    """Chooses, each engine step, which pre-created split of the backend the two lanes run on."""

    def __init__(
        self,
        config: RapidConfig,
        backend: PartitionBackend,
        *,
        profile: DecodeProfile | None = None,
        roofline: RooflineEstimate | None = None,
        correction_alpha: float = 0.1,
        ttft_guard_fraction: float = 0.8,
    ) -> None:
        """``profile`` (default: loaded from ``config.profile_path``) wins over ``roofline``; the adaptive policy
        needs one of them."""
        self.config = config
        self._partitions = [s for s in backend.splits() if not s.full_overlap]
        self._full = backend.full_split()
        # Whether both lanes may run at once on the full split (CPU threads: no, they would oversubscribe the cores).
        self._overlap_on_full = backend.full_split_runs_both_lanes
        self._static = backend.round_split(round(config.static_decode_fraction * backend.total_units))
        self._alpha = correction_alpha
        self._ttft_guard_ms = ttft_guard_fraction * config.ttft_slo_ms
        self._correction: dict[Split, float] = {}
        self._current = self._full
        self._challenger: Split | None = None
        self._wins = 0
        if profile is None and config.profile_path is not None:
            profile = DecodeProfile.load(config.profile_path)
        if profile is not None and profile.total_units != backend.total_units:
            raise ProfileError(
                f"profile measured on a device with {profile.total_units} units ({profile.device or 'unknown'}), "
                f"this one has {backend.total_units}; re-run `vllm-rapid profile` on this GPU"
            )
        if profile is not None and profile.layout != backend.layout:
            raise ProfileError(
                f"profile measured in the {profile.layout!r} partition layout, this backend runs {backend.layout!r}; "
                f"re-run `vllm-rapid profile --layout {backend.layout}`"
            )
        self._model: StepTimeModel | None = profile if profile is not None else roofline
        if self._model is None and config.arm_policy == "adaptive":
            raise ValueError("the adaptive ARM policy needs a profile (rapid.profile_path) or a roofline estimate")
        if profile is None and roofline is not None:
            logger.warning(
                "ARM: no profile (rapid.profile_path unset), decode step times are a conservative roofline "
                "ESTIMATE corrected online; run `vllm-rapid profile` for measured numbers"
            )

    @property
    def current_split(self) -> Split:
        return self._current

    def predict_decode_ms(self, split: Split, batch_size: int, context_len: int) -> float:
        """Model prediction times the split's online correction factor."""
        if self._model is None:
            raise RuntimeError(f"the {self.config.arm_policy!r} ARM policy has no step-time model to predict with")
        raw = self._model.decode_step_ms(split, batch_size, context_len)
        return raw * self._correction.get(split, 1.0)

    def observe(self, step: DecodeObservation) -> None:
        """Fold a measured decode step into its split's correction factor (an EWMA of measured/predicted)."""
        if self._model is None or step.batch_size == 0:
            return
        previous = self._correction.get(step.split, 1.0)
        ratio = step.step_ms / self._model.decode_step_ms(step.split, step.batch_size, step.context_len)
        # One outlier (a compile, a hiccup) moves the factor by at most alpha x 100%; a real drift still gets there.
        ratio = min(max(ratio, previous / 2.0), previous * 2.0)
        self._correction[step.split] = (1.0 - self._alpha) * previous + self._alpha * ratio

    def decide(self, inputs: ArmInputs) -> ArmDecision:
        """The split for the next step."""
        policy = self.config.arm_policy
        if policy in ("full_overlap", "static"):
            self._current = self._full if policy == "full_overlap" else self._static
            return ArmDecision(self._current, ArmReason.POLICY, f"policy {policy}")
        context_len = round(inputs.mean_context_len)
        target, reason, detail, urgent = self._target(inputs, context_len)
        decision = self._hysteresis(target, reason, detail, urgent, inputs.decode_batch_size, context_len)
        logger.debug("ARM: %s -> %s (%s)", inputs, decision.split.label, decision.detail)
        return decision

    def _target(self, inputs: ArmInputs, ctx: int) -> tuple[Split, ArmReason, str, bool]:
        """The split this step would want, ignoring hysteresis; ``urgent`` bypasses hysteresis."""
        batch, wait_ms = inputs.decode_batch_size, inputs.prefill_wait_ms
        if batch == 0:
            return self._full, ArmReason.NO_DECODE, "no decode batch", False
        if not (inputs.prefill_inflight or wait_ms > 0):
            # Where the lanes cannot share the full split, returning to it is always the better split: no waiting.
            return self._full, ArmReason.LIGHT_LOAD, "light load: no prefill pending", not self._overlap_on_full
        slo = self.config.itl_slo_ms
        predicted: dict[Split, float] = {}
        if self._overlap_on_full or not self._partitions:
            full_ms = predicted[self._full] = self.predict_decode_ms(self._full, batch, ctx)
            if full_ms <= slo:
                detail = f"light load: overlap meets ITL ({full_ms:.1f} <= {slo:g} ms)"
                return self._full, ArmReason.LIGHT_LOAD, detail, False
        # Leaving a full split that cannot hold both lanes at once cannot wait for hysteresis.
        leave_full_now = not self._overlap_on_full and self._current.full_overlap
        partitions = {s: self.predict_decode_ms(s, batch, ctx) for s in self._partitions}
        meeting = [s for s in self._partitions if partitions[s] <= slo]
        if meeting:
            target, reason = meeting[0], ArmReason.HEAVY_LOAD
            detail = f"heavy load: smallest decode partition meeting ITL ({partitions[target]:.1f} <= {slo:g} ms)"
        else:
            predicted |= partitions
            target, reason = min(predicted, key=predicted.__getitem__), ArmReason.NO_SPLIT_MEETS_ITL
            detail = f"heavy load: no split meets ITL, fastest predicted ({predicted[target]:.1f} ms)"
        if wait_ms > self._ttft_guard_ms and not target.full_overlap:
            index = self._partitions.index(target)
            if index > 0:
                smaller = self._partitions[index - 1]
                return smaller, ArmReason.TTFT_GUARD, (
                    f"ttft-guard: prefill waited {wait_ms:.0f} ms (> {self._ttft_guard_ms:.0f} ms), "
                    f"prefill gets one step more than {target.label}"
                ), True
        return target, reason, detail, leave_full_now

    def _hysteresis(
        self, target: Split, reason: ArmReason, detail: str, urgent: bool, batch: int, ctx: int
    ) -> ArmDecision:
        """Switch only once ``target`` has won ``arm_hysteresis_steps`` consecutive decisions (or is urgent)."""
        steps = self.config.arm_hysteresis_steps
        if target == self._current or urgent:
            self._challenger, self._wins = None, 0
        else:
            self._wins = self._wins + 1 if target == self._challenger else 1
            self._challenger = target
            if self._wins < steps:
                reason, detail = ArmReason.HYSTERESIS, (
                    f"hysteresis: keeping {self._current.label}, {target.label} won {self._wins}/{steps} "
                    f"({detail})"
                )
                target = self._current
            else:
                self._challenger, self._wins = None, 0
        self._current = target
        predicted = self.predict_decode_ms(target, batch, ctx) if batch else None
        return ArmDecision(target, reason, detail, predicted)
