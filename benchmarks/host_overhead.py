"""The engine loop's host time per decode step, vLLM's default scheduler vs RAPID: what async scheduling would hide.

With async scheduling vLLM schedules step k+1 and processes step k's output while step k runs on the device, so the
scheduler's host time (``schedule`` + ``update_from_output``) leaves the critical path. RAPID runs synchronous steps
(``--async-scheduling`` is refused, see README "Designs"), and vLLM's CPU platform cannot run async scheduling at
all, so this measures the synchronous loop only: per decode step, the wall time of ``EngineCore.step``, the time in
the scheduler's ``schedule`` and ``update_from_output``, and the rest (the executor round trip and the model).

    python -m benchmarks.host_overhead --out benchmarks/results/cpu-host-overhead/result.json

The engine core runs in this process (the worker in its own), on a decode-only workload: a batch of requests with
short prompts decoding many tokens, so every measured step is a decode step of the whole batch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, to time it

from benchmarks.machine import hardware  # noqa: E402


def _timed(record: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append((time.perf_counter() - start) * 1e3)

    return wrapper


def measure(model: str, scheduler: str, batch: int, tokens: int, warmup_steps: int) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    llm = LLM(model, scheduler=scheduler, dtype="float32", max_model_len=2048, kv_cache_memory_bytes=256 << 20,
              enforce_eager=True, seed=0, distributed_executor_backend="mp")
    core = llm.llm_engine.engine_core.engine_core
    sched = core.scheduler
    times: dict[str, list[float]] = {"step": [], "schedule": [], "update": []}
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for i in range(batch):
        llm.llm_engine.add_request(str(i), {"prompt_token_ids": [2 + (i * 7 + j) % 300 for j in range(16)]}, params)
    for _ in range(warmup_steps):  # prefill, then the batch decodes
        core.step()
    sched.schedule = _timed(times["schedule"], sched.schedule)
    sched.update_from_output = _timed(times["update"], sched.update_from_output)
    step = _timed(times["step"], core.step)
    while sched.has_requests():
        step()
    llm.llm_engine.engine_core.shutdown()
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "scheduler": scheduler,
        "decode_steps": len(times["step"]),
        "median_ms": {**median, "rest": median["step"] - median["schedule"] - median["update"]},
        "host_ms_per_step": median["schedule"] + median["update"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--warmup-steps", type=int, default=10)
    args = parser.parse_args(argv)
    from vllm_rapid.testing.tiny_model import make_tiny_llama

    model = str(make_tiny_llama(Path(tempfile.mkdtemp()) / "tiny"))
    runs = [measure(model, s, args.batch, args.tokens, args.warmup_steps) for s in ("default", "rapid")]
    default, rapid = runs
    report = {
        "command": shlex.join(["python", "-m", "benchmarks.host_overhead", *(argv or sys.argv[1:])]),
        "hardware": hardware(),
        "workload": {"batch": args.batch, "tokens": args.tokens, "prompt_tokens": 16, "model": "tiny Llama fp32"},
        "runs": runs,
        "rapid_over_default_host_ms": rapid["host_ms_per_step"] / default["host_ms_per_step"],
        "async_scheduling": "not measured: vLLM's CPU platform turns it off (its output copy needs CUDA)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for run in runs:
        print(f"{run['scheduler']:>8}: {run['decode_steps']} decode steps, median ms {run['median_ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
