"""Adaptive Resource Manager (ARM): how many compute units the decode lane gets at each engine step.

Light load: both lanes on the whole device (the paper's P100-D100), since decode still meets its ITL SLO with a
prefill overlapping it. Heavy load: the smallest decode partition predicted to meet the ITL SLO, so prefill gets the
rest. Predictions come from a measured profile (``vllm-rapid profile``) or, without one, a conservative roofline
estimate, each corrected online by the step times actually observed. Pure Python: no torch, no vLLM.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vllm_rapid.config import RapidConfig, read_yaml
from vllm_rapid.lanes.partition.base import PartitionBackend, Split

logger = logging.getLogger(__name__)

PROFILE_VERSION = 1


class ProfileError(ValueError):
    """A profile file is missing, malformed, of another version, or from another device."""


class StepTimeModel(Protocol):
    """Predicts the decode step time of a batch on a split (while a prefill runs on the rest of the device)."""

    def decode_step_ms(self, split: Split, batch_size: int, context_len: int) -> float: ...


@dataclass(frozen=True)
class DecodeSample:
    """One measured decode step: a batch of ``batch_size`` sequences of ``context_len`` tokens on a split."""

    batch_size: int
    context_len: int
    # decode_units == total_units is the full-overlap split (measured with a prefill on the whole device too).
    decode_units: int
    step_ms: float


@dataclass(frozen=True)
class PrefillSample:
    """Measured prefill throughput on a partition of ``prefill_units`` units."""

    prefill_units: int
    tokens_per_s: float


@dataclass
class DecodeProfile:
    """Measured decode step times and prefill throughputs of one model on one device, read from/written to YAML."""

    total_units: int
    decode: list[DecodeSample]
    prefill: list[PrefillSample] = field(default_factory=list)
    device: str = ""
    model: str = ""

    def decode_step_ms(self, split: Split, batch_size: int, context_len: int) -> float:
        """Conservative lookup: the cheapest sample at or above ``batch_size`` and ``context_len``.

        Beyond the measured grid the time is scaled up linearly in batch and context; a split smaller than any
        measured one is scaled by the unit ratio. All three err towards slower, i.e. a larger decode partition.
        """
        units = sorted({s.decode_units for s in self.decode})
        at_or_below = [u for u in units if u <= split.decode_units]
        measured = at_or_below[-1] if at_or_below else units[0]
        unit_scale = max(1.0, measured / split.decode_units)
        return unit_scale * min(
            s.step_ms * max(1.0, batch_size / s.batch_size) * max(1.0, context_len / s.context_len)
            for s in self.decode
            if s.decode_units == measured
        )

    def prefill_tokens_per_s(self, prefill_units: int) -> float | None:
        """Prefill throughput on the largest measured partition not above ``prefill_units`` (None: not measured)."""
        if not self.prefill:
            return None
        samples = sorted(self.prefill, key=lambda s: s.prefill_units)
        at_or_below = [s for s in samples if s.prefill_units <= prefill_units]
        if at_or_below:
            return at_or_below[-1].tokens_per_s
        return samples[0].tokens_per_s * prefill_units / samples[0].prefill_units

    def save(self, path: str | os.PathLike[str]) -> None:
        import yaml

        data = {"version": PROFILE_VERSION, **asdict(self)}
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DecodeProfile:
        data = read_yaml(path, "ARM profile", ProfileError)
        try:
            return cls.from_dict(data)
        except ProfileError as exc:
            raise ProfileError(f"ARM profile {path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Any) -> DecodeProfile:
        """Validate a parsed profile; every error names the offending field or entry."""
        if not isinstance(data, dict):
            raise ProfileError(f"expected a mapping, got {type(data).__name__}")
        if data.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"version {data.get('version')!r} is not supported (expected {PROFILE_VERSION}); "
                "re-run `vllm-rapid profile`"
            )
        total = data.get("total_units")
        if not isinstance(total, int) or isinstance(total, bool) or total < 1:
            raise ProfileError(f"total_units must be a positive integer, got {total!r}")
        decode = [_sample(DecodeSample, entry, f"decode[{i}]") for i, entry in enumerate(_list(data, "decode"))]
        prefill = [_sample(PrefillSample, entry, f"prefill[{i}]") for i, entry in enumerate(_list(data, "prefill"))]
        if not decode:
            raise ProfileError("decode has no samples")
        for i, s in enumerate(decode):
            if s.decode_units > total:
                raise ProfileError(f"decode[{i}].decode_units={s.decode_units} exceeds total_units={total}")
        extra = set(data) - {"version", "total_units", "decode", "prefill", "device", "model"}
        if extra:
            raise ProfileError(f"unknown field(s) {sorted(extra)}")
        return cls(total, decode, prefill, str(data.get("device", "")), str(data.get("model", "")))


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ProfileError(f"{key} must be a list, got {type(value).__name__}")
    return value


def _sample(cls: type, entry: Any, where: str) -> Any:
    """Build a sample dataclass from a mapping with exactly its fields, all positive (ints where annotated so)."""
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    if not isinstance(entry, dict) or set(entry) != set(names):
        raise ProfileError(f"{where} must be a mapping with keys {names}, got {entry!r}")
    values = {}
    for f in fields:
        value = entry[f.name]
        integral = f.type == "int"  # annotations are strings under `from __future__ import annotations`
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)) or value <= 0:
            kind = "a positive integer" if integral else "a positive number"
            raise ProfileError(f"{where}.{f.name} must be {kind}, got {value!r}")
        values[f.name] = value if integral else float(value)
    return cls(**values)


# Peak HBM bandwidth (bytes/s) and dense bf16 throughput (flop/s) by device-name substring, most specific first.
_DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),
    ("A100", 1.6e12, 312e12),
    ("MI325X", 6.0e12, 1307e12),
    ("MI300X", 5.3e12, 1307e12),
)
# An unknown device is assumed slow: predicted steps come out long and decode gets more units, never fewer.
_UNKNOWN_DEVICE_PEAKS = (1.0e12, 100e12)


@dataclass(frozen=True)
class RooflineEstimate:
    """Decode step ≈ max(bytes moved / attainable bandwidth, flops / attainable compute), for runs without a profile.

    Bandwidth saturates before all units are in use, so a partition keeps full bandwidth down to
    ``bandwidth_saturation`` of the device and loses it proportionally below; compute scales with the units.
    """

    weight_bytes: float
    kv_bytes_per_token: float
    peak_bandwidth: float  # bytes/s
    peak_flops: float  # flop/s in the model's dtype
    total_units: int
    bytes_per_param: float = 2.0
    bandwidth_saturation: float = 0.5
    efficiency: float = 0.6  # attainable share of either peak
    # Full overlap: decode competes with the prefill for the same units.
    overlap_slowdown: float = 1.5

    @classmethod
    def for_device(
        cls, device_name: str, weight_bytes: float, kv_bytes_per_token: float, total_units: int
    ) -> RooflineEstimate:
        """Peaks looked up by device name (e.g. ``torch.cuda.get_device_name()``); unknown devices get low ones."""
        bandwidth, flops = next(
            ((bw, fl) for key, bw, fl in _DEVICE_PEAKS if key.lower() in device_name.lower()), _UNKNOWN_DEVICE_PEAKS
        )
        return cls(weight_bytes, kv_bytes_per_token, bandwidth, flops, total_units)

    def decode_step_ms(self, split: Split, batch_size: int, context_len: int) -> float:
        share = split.decode_units / self.total_units
        bandwidth = self.peak_bandwidth * self.efficiency * min(1.0, share / self.bandwidth_saturation)
        compute = self.peak_flops * self.efficiency * share
        moved = self.weight_bytes + self.kv_bytes_per_token * batch_size * context_len
        flops = 2.0 * self.weight_bytes / self.bytes_per_param * batch_size
        seconds = max(moved / bandwidth, flops / compute)
        return 1e3 * seconds * (self.overlap_slowdown if split.full_overlap else 1.0)


class ArmReason(str, enum.Enum):
    """Why the ARM chose a split, as a closed set (a metrics label); ``ArmDecision.reason`` has the details."""

    START_UP = "start_up"
    POLICY = "policy"
    NO_DECODE = "no_decode"
    LIGHT_LOAD = "light_load"
    HEAVY_LOAD = "heavy_load"
    NO_SPLIT_MEETS_ITL = "no_split_meets_itl"
    TTFT_GUARD = "ttft_guard"
    HYSTERESIS = "hysteresis"


@dataclass(frozen=True)
class ArmDecision:
    """The split for the next step, why (a closed ``kind`` and a readable ``reason``), and the (corrected) decode
    step time predicted on it."""

    split: Split
    kind: ArmReason
    reason: str
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

    def observe_decode_step(self, split: Split, batch_size: int, context_len: int, measured_ms: float) -> None:
        """Fold a measured decode step into the split's correction factor (an EWMA of measured/predicted)."""
        if self._model is None or batch_size == 0:
            return
        previous = self._correction.get(split, 1.0)
        ratio = measured_ms / self._model.decode_step_ms(split, batch_size, context_len)
        # One outlier (a compile, a hiccup) moves the factor by at most alpha x 100%; a real drift still gets there.
        ratio = min(max(ratio, previous / 2.0), previous * 2.0)
        self._correction[split] = (1.0 - self._alpha) * previous + self._alpha * ratio

    def decide(
        self, decode_batch_size: int, mean_context_len: float, prefill_queue_wait_ms: float, prefill_inflight: bool
    ) -> ArmDecision:
        """The split for the next step.

        ``prefill_queue_wait_ms`` is how long the oldest waiting prefill has waited (0 when none waits).
        """
        policy = self.config.arm_policy
        if policy == "full_overlap":
            return ArmDecision(self._full, ArmReason.POLICY, "policy full_overlap")
        if policy == "static":
            return ArmDecision(self._static, ArmReason.POLICY, "policy static")
        context_len = round(mean_context_len)
        target, kind, reason, urgent = self._target(
            decode_batch_size, context_len, prefill_queue_wait_ms, prefill_inflight
        )
        decision = self._hysteresis(target, kind, reason, urgent, decode_batch_size, context_len)
        logger.debug(
            "ARM: batch=%d ctx=%.0f wait=%.1fms inflight=%s -> %s (%s)",
            decode_batch_size, mean_context_len, prefill_queue_wait_ms, prefill_inflight,
            decision.split.label, decision.reason,
        )
        return decision

    def _target(self, batch: int, ctx: int, wait_ms: float, inflight: bool) -> tuple[Split, ArmReason, str, bool]:
        """The split this step would want, ignoring hysteresis; ``urgent`` bypasses hysteresis."""
        if batch == 0:
            return self._full, ArmReason.NO_DECODE, "no decode batch", False
        if not (inflight or wait_ms > 0):
            return self._full, ArmReason.LIGHT_LOAD, "light load: no prefill pending", False
        slo = self.config.itl_slo_ms
        full_ms = self.predict_decode_ms(self._full, batch, ctx)
        if full_ms <= slo:
            reason = f"light load: overlap meets ITL ({full_ms:.1f} <= {slo:g} ms)"
            return self._full, ArmReason.LIGHT_LOAD, reason, False
        predicted = {s: self.predict_decode_ms(s, batch, ctx) for s in self._partitions}
        meeting = [s for s in self._partitions if predicted[s] <= slo]
        if meeting:
            target, kind = meeting[0], ArmReason.HEAVY_LOAD
            reason = f"heavy load: smallest decode partition meeting ITL ({predicted[target]:.1f} <= {slo:g} ms)"
        else:
            predicted[self._full] = full_ms
            target, kind = min(predicted, key=predicted.__getitem__), ArmReason.NO_SPLIT_MEETS_ITL
            reason = f"heavy load: no split meets ITL, fastest predicted ({predicted[target]:.1f} ms)"
        if wait_ms > self._ttft_guard_ms and not target.full_overlap:
            index = self._partitions.index(target)
            if index > 0:
                smaller = self._partitions[index - 1]
                return smaller, ArmReason.TTFT_GUARD, (
                    f"ttft-guard: prefill waited {wait_ms:.0f} ms (> {self._ttft_guard_ms:.0f} ms), "
                    f"prefill gets one step more than {target.label}"
                ), True
        return target, kind, reason, False

    def _hysteresis(
        self, target: Split, kind: ArmReason, reason: str, urgent: bool, batch: int, ctx: int
    ) -> ArmDecision:
        """Switch only once ``target`` has won ``arm_hysteresis_steps`` consecutive decisions (or is urgent)."""
        steps = self.config.arm_hysteresis_steps
        if target == self._current or urgent:
            self._challenger, self._wins = None, 0
        else:
            self._wins = self._wins + 1 if target == self._challenger else 1
            self._challenger = target
            if self._wins < steps:
                kind, reason = ArmReason.HYSTERESIS, (
                    f"hysteresis: keeping {self._current.label}, {target.label} won {self._wins}/{steps} "
                    f"({reason})"
                )
                target = self._current
            else:
                self._challenger, self._wins = None, 0
        self._current = target
        predicted = self.predict_decode_ms(target, batch, ctx) if batch else None
        return ArmDecision(target, kind, reason, predicted)
