"""Decode step-time models the ARM predicts with: a measured profile table, or a roofline estimate without one.

Both answer "how long is a decode step of this batch on this split, while a prefill runs on the rest of the
device". Pure Python: no torch, no vLLM.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from vllm_rapid.config import read_yaml
from vllm_rapid.lanes.partition.base import PARTITION_LAYOUTS, PartitionLayout, Split

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


@dataclass
class DecodeProfile:
    """Measured decode step times of one model on one device (``vllm-rapid profile``), read from/written to YAML."""

    total_units: int
    decode: list[DecodeSample]
    device: str = ""
    model: str = ""
    backend: str = ""  # the partition backend the splits were measured on
    # The partition layout they were measured in: a shared-pool split and a disjoint one of the same decode size
    # run differently, so the ARM uses a profile only for the layout it was measured in.
    layout: PartitionLayout = "disjoint"

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
        if not decode:
            raise ProfileError("decode has no samples")
        for i, s in enumerate(decode):
            if s.decode_units > total:
                raise ProfileError(f"decode[{i}].decode_units={s.decode_units} exceeds total_units={total}")
        extra = set(data) - {"version", "total_units", "decode", "device", "model", "backend", "layout"}
        if extra:
            raise ProfileError(f"unknown field(s) {sorted(extra)}")
        layout = data.get("layout", "disjoint")
        if layout not in PARTITION_LAYOUTS:
            raise ProfileError(f"layout must be one of {list(PARTITION_LAYOUTS)}, got {layout!r}")
        return cls(
            total, decode, str(data.get("device", "")), str(data.get("model", "")), str(data.get("backend", "")),
            layout,
        )


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
    # Full overlap: decode competes with the prefill for the same units; on a shared pool, for that part of its units.
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
        contended = split.shared_units / split.decode_units
        return 1e3 * seconds * (1.0 + (self.overlap_slowdown - 1.0) * contended)
