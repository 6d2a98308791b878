"""GPU mechanism benchmark: RAPID's lanes, partition backend and ARM vs serial and chunked-prefill scheduling.

A discrete step simulator driven by real kernels and the wall clock: requests of a seeded trace (Poisson arrivals,
lengths from a preset) arrive by wall clock; each policy schedules steps of a random-weight Llama-3-8B-shaped stack
(real bf16 GEMMs, attention over a paged KV cache; decode steps as CUDA graphs per batch bucket and split) onto
the project's own Lanes, on the splits of its partition backend, the ARM choosing them for ``lanes-arm``. All
policies run the same trace at each rate. Needs torch (+ triton and cuda-bindings on NVIDIA), never vLLM. From the
repository root:

    python -m benchmarks.mechanism --rates 4,10,16 --duration-s 8 --drain-timeout-s 10   # H200, ~6 min
    python -m benchmarks.mechanism --device cpu --hidden-size 64 ...                      # CPU smoke (see tests)

The two-lane policies: ``lanes`` (both lanes always on the whole device), ``lanes-static`` and ``lanes-arm``
(disjoint partitions: a fixed split, or the ARM's), and ``lanes-shared-static`` / ``lanes-shared-arm`` (the
shared-pool layout: each lane a floor plus a pool both may use, ``--shared-pool-fraction`` of the device; needs SM or
CU partitions, so not on CPU). An ``--arm-profile`` drives the ARM of the layout it was measured in; the other layout's
ARM uses the roofline estimate.

``--itl-slo-ms auto`` picks an SLO at which the ARM must partition: midway between the full split's and the fastest
partition's predicted decode step at a mid load (batch 32, context 2048); at a lax SLO (50 ms on an H200) the ARM
never leaves full overlap and ``lanes-arm`` is ``lanes``. The lanes' threads run with the worker's GIL switch
interval. Writes results.json, goodput.png, itl_cdf.png and partition.png under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import cpu_name
from benchmarks.mechanism_lib import plots
from benchmarks.mechanism_lib.engine import DEFAULT_POLICIES, EngineConfig, Policy, RunResult, ServingRun
from benchmarks.mechanism_lib.metrics import ITL_SLO_STATS, OverlapBound, RunSummary, goodput, summarize
from benchmarks.mechanism_lib.paged import PagedKVCache
from benchmarks.mechanism_lib.runner import StackRunner
from benchmarks.mechanism_lib.trace import PRESETS, TraceRequest, make_trace
from vllm_rapid.config import DEFAULT_SHARED_POOL_FRACTION, RapidConfig
from vllm_rapid.lanes.arm import AdaptiveResourceManager
from vllm_rapid.lanes.lane import LANE_GIL_SWITCH_INTERVAL_S, LaneName
from vllm_rapid.lanes.partition import PartitionBackend, create_partition_backend
from vllm_rapid.lanes.step_time import DecodeProfile, RooflineEstimate, StepTimeModel
from vllm_rapid.testing.overlap import gaps_ms
from vllm_rapid.tools.layer_stack import LlamaStack, ModelDims

REPO = Path(__file__).resolve().parents[1]
WARMUP_OUTPUT_TOKENS = 16
# --itl-slo-ms auto: the decode batch and context length at which the ARM must leave full overlap.
AUTO_SLO_LOAD = (32, 2048)


def _list(kind: type) -> Any:
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mechanism", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=_list(float), default=[4.0, 8.0, 12.0, 16.0], help="request rates (req/s)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--duration-s", type=float, help="arrivals during this many seconds (default 20)")
    length.add_argument("--num-requests", type=int, help="exactly this many arrivals per rate")
    p.add_argument("--trace", choices=sorted(PRESETS), default="lmsys")
    p.add_argument("--length-scale", type=float, default=1.0, help="scale prompt/output lengths (small runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--itl-slo-ms", type=_slo_ms, default=50.0, help="ms, or 'auto' (see above)")
    p.add_argument("--itl-slo-stat", choices=ITL_SLO_STATS, default="p99",
                   help="statistic of each request's inter-token gaps held to the ITL SLO (mean: TPOT)")
    p.add_argument("--policies", type=_list(str), default=list(DEFAULT_POLICIES))
    dims = ModelDims()
    for field in dataclasses.fields(ModelDims):
        p.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=getattr(dims, field.name))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--partition-backend", default="auto", help="as rapid.partition_backend")
    p.add_argument("--static-decode-fraction", type=float, default=0.5, help="lanes-static: decode's share")
    p.add_argument("--shared-pool-fraction", type=float, default=DEFAULT_SHARED_POOL_FRACTION,
                   help="lanes-shared-*: the device's share in the pool both lanes may use")
    p.add_argument("--arm-profile", help="a `vllm-rapid profile` YAML for the ARM (default: roofline estimate)")
    p.add_argument("--block-size", type=int, default=16, help="KV cache block (page) size in tokens")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--prefill-batch-tokens", type=int, default=4096, help="serial and lanes prefill batches")
    p.add_argument("--kv-cache-gib", type=float, default=40.0, help="KV cache cap")
    p.add_argument("--drain-timeout-s", type=float, default=20.0, help="after the last arrival; then unfinished")
    p.add_argument("--warmup-requests", type=int, default=4, help="per policy, before the timed runs")
    p.add_argument("--cdf-rate", type=float, help="rate of the ITL CDF plot (default: the middle rate)")
    p.add_argument("--out", help="default: benchmarks/results/mechanism-<device>/")
    return p


def _slo_ms(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds or 'auto', got {text!r}") from None


def partitioning_itl_slo(model: StepTimeModel, backend: PartitionBackend) -> float:
    """An ITL SLO the full split misses and the fastest partition meets at ``AUTO_SLO_LOAD`` (midway between
    their predicted decode steps), so the ARM partitions there; without partitions, the full split's step."""
    batch, context = AUTO_SLO_LOAD
    full = model.decode_step_ms(backend.full_split(), batch, context)
    partitions = [model.decode_step_ms(s, batch, context) for s in backend.splits() if not s.full_overlap]
    return (full + min(partitions)) / 2 if partitions and min(partitions) < full else full


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def make_traces(args: argparse.Namespace) -> dict[float, list[TraceRequest]]:
    """One trace per rate, the same seed for all (lengths then match across rates)."""
    duration = None if args.num_requests else args.duration_s or 20.0
    return {
        rate: make_trace(args.trace, rate, args.seed, duration_s=duration, num_requests=args.num_requests,
                         length_scale=args.length_scale)
        for rate in args.rates
    }


class Benchmark:
    """The model, cache, backend, lanes and ARM factory shared by every run."""

    def __init__(
        self, args: argparse.Namespace, policies: list[Policy], device: torch.device, max_seq_len: int
    ) -> None:
        self.args, self.device = args, device
        self.dims = ModelDims(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelDims)})
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: fp32 kernels are the fast ones
        # One backend per layout the policies use; the disjoint one always (serial and hybrid run on its full split).
        layouts = ["disjoint", *sorted({p.layout for p in policies if p.two_lanes} - {"disjoint"})]
        self.backends: dict[str, PartitionBackend] = {}
        try:
            for layout in layouts:
                self.backends[layout] = create_partition_backend(
                    args.partition_backend, device.type, device_index=device.index or 0, layout=layout,
                    shared_pool_fraction=args.shared_pool_fraction,
                )
        except BaseException:
            self._close_backends()
            raise
        self.backend = self.backends["disjoint"]
        self.stack = LlamaStack(self.dims, device, dtype)
        bytes_per_block = self.dims.kv_bytes_per_token(dtype.itemsize) * args.block_size
        needed = args.max_num_seqs * -(-max_seq_len // args.block_size) + 1
        num_blocks = min(needed, int(args.kv_cache_gib * 2**30 // bytes_per_block))
        if num_blocks - 1 < -(-max_seq_len // args.block_size):
            raise SystemExit(f"--kv-cache-gib {args.kv_cache_gib} cannot hold one {max_seq_len}-token request")
        self.cache = PagedKVCache(self.dims, num_blocks, args.block_size, device, dtype)
        max_chunk = max([args.prefill_batch_tokens, *(p.chunk_budget or 0 for p in policies)])
        self.runner = StackRunner(self.stack, self.cache, max_chunk + args.max_num_seqs, args.max_num_seqs,
                                  max_seq_len)
        if device.type == "cuda":
            # Weights, cache and inputs were made on the default stream; the lanes' non-blocking streams read them
            # at once (graph warm-ups, then eager prefill steps) without waiting for it.
            torch.cuda.synchronize()
            started = time.perf_counter()
            captured = 0
            for layout, backend in self.backends.items():
                uses_splits = any(p.arm and p.layout == layout for p in policies)
                splits = backend.splits() if uses_splits else [backend.full_split()]
                captured += self.runner.capture(backend, splits)
            print(f"captured {captured} decode graphs in {time.perf_counter() - started:.1f} s", flush=True)
        device_init = functools.partial(torch.cuda.set_device, device) if device.type == "cuda" else None
        self.lanes = {lane.value: self.backend.make_lane(lane, device_init=device_init) for lane in LaneName}
        self.config = EngineConfig(args.block_size, args.max_num_seqs, args.prefill_batch_tokens,
                                   args.drain_timeout_s)
        self.profile = DecodeProfile.load(args.arm_profile) if args.arm_profile else None
        self.roofline = RooflineEstimate.for_device(device_name(device), self.dims.weight_bytes(dtype.itemsize),
                                                    self.dims.kv_bytes_per_token(dtype.itemsize),
                                                    self.backend.total_units)
        model = self.profile or self.roofline
        self.itl_slo_ms = (partitioning_itl_slo(model, self.backend) if args.itl_slo_ms == "auto"
                           else float(args.itl_slo_ms))

    def make_arm(self, backend: PartitionBackend, arm_policy: str) -> AdaptiveResourceManager:
        config = RapidConfig(itl_slo_ms=self.itl_slo_ms, ttft_slo_ms=self.args.ttft_slo_ms, arm_policy=arm_policy,
                             static_decode_fraction=self.args.static_decode_fraction)
        profile = self.profile if self.profile is not None and self.profile.layout == backend.layout else None
        return AdaptiveResourceManager(config, backend, profile=profile, roofline=self.roofline)

    def run(self, policy: Policy, trace: list[TraceRequest], rate: float) -> RunResult:
        backend = self.backends[policy.layout]
        serving = ServingRun(policy, trace, self.runner, backend, self.lanes, self.config,
                             functools.partial(self.make_arm, backend), rate)
        return serving.run()

    def close(self) -> None:
        """Lanes, then the graphs, then the backends: a graph must go before the green context it was captured on."""
        for lane in self.lanes.values():
            lane.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.runner.release_graphs()
        self._close_backends()

    def _close_backends(self) -> None:
        for backend in self.backends.values():
            backend.close()


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the sweep; returns the report written to ``results.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    policies = [Policy.parse(name) for name in args.policies]  # fail on a bad name before any setup
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(LANE_GIL_SWITCH_INTERVAL_S)  # as in the worker: lanes hand the GIL over quickly
    try:
        return _main(args, argv, policies)
    finally:
        sys.setswitchinterval(switch_interval)


def _main(args: argparse.Namespace, argv: list[str], policies: list[Policy]) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vllm_rapid.lanes.arm").setLevel(logging.ERROR)  # the roofline notice would repeat every run
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    name = device_name(device)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"mechanism-{_slug(name, device)}")
    out.mkdir(parents=True, exist_ok=True)
    traces = make_traces(args)
    max_seq_len = max(r.prompt_len + r.output_len for trace in traces.values() for r in trace)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks.mechanism", *argv]),
        "torch": torch.__version__,
        "device": name,
        "gil_switch_interval_s": sys.getswitchinterval(),
        "args": vars(args),
        "traces": {
            str(rate): {"requests": len(t), "prompt_tokens": sum(r.prompt_len for r in t),
                        "output_tokens": sum(r.output_len for r in t)}
            for rate, t in traces.items()
        },
        "notes": "SLO met = finished, TTFT <= ttft_slo_ms and the itl_slo_stat of its ITLs <= itl_slo_ms; "
                 "goodput = highest swept rate with >= 90% met; bound = the serial run's (solo) prefill step time P "
                 "and decode step time D: perfect overlap needs max(P, D) of device time, serial P + D",
    }
    with torch.inference_mode():
        bench = Benchmark(args, policies, device, max_seq_len)
        report.update(backend=bench.backend.name, total_units=bench.backend.total_units,
                      splits=[s.label for s in bench.backend.splits()],
                      layouts={name: [asdict(s) for s in b.splits()] for name, b in bench.backends.items()},
                      model=bench.dims.describe(),
                      itl_slo_ms=bench.itl_slo_ms, arm_model="profile" if bench.profile else "roofline estimate")
        print(f"backend {bench.backend.name} ({report['splits']}), ITL SLO {bench.itl_slo_ms:.1f} ms "
              f"({report['arm_model']})", flush=True)
        try:
            runs, summaries = _sweep(bench, policies, traces, report, out / "results.json")
        finally:
            bench.close()
    _finish(report, runs, summaries, args, out)
    return report


def _sweep(bench: Benchmark, policies: list[Policy], traces: dict[float, list[TraceRequest]], report: dict,
           path: Path) -> tuple[dict[tuple[str, float], RunResult], list[RunSummary]]:
    first = next(iter(traces.values()))
    warmup = [replace(r, arrival_s=0.0, output_len=min(r.output_len, WARMUP_OUTPUT_TOKENS))
              for r in first[: bench.args.warmup_requests]]
    for policy in policies if warmup else []:
        bench.run(policy, warmup, 0.0)
    runs: dict[tuple[str, float], RunResult] = {}
    summaries: list[RunSummary] = []
    report["runs"] = []
    for rate, trace in traces.items():
        for policy in policies:
            started = time.perf_counter()
            run = runs[policy.name, rate] = bench.run(policy, trace, rate)
            summaries.append(summary := summarize(run, bench.args.ttft_slo_ms, bench.itl_slo_ms,
                                                  bench.args.itl_slo_stat))
            report["runs"].append(asdict(summary))
            print(_line(summary, time.perf_counter() - started), flush=True)
            path.write_text(json.dumps(report, indent=1))  # partial results survive an interrupted sweep
    return runs, summaries


def _finish(report: dict, runs: dict[tuple[str, float], RunResult], summaries: list[RunSummary],
            args: argparse.Namespace, out: Path) -> None:
    by_policy: dict[str, list[RunSummary]] = {}
    for s in summaries:
        by_policy.setdefault(s.policy, []).append(s)
    goodputs = {policy: goodput(runs_) for policy, runs_ in by_policy.items()}
    report["goodput_rps"] = goodputs
    report["bound"] = {
        str(s.rate): asdict(OverlapBound.from_serial(s)) for s in by_policy.get("serial", [])
    }
    arm_timelines = {
        policy: {
            rate: [(round(step.start_s, 4), step.decode_units) for step in run.steps if step.lane == "decode"]
            for (name, rate), run in runs.items() if name == policy
        }
        for policy in ("lanes-arm", "lanes-shared-arm")
    }
    timelines = arm_timelines["lanes-arm"]
    report["lanes_arm_partition"] = {str(rate): points for rate, points in timelines.items()}
    if arm_timelines["lanes-shared-arm"]:
        report["lanes_shared_arm_partition"] = {str(r): p for r, p in arm_timelines["lanes-shared-arm"].items()}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    rates = list(args.rates)
    cdf_rate = args.cdf_rate if args.cdf_rate in rates else rates[len(rates) // 2]
    itls = {policy: [g for s in run.requests for g in gaps_ms(s.token_times)]
            for (policy, rate), run in runs.items() if rate == cdf_rate}
    plots.plot_goodput(out / "goodput.png", by_policy, goodputs)
    plots.plot_itl_cdf(out / "itl_cdf.png", itls, cdf_rate, report["itl_slo_ms"])
    plots.plot_partition(out / "partition.png", timelines, report["total_units"])
    print(f"goodput (req/s at >= 90% SLO attainment): {goodputs}")
    for rate, bound in report["bound"].items():
        print(f"bound at {rate} req/s: prefill {bound['prefill_s']:.2f} s, decode {bound['decode_s']:.2f} s, "
              f"overlap can save at most {bound['max_speedup']:.2f}x of device time")
    print(f"wrote {out}/results.json, goodput.png, itl_cdf.png, partition.png")


def _line(s: RunSummary, wall_s: float) -> str:
    ttft = f"{s.ttft_ms.p50:.0f}/{s.ttft_ms.p99:.0f}" if s.ttft_ms else "-"
    itl = f"{s.itl_ms.p50:.1f}/{s.itl_ms.p99:.1f}" if s.itl_ms else "-"
    return (f"{s.policy:>12} @ {s.rate:g} req/s: {s.finished}/{s.num_requests} done, {s.throughput_tok_s:,.0f} tok/s, "
            f"TTFT p50/p99 {ttft} ms, ITL p50/p99 {itl} ms, SLO met {s.slo_attainment:.0%} ({wall_s:.0f} s)")


def _slug(name: str, device: torch.device) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'; any CPU -> 'cpu'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
