"""Decode pace while a long prefill runs, from the lanes' own timestamps: RAPID vs vLLM's default scheduler.

Four requests decode; a 2,500-token prompt arrives. With ``--scheduler rapid`` its prefill runs on the prefill lane
while decode steps continue; with ``--scheduler default`` vLLM's chunked prefill mixes it into the decode batches.
Reports decode inter-token latency (ITL) during the prefill vs before it, for both, and writes JSON.

    python -m benchmarks.lane_overlap --out benchmarks/results/cpu-lane-overlap.json   # from the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import tempfile
import time
from dataclasses import asdict

from benchmarks.machine import cpu_name
from vllm_rapid.testing.overlap import gaps_ms, median_gap_ms, summarize_overlap

DECODERS, LONG_PROMPT, DECODE_WARMUP_STEPS = 4, 2500, 40


def prompt(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(2, 400) for _ in range(n)]}


def run(model: str, scheduler: str, chunk: int) -> dict:
    """Step the engine through the scenario; return decode ITL before/while the long prompt is prefilled."""
    from vllm import LLM, SamplingParams

    extra = {"additional_config": {"rapid": {"record_lane_events": True}}} if scheduler == "rapid" else {}
    # vLLM's default chunks the prompt into the decode batches; RAPID prefills it whole on its own lane.
    budget = chunk if scheduler == "default" else 4096
    llm = LLM(model, scheduler=scheduler, dtype="float32", max_model_len=4096, max_num_batched_tokens=budget,
              kv_cache_memory_bytes=64 << 20, enforce_eager=True, seed=0, distributed_executor_backend="mp",
              **extra)
    engine = llm.llm_engine
    for i in range(DECODERS):
        engine.add_request(f"d{i}", prompt(8 + 4 * i, i), SamplingParams(max_tokens=3000, ignore_eos=True))
    token_times: list[float] = []  # engine-step completion times that carried decode tokens
    for _ in range(DECODE_WARMUP_STEPS):
        engine.step()
        token_times.append(time.monotonic())
    added = time.monotonic()
    engine.add_request("long", prompt(LONG_PROMPT, 99), SamplingParams(max_tokens=2, ignore_eos=True))
    while True:
        outputs = engine.step()
        token_times.append(time.monotonic())
        if any(o.request_id == "long" and o.outputs[0].token_ids for o in outputs):
            first_token = time.monotonic()
            break
    result = {"scheduler": scheduler, "ttft_long_ms": (first_token - added) * 1e3,
              "itl_ms_alone": median_gap_ms([t for t in token_times if t <= added][-20:]),
              "itl_ms_during": median_gap_ms([t for t in token_times if added < t <= first_token]),
              "max_itl_ms_during": max(gaps_ms([t for t in token_times if added < t <= first_token]), default=0)}
    if scheduler == "rapid":
        result["lanes"] = asdict(summarize_overlap(llm.collective_rpc("rapid_lane_events")[0], LONG_PROMPT - 1))
    engine.abort_request([f"d{i}" for i in range(DECODERS)])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lane_overlap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheduler", choices=["rapid", "default"], help="run one (internal: one engine per process)")
    parser.add_argument("--chunk", type=int, default=512, help="the default scheduler's chunked-prefill size")
    parser.add_argument("--out", default="benchmarks/results/cpu-lane-overlap.json")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.scheduler:  # child: one scheduler, result on stdout
        from vllm_rapid.testing.tiny_model import make_tiny_llama

        model = make_tiny_llama(tempfile.mkdtemp(prefix="rapid-bench-"), hidden_size=256, num_layers=4)
        print("RESULT " + json.dumps(run(str(model), args.scheduler, args.chunk)), flush=True)
        return
    import subprocess

    results = []
    for scheduler in ("default", "rapid"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.lane_overlap", "--scheduler", scheduler,
                               "--chunk", str(args.chunk)], capture_output=True, text=True, check=True)
        results.append(json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:]))
    report = {"command": shlex.join(["python", "-m", "benchmarks.lane_overlap", *sys.argv[1:]]),
              "machine": cpu_name(), "cpus": os.cpu_count(),
              "model": "tiny random Llama, 4 layers, hidden 256, fp32", "results": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    for r in results:
        print(f"{r['scheduler']:>8}: decode ITL alone {r['itl_ms_alone']:.1f} ms, during the 2,500-token prefill "
              f"{r['itl_ms_during']:.1f} ms (max {r['max_itl_ms_during']:.1f}), TTFT of the long prompt "
              f"{r['ttft_long_ms']:.0f} ms")


if __name__ == "__main__":
    main()
