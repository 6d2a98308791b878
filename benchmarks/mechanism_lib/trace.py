"""Request traces: Poisson arrivals with prompt/output lengths drawn from a named, seeded distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace; ``arrival_s`` is relative to the start of the run."""

    rid: int
    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class LengthDist:
    """Lognormal lengths (median, sigma), clipped to [lo, hi]."""

    median: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
        raw = rng.lognormal(math.log(self.median * scale), self.sigma, n)
        return np.clip(np.rint(raw), max(1, round(self.lo * scale)), max(1, round(self.hi * scale))).astype(int)


@dataclass(frozen=True)
class TracePreset:
    """Prompt and output length distributions; ``long_fraction`` of prompts are ``long_prompt`` tokens instead."""

    prompt: LengthDist
    output: LengthDist
    long_fraction: float = 0.0
    long_prompt: int = 8192

    def max_prompt(self, scale: float) -> int:
        return max(round(self.prompt.hi * scale), round(self.long_prompt * scale) if self.long_fraction else 0, 1)

    def max_output(self, scale: float) -> int:
        return max(1, round(self.output.hi * scale))


# LMSYS-Chat-like serving mix: prompts average ~2K tokens, answers ~200 (lognormal medians 1800 and 160).
_LMSYS = TracePreset(LengthDist(1800, 0.5, 64, 6144), LengthDist(160, 0.7, 8, 512))
PRESETS: dict[str, TracePreset] = {
    "lmsys": _LMSYS,
    "long": TracePreset(_LMSYS.prompt, _LMSYS.output, long_fraction=0.2, long_prompt=8192),
}


def make_trace(
    preset: str,
    rate: float,
    seed: int,
    *,
    duration_s: float | None = None,
    num_requests: int | None = None,
    length_scale: float = 1.0,
) -> list[TraceRequest]:
    """Poisson arrivals at ``rate`` req/s for ``duration_s`` seconds, or exactly ``num_requests`` of them."""
    if (duration_s is None) == (num_requests is None):
        raise ValueError("give exactly one of duration_s and num_requests")
    rng = np.random.default_rng(seed)
    if num_requests is None:
        n = max(1, int(rate * duration_s * 2 + 20))  # enough gaps, trimmed to the duration below
        arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
        arrivals = arrivals[arrivals < duration_s] if arrivals[0] < duration_s else arrivals[:1]
    else:
        arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests))
    n = len(arrivals)
    spec = PRESETS[preset]
    prompts = spec.prompt.sample(rng, n, length_scale)
    if spec.long_fraction:
        long = rng.random(n) < spec.long_fraction
        prompts[long] = max(1, round(spec.long_prompt * length_scale))
    outputs = spec.output.sample(rng, n, length_scale)
    return [TraceRequest(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs))]
