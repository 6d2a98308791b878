"""The GPU mechanism benchmark (``python -m benchmarks.mechanism``) at a tiny scale: pipeline, metrics, files. No timing
assertions: on CPU the numbers mean nothing; the GPU runs are for the H200."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import benchmarks.mechanism_lib.runner as runner_module
from benchmarks import mechanism
from benchmarks.mechanism_lib.engine import DEFAULT_POLICIES, Policy
from benchmarks.mechanism_lib.paged import PagedKVCache, paged_decode_attention, torch_paged_decode_attention
from benchmarks.mechanism_lib.runner import ChunkInputs, DecodeInputs, StackRunner, StepInputs
from benchmarks.mechanism_lib.trace import make_trace
from vllm_rapid.lanes.partition.threads import ThreadsBackend
from vllm_rapid.tools.layer_stack import LlamaStack, ModelDims

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
TINY = ModelDims(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=256,
                 head_dim=16)
TINY_ARGS = [
    "--hidden-size", "64", "--num-layers", "1", "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "16",
    "--intermediate-size", "128", "--vocab-size", "256", "--num-requests", "8", "--length-scale", "0.03",
    "--block-size", "4", "--max-num-seqs", "8", "--warmup-requests", "2",
]
POLICIES = [*DEFAULT_POLICIES, "hybrid-16"]  # 16 tokens: prompts of ~50 tokens get chunked
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
    with pytest.raises(ValueError):
        Policy.parse("hybrid-0")


@needs_gpu
def test_triton_decode_attention_matches_torch():
    torch.manual_seed(0)
    k = torch.randn(64 * 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(3, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([1, 100, 700], dtype=torch.int32, device="cuda")
    tables = torch.randint(1, 64, (3, 44), dtype=torch.int32, device="cuda")
    got = paged_decode_attention(q, k, v, tables, lens, 16)
    torch.testing.assert_close(got, torch_paged_decode_attention(q, k, v, tables, lens, 16), atol=2e-2, rtol=2e-2)


@needs_gpu
@pytest.mark.gpu
def test_harness_on_gpu_with_graphs(tmp_path):
    report = mechanism.main([*TINY_ARGS, "--device", "cuda", "--rates", "20,60", "--out", str(tmp_path)])
    assert all(r["finished"] == r["num_requests"] for r in report["runs"])
    assert (tmp_path / "partition.png").exists()
