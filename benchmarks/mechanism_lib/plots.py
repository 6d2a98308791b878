"""The benchmark's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from benchmarks.mechanism_lib.metrics import GOODPUT_ATTAINMENT, RunSummary


def plot_goodput(path: Path, by_policy: dict[str, list[RunSummary]], goodputs: dict[str, float]) -> None:
    """SLO attainment and throughput vs request rate; goodput is where attainment last clears 90%."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, runs in by_policy.items():
        rates = [r.rate for r in runs]
        left.plot(rates, [r.slo_attainment for r in runs], marker="o", label=f"{policy} (goodput {goodputs[policy]:g})")
        right.plot(rates, [r.throughput_tok_s for r in runs], marker="o", label=policy)
    left.axhline(GOODPUT_ATTAINMENT, color="grey", linestyle="--", linewidth=1)
    left.set(xlabel="request rate (req/s)", ylabel="SLO attainment", ylim=(-0.02, 1.02), title="SLO attainment")
    right.set(xlabel="request rate (req/s)", ylabel="output tokens/s", title="throughput")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_itl_cdf(path: Path, itls_ms: dict[str, list[float]], rate: float, itl_slo_ms: float) -> None:
    """Distribution of every inter-token gap, per policy, at one rate."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for policy, values in itls_ms.items():
        if values:
            ax.plot(np.sort(values), np.linspace(0, 1, len(values), endpoint=False), label=policy)
    ax.axvline(itl_slo_ms, color="grey", linestyle="--", linewidth=1, label="ITL SLO")
    ax.set(xscale="log", xlabel="inter-token latency (ms)", ylabel="fraction of gaps",
           title=f"ITL CDF at {rate:g} req/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_partition(path: Path, timelines: dict[float, list[tuple[float, int]]], total_units: int) -> None:
    """Decode units the ARM gave each decode step of lanes-arm, over time, per rate."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for rate, points in timelines.items():
        if points:
            times, units = zip(*points)
            ax.step(times, units, where="post", label=f"{rate:g} req/s", linewidth=1)
    ax.set(xlabel="time (s)", ylabel="decode units", ylim=(0, total_units * 1.05),
           title=f"lanes-arm: decode partition over time ({total_units} units = full overlap)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
