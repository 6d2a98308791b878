"""The GPU mechanism benchmark (``python -m benchmarks.mechanism``) at a tiny scale: pipeline, metrics, files. No timing
assertions: on CPU the numbers mean nothing; the GPU runs are for the H200."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from fake_backend import FakeBackend

import benchmarks.mechanism_lib.runner as runner_module
from benchmarks import mechanism
from benchmarks.mechanism_lib.engine import DEFAULT_POLICIES, Policy
from benchmarks.mechanism_lib.paged import PagedKVCache, paged_decode_attention, torch_paged_decode_attention
from benchmarks.mechanism_lib.runner import ChunkInputs, DecodeInputs, StackRunner, StepInputs
from benchmarks.mechanism_lib.trace import make_trace
from vllm_rapid.config import RapidConfig
from vllm_rapid.lanes.arm import AdaptiveResourceManager, ArmInputs
from vllm_rapid.lanes.lane import LANE_GIL_SWITCH_INTERVAL_S
from vllm_rapid.lanes.partition.threads import CPU_PREFILL_NICENESS, ThreadsBackend
from vllm_rapid.lanes.step_time import RooflineEstimate
from vllm_rapid.tools.layer_stack import LlamaStack, ModelDims

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
TINY = ModelDims(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=256,
                 head_dim=16)
TINY_ARGS = [
    "--hidden-size", "64", "--num-layers", "1", "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "16",
    "--intermediate-size", "128", "--vocab-size", "256", "--num-requests", "8", "--length-scale", "0.03",
    "--block-size", "4", "--max-num-seqs", "8", "--warmup-requests", "2",
]
POLICIES = [*DEFAULT_POLICIES, "hybrid-16", "hybrid-16-i3"]  # 16 tokens: prompts of ~50 tokens get chunked
RATES = [20.0, 60.0]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("mechanism")
    report = mechanism.main([*TINY_ARGS, "--device", "cpu", "--rates", "20,60", "--policies", ",".join(POLICIES),
                             "--out", str(out)])
    return report, out


def test_every_policy_finishes_every_request_with_the_traces_tokens(cpu_run):
    report, _ = cpu_run
    assert sorted((r["policy"], r["rate"]) for r in report["runs"]) == sorted((p, r) for p in POLICIES for r in RATES)
    for run in report["runs"]:
        trace = report["traces"][str(run["rate"])]
        assert run["finished"] == run["num_requests"] == trace["requests"]
        assert run["output_tokens"] == trace["output_tokens"]
        assert run["prompt_tokens"] == trace["prompt_tokens"]


def test_metrics_are_well_formed(cpu_run):
    report, _ = cpu_run
    for run in report["runs"]:
        for key in ("ttft_ms", "itl_ms"):
            p = run[key]
            assert 0 <= p["p50"] <= p["p95"] <= p["p99"], (run["policy"], key, p)
        assert 0.0 <= run["slo_attainment"] <= 1.0
        assert run["throughput_tok_s"] > 0 and run["duration_s"] > 0
        assert run["max_decodes_per_step"] <= 8  # --max-num-seqs
    assert set(report["goodput_rps"]) == set(POLICIES)
    assert all(g in (0.0, *RATES) for g in report["goodput_rps"].values())
    for bound in report["bound"].values():
        assert bound["overlap_s"] == max(bound["prefill_s"], bound["decode_s"])
        assert 1.0 <= bound["max_speedup"] <= 2.0


def test_hybrid_never_exceeds_its_chunk_budget(cpu_run):
    report, _ = cpu_run
    for run in report["runs"]:
        policy = Policy.parse(run["policy"])
        if policy.chunk_budget is not None:
            assert run["max_prefill_tokens_per_step"] <= policy.chunk_budget
    # The 16-token budget really cut prompts (else the check above proves nothing).
    assert max(r["max_prefill_tokens_per_step"] for r in report["runs"] if r["policy"] == "hybrid-16") == 16


def test_the_run_uses_the_workers_gil_switch_interval_and_restores_it(cpu_run):
    report, _ = cpu_run
    assert report["gil_switch_interval_s"] == pytest.approx(LANE_GIL_SWITCH_INTERVAL_S)
    assert sys.getswitchinterval() != pytest.approx(LANE_GIL_SWITCH_INTERVAL_S)


def _bench(*extra: str, policies: tuple[str, ...] = ("serial",)) -> tuple[mechanism.Benchmark, dict]:
    """A tiny CPU Benchmark and its traces, for runs whose step records a test reads."""
    args = mechanism.build_parser().parse_args([*TINY_ARGS, "--device", "cpu", "--rates", "60", *extra])
    traces = mechanism.make_traces(args)
    max_seq_len = max(r.prompt_len + r.output_len for t in traces.values() for r in t)
    return mechanism.Benchmark(args, [Policy.parse(p) for p in policies], torch.device("cpu"), max_seq_len), traces


def test_prefill_schedule_interval_holds_prompts_until_n_decode_steps_ran():
    """hybrid-C-iN as vLLM's --prefill-schedule-interval N: between two steps with prompt tokens, N decode-only
    steps, unless nothing was decoding (then prompts go at once)."""
    bench, traces = _bench("--num-requests", "12")
    try:
        run = bench.run(Policy.parse("hybrid-16-i3"), traces[60.0], 60.0)
    finally:
        bench.close()
    assert all(r.generated == r.req.output_len for r in run.requests)
    since, held = None, 0
    for step in run.steps:
        if step.prefill_tokens:
            if since is not None and since < 3:
                assert step.num_decodes == 0, run.steps
            held += since is not None and since >= 3
            since = 0
        elif since is not None:
            since += 1
    assert held  # the interval really held prompts back at least once


def test_lanes_static_runs_both_lanes_on_the_fixed_split():
    bench, traces = _bench(policies=("lanes-static",))
    try:
        run = bench.run(Policy.parse("lanes-static"), traces[60.0], 60.0)
        static = bench.backend.round_split(round(0.5 * bench.backend.total_units))
    finally:
        bench.close()
    assert all(r.generated == r.req.output_len for r in run.requests)
    assert {step.lane for step in run.steps} == {"decode", "prefill"}
    assert {step.decode_units for step in run.steps} == {static.decode_units}


def test_shared_pool_policies_run_on_a_backend_of_that_layout(monkeypatch):
    """lanes-shared-* get a second backend, in the shared-pool layout, and their ARM is built over its splits; the
    other policies keep the disjoint one. (CPU threads cannot share cores: the shared backend is stood in for by
    thread splits labelled shared_pool, which is enough for the routing.)"""
    made = []

    def create(name, kind, *, layout, **options):
        backend = ThreadsBackend(cores=2)
        backend.layout = layout
        made.append(layout)
        return backend

    monkeypatch.setattr(mechanism, "create_partition_backend", create)
    bench, traces = _bench(policies=("lanes-static", "lanes-shared-static"))
    try:
        assert made == ["disjoint", "shared_pool"]
        arms = []
        make_arm = bench.make_arm
        bench.make_arm = lambda backend, policy: (arms.append(backend.layout), make_arm(backend, policy))[1]
        for name in ("lanes-shared-static", "lanes-static"):
            run = bench.run(Policy.parse(name), traces[60.0], 60.0)
            assert all(r.generated == r.req.output_len for r in run.requests)
    finally:
        bench.close()
    assert arms == ["shared_pool", "disjoint"]


def test_shared_pool_policies_on_cpu_threads_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="shared_pool.*oversubscribe the cores"):
        _bench(policies=("lanes-shared-arm",))


def test_cpu_lanes_run_the_backends_thread_init():
    """The threads backend's prefill lane runs at a lower OS priority (and its own OpenMP team), as in the worker."""
    bench, _ = _bench()
    try:
        nice = {name: lane.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
                for name, lane in bench.lanes.items()}
    finally:
        bench.close()
    assert nice["prefill"] - nice["decode"] == CPU_PREFILL_NICENESS


def test_close_destroys_the_graphs_before_the_backend():
    bench, _ = _bench()
    order: list[str] = []
    release, close = bench.runner.release_graphs, bench.backend.close
    bench.runner.release_graphs = lambda: (order.append("graphs"), release())
    bench.backend.close = lambda: (order.append("backend"), close())
    bench.close()
    assert order == ["graphs", "backend"]


def test_auto_itl_slo_makes_the_arm_partition_at_a_mid_load():
    """At 50 ms the ARM practically never leaves full overlap on an H200 (Llama-3-8B); the auto SLO does."""
    backend = FakeBackend(132, [40, 56, 72, 88, 104])
    dims = ModelDims()
    roofline = RooflineEstimate.for_device("NVIDIA H200", dims.weight_bytes(), dims.kv_bytes_per_token(), 132)
    slo = mechanism.partitioning_itl_slo(roofline, backend)
    batch, context = mechanism.AUTO_SLO_LOAD
    under_prefill = ArmInputs(batch, context, 10.0, True)

    def decision(itl_slo_ms: float):
        config = RapidConfig(itl_slo_ms=itl_slo_ms, arm_hysteresis_steps=1)
        return AdaptiveResourceManager(config, backend, roofline=roofline).decide(under_prefill)

    assert decision(50.0).split.full_overlap
    assert not decision(slo).split.full_overlap
    assert mechanism.build_parser().parse_args(["--itl-slo-ms", "auto"]).itl_slo_ms == "auto"
    streams_only = FakeBackend(132, [])
    assert mechanism.partitioning_itl_slo(roofline, streams_only) == roofline.decode_step_ms(
        streams_only.full_split(), batch, context)


def test_the_benchmark_imports_without_vllm():
    """The GPU machine has no vLLM: the benchmark and what it imports (the GIL constant from patch/ too) do without."""
    code = "import sys; sys.modules['vllm'] = None; import benchmarks.mechanism; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VLLM_RAPID_AUTOLOAD": "0"}, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_report_and_plots_are_written(cpu_run):
    _, out = cpu_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"].startswith("python -m benchmarks.mechanism ") and "--device cpu" in saved["command"]
    assert saved["torch"] == torch.__version__ and saved["device"]
    assert set(saved["lanes_arm_partition"]) == {str(r) for r in RATES}
    for name in ("goodput.png", "itl_cdf.png", "partition.png"):
        assert (out / name).stat().st_size > 0


def test_paged_chunked_steps_match_the_plain_stack():
    """Prefill in two chunks, then decode steps, mixed into other sequences' steps: the same logits as running
    the whole prefix through the stack at once."""
    torch.manual_seed(0)
    stack = LlamaStack(TINY, torch.device("cpu"), torch.float32)
    cache = PagedKVCache(TINY, num_blocks=16, block_size=4, device="cpu", dtype=torch.float32)
    runner = StackRunner(stack, cache, max_tokens=32, max_num_seqs=4, max_seq_len=16)
    seq, other = [9, 3, 12], [5, 1]  # scattered blocks
    x, y = torch.randn(11, 64), torch.randn(5, 64)
    runner.forward(y[:4], None, [ChunkInputs.build(other, 0, 4, 4)])  # the other sequence's prompt

    def expect(prefix: int) -> torch.Tensor:
        return stack.prefill(x[:prefix])[0]

    logits = runner.forward(x[:6], None, [ChunkInputs.build(seq, 0, 6, 4)])
    torch.testing.assert_close(logits[0], expect(6))
    decode = DecodeInputs.build([other], [5], 4)  # the other sequence decodes alongside the second chunk
    logits = runner.forward(torch.cat([y[4:5], x[6:9]]), decode, [ChunkInputs.build(seq, 6, 3, 4)])
    torch.testing.assert_close(logits[1], expect(9))
    torch.testing.assert_close(logits[0], stack.prefill(y)[0])
    for length in (10, 11):
        logits = runner.forward(x[length - 1 : length], DecodeInputs.build([seq], [length], 4), [])
        torch.testing.assert_close(logits[0], expect(length))


class _EagerGraph:
    """Stands in for a CUDA graph on CPU: replay runs the captured function on the same static buffers."""

    def __init__(self, fn, context) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()

    def reset(self) -> None:
        self.fn = None


def test_decode_graph_path_pads_the_batch_to_its_bucket(monkeypatch):
    """The graph path (static buffers, padded rows on the scratch block) writes the same K/V as eager decode."""
    monkeypatch.setattr(runner_module, "capture_graph", _EagerGraph)
    torch.manual_seed(0)
    stack = LlamaStack(TINY, torch.device("cpu"), torch.float32)
    caches = [PagedKVCache(TINY, num_blocks=16, block_size=4, device="cpu", dtype=torch.float32) for _ in range(2)]
    caches[1].k.copy_(torch.randn_like(caches[1].k))
    caches[1].v.copy_(torch.randn_like(caches[1].v))
    caches[0].k.copy_(caches[1].k)
    caches[0].v.copy_(caches[1].v)
    graphed, eager = (StackRunner(stack, c, max_tokens=8, max_num_seqs=4, max_seq_len=16) for c in caches)
    eager.x = graphed.x
    backend = ThreadsBackend()
    graphed.capture(backend, [backend.full_split()])
    for blocks, lens in [([[3, 4], [7], [9, 10, 11]], [6, 2, 9]), ([[5, 6]], [8])]:  # buckets 4 (padded) and 1
        step = StepInputs(DecodeInputs.build(blocks, lens, 4), [])
        graphed.execute(step, backend.full_split())
        eager.execute(step, backend.full_split())
        real = slice(4, None)  # block 0 (slots 0-3) is the scratch block padded rows write to
        torch.testing.assert_close(caches[0].k[:, real], caches[1].k[:, real])
        torch.testing.assert_close(caches[0].v[:, real], caches[1].v[:, real])


def test_traces_are_seeded_and_policies_parsed():
    a = make_trace("long", 5.0, seed=3, duration_s=4.0)
    assert a == make_trace("long", 5.0, seed=3, duration_s=4.0) and all(r.arrival_s < 4.0 for r in a)
    assert len(make_trace("lmsys", 5.0, seed=3, num_requests=7)) == 7
    assert Policy.parse("hybrid-768").chunk_budget == 768 and Policy.parse("lanes-arm").arm
    assert Policy.parse("hybrid-512-i4").prefill_interval == 4 and Policy.parse("hybrid-512").prefill_interval is None
    assert Policy.parse("lanes-static").arm_policy == "static" and not Policy.parse("lanes").arm
    shared = Policy.parse("lanes-shared-arm")
    assert (shared.arm_policy, shared.layout, Policy.parse("lanes-arm").layout) == ("adaptive", "shared_pool",
                                                                                     "disjoint")
    for bad in ("hybrid-0", "hybrid-512-i0", "lanes-dynamic"):
        with pytest.raises(ValueError):
            Policy.parse(bad)


@needs_gpu
@pytest.mark.gpu
def test_triton_decode_attention_matches_torch():
    """bf16 on the GPU (the interpreter's bf16 dot is wrong, see test_triton_kernels.py), a padded row included."""
    torch.manual_seed(0)
    k = torch.randn(64 * 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([1, 100, 700, 0], dtype=torch.int32, device="cuda")
    tables = torch.randint(1, 64, (4, 44), dtype=torch.int32, device="cuda")
    got = paged_decode_attention(q, k, v, tables, lens, 16)
    assert torch.isfinite(got).all() and (got[3] == 0).all()
    torch.testing.assert_close(got, torch_paged_decode_attention(q, k, v, tables, lens, 16), atol=2e-2, rtol=2e-2)


@needs_gpu
@pytest.mark.gpu
def test_harness_on_gpu_with_graphs(tmp_path):
    policies = [*DEFAULT_POLICIES, "lanes-shared-static", "lanes-shared-arm"]
    report = mechanism.main([*TINY_ARGS, "--device", "cuda", "--rates", "20,60", "--partition-backend",
                             "green_context", "--policies", ",".join(policies), "--out", str(tmp_path)])
    assert report["backend"] == "green_context" and len(report["splits"]) > 1
    shared = [s for s in report["layouts"]["shared_pool"] if not s["full_overlap"]]
    assert shared and all(s["shared_units"] > 0 for s in shared)
    assert all(r["finished"] == r["num_requests"] for r in report["runs"])
    assert (tmp_path / "partition.png").exists()
