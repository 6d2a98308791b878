"""Latency, throughput and SLO metrics of the runs; goodput over the rate sweep; the physical overlap bound."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.mechanism_lib.engine import RunResult
from vllm_rapid.testing.overlap import gaps_ms

GOODPUT_ATTAINMENT = 0.9
# Statistic of a request's own inter-token gaps compared with the ITL SLO. The ARM steers every decode step to the
# ITL SLO, so a tail statistic is the consistent default; "mean" is DistServe's / vLLM's TPOT.
ITL_SLO_STATS = ("mean", "p50", "p90", "p95", "p99", "max")


def itl_stat(gaps_ms: list[float], stat: str) -> float:
    if stat == "mean":
        return float(np.mean(gaps_ms))
    return float(np.max(gaps_ms) if stat == "max" else np.percentile(gaps_ms, float(stat[1:])))


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p95: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values: list[float]) -> Percentiles | None:
        if not values:
            return None
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        return cls(float(p50), float(p95), float(p99), float(np.mean(values)))


@dataclass(frozen=True)
class RunSummary:
    policy: str
    rate: float
    num_requests: int
    finished: int
    prompt_tokens: int  # prefilled, over all steps
    output_tokens: int
    duration_s: float  # first arrival to last token
    throughput_tok_s: float
    ttft_ms: Percentiles | None
    itl_ms: Percentiles | None  # over every gap between consecutive tokens of a request
    # A request meets the SLOs if it finished, its TTFT <= the TTFT SLO and the chosen statistic of its ITLs
    # (``itl_slo_stat``) <= the ITL SLO.
    slo_attainment: float
    num_steps: int
    max_prefill_tokens_per_step: int
    max_decodes_per_step: int
    prefill_busy_s: float  # summed step durations that carried prefill tokens
    decode_busy_s: float  # summed durations of decode-only steps


def summarize(run: RunResult, ttft_slo_ms: float, itl_slo_ms: float, itl_slo_stat: str = "p99") -> RunSummary:
    ttfts, itls, met = [], [], 0
    for state in run.requests:
        times = state.token_times
        if not times:
            continue
        ttft = 1e3 * (times[0] - state.req.arrival_s)
        gaps = gaps_ms(times)
        ttfts.append(ttft)
        itls.extend(gaps)
        done = state.generated >= state.req.output_len
        met += done and ttft <= ttft_slo_ms and (not gaps or itl_stat(gaps, itl_slo_stat) <= itl_slo_ms)
    last = max((s.token_times[-1] for s in run.requests if s.token_times), default=0.0)
    first = min((s.req.arrival_s for s in run.requests), default=0.0)
    duration = max(last - first, 1e-9)
    output = sum(s.generated for s in run.requests)
    n = len(run.requests)
    return RunSummary(
        policy=run.policy,
        rate=run.rate,
        num_requests=n,
        finished=sum(s.generated >= s.req.output_len for s in run.requests),
        prompt_tokens=sum(step.prefill_tokens for step in run.steps),
        output_tokens=output,
        duration_s=duration,
        throughput_tok_s=output / duration,
        ttft_ms=Percentiles.of(ttfts),
        itl_ms=Percentiles.of(itls),
        slo_attainment=met / n if n else 0.0,
        num_steps=len(run.steps),
        max_prefill_tokens_per_step=max((s.prefill_tokens for s in run.steps), default=0),
        max_decodes_per_step=max((s.num_decodes for s in run.steps), default=0),
        prefill_busy_s=sum(s.end_s - s.start_s for s in run.steps if s.prefill_tokens),
        decode_busy_s=sum(s.end_s - s.start_s for s in run.steps if not s.prefill_tokens),
    )


def goodput(summaries: list[RunSummary]) -> float:
    """The highest swept rate at which at least 90% of requests met both SLOs (0 if none)."""
    return max((s.rate for s in summaries if s.slo_attainment >= GOODPUT_ATTAINMENT), default=0.0)


@dataclass(frozen=True)
class OverlapBound:
    """From the serial run's steps, each of which ran alone on the device: total prefill compute time P and
    total decode time D (memory-bound). Serial needs P + D of device time; perfect overlap at best max(P, D)."""

    prefill_s: float
    decode_s: float
    serial_s: float
    overlap_s: float
    max_speedup: float

    @classmethod
    def from_serial(cls, serial: RunSummary) -> OverlapBound:
        p, d = serial.prefill_busy_s, serial.decode_busy_s
        return cls(p, d, p + d, max(p, d), (p + d) / max(p, d, 1e-12))

