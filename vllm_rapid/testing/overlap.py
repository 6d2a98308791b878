"""Reading recorded lane events (``record_lane_events``): did decode keep its pace while a long prefill ran? The
gaps between timestamps it measures that by are the benchmarks' inter-token latencies too."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OverlapSummary:
    """Decode steps around one long prefill batch, from the lanes' own timestamps."""

    prefill_tokens: int
    prefill_ms: float
    decode_steps_during: int
    decode_batch_sizes_during: tuple[int, ...]
    itl_ms_during: float  # median gap between decode step completions while the prefill ran
    itl_ms_alone: float  # the same just before the prefill started
    decode_step_spanning_prefill: bool  # a decode step that waited out the whole prefill (hybrid-batching symptom)

    @property
    def itl_ratio(self) -> float:
        return self.itl_ms_during / self.itl_ms_alone


def summarize_overlap(events: list[dict[str, Any]], min_prefill_tokens: int, window: int = 20) -> OverlapSummary:
    """Summarize decode around the single prefill batch of at least ``min_prefill_tokens`` tokens."""
    prefills = [e for e in events if e["lane"] == "prefill" and e["num_tokens"] >= min_prefill_tokens]
    if len(prefills) != 1:
        raise ValueError(f"expected one prefill batch of >= {min_prefill_tokens} tokens, found {len(prefills)}")
    prefill = prefills[0]
    start, end = prefill["start"], prefill["end"]
    decodes = [e for e in events if e["lane"] == "decode" and e["num_tokens"] > 0]
    during = [e for e in decodes if e["start"] >= start and e["end"] <= end]
    alone = [e for e in decodes if e["end"] <= start][-window:]
    if len(during) < 2 or len(alone) < 2:
        raise ValueError(f"too few decode steps to compare: {len(during)} during, {len(alone)} before the prefill")
    return OverlapSummary(
        prefill_tokens=prefill["num_tokens"],
        prefill_ms=(end - start) * 1e3,
        decode_steps_during=len(during),
        decode_batch_sizes_during=tuple(sorted({e["num_tokens"] for e in during})),
        itl_ms_during=median_gap_ms([e["end"] for e in during]),
        itl_ms_alone=median_gap_ms([e["end"] for e in alone]),
        decode_step_spanning_prefill=any(e["start"] <= start and e["end"] >= end for e in decodes),
    )


def gaps_ms(times: list[float]) -> list[float]:
    """Milliseconds between consecutive timestamps (seconds): inter-token or inter-step latencies."""
    return [(b - a) * 1e3 for a, b in zip(times, times[1:])]


def median_gap_ms(times: list[float]) -> float:
    gaps = gaps_ms(times)
    return statistics.median(gaps) if gaps else float("nan")
