"""vLLM features that run on the lanes (README, "Supported vLLM features"), on real vLLM (CPU build).

For each: outputs identical to vLLM's default scheduler (greedy, fp32), including a request in flight on the
prefill lane while others decode, and an abort at each stage with nothing left allocated.
"""

from __future__ import annotations

import pytest
from test_rapid_engine import (
    assert_idle_and_clean,
    decode_while_prefilling,
    make_llm,
    prompts_of_lengths,
    run_until_idle,
    scheduler_of,
)
from vllm import PoolingParams, SamplingParams

pytestmark = pytest.mark.slow

NGRAM = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                "prompt_lookup_min": 1}}


def repetitive_prompts(lengths: list[int], seed: int) -> list[dict]:
    """Prompts an n-gram drafter finds matches in (a short period), so drafts are proposed and accepted."""
    return [{"prompt_token_ids": [2 + (seed + j * 7) % (11 + i) for j in range(n)]} for i, n in enumerate(lengths)]


def _accepted_drafts(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")


def test_ngram_speculative_decoding_matches_default_with_a_prefill_in_flight(tiny_model):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    short, long = repetitive_prompts([5, 40, 17], seed=1), repetitive_prompts([2500, 900], seed=2)
    results = {}
    for scheduler in ("default", "rapid"):
        llm = make_llm(tiny_model, scheduler, engine_kwargs=NGRAM, record_lane_events=True)
        finished = decode_while_prefilling(llm, short, long, params)
        results[scheduler] = {rid: list(o.outputs[0].token_ids) for rid, o in finished.items()}
        assert _accepted_drafts(llm) > 0, f"{scheduler}: no draft was accepted, nothing was speculated"
        if scheduler == "rapid":
            # The drafts are verified on the decode lane: its steps carry more tokens than the three requests.
            events = llm.collective_rpc("rapid_lane_events")[0]
            assert max(e["num_tokens"] for e in events if e["lane"] == "decode") > len(short), events[-5:]
            _abort_at_every_stage(llm, params)
        llm.llm_engine.engine_core.shutdown()
    assert results["rapid"] == results["default"]


def _abort_at_every_stage(llm, params: SamplingParams) -> None:
    """Abort one request decoding, one in the prefill batch in flight and one queued behind it, in one step."""
    engine, sched = llm.llm_engine, scheduler_of(llm)
    engine.add_request("decoding", repetitive_prompts([30], seed=3)[0], params)
    engine.add_request("decoding-kept", repetitive_prompts([20], seed=4)[0], params)
    while not sched.running or any(map(sched.in_prefill_lane, sched.running)):
        engine.step()
    engine.add_request("in-flight", repetitive_prompts([2500], seed=5)[0], params)
    while sched.inflight_prefill is None:
        engine.step()
    engine.add_request("queued", repetitive_prompts([300], seed=6)[0], params)
    assert sched.inflight_prefill is not None, "the prefill finished too fast for this check to mean anything"
    engine.abort_request(["decoding", "in-flight", "queued"])
    finished = run_until_idle(llm)
    assert {rid for rid, o in finished.items() if o.outputs[0].finish_reason == "length"} == {"decoding-kept"}
    assert_idle_and_clean(llm)


POOLING = {"runner": "pooling", "convert": "embed"}


def test_embeddings_match_default_with_a_prefill_in_flight_and_aborts(tiny_model):
    """Pooling is prefill-only work: it runs on the prefill lane, and each request finishes with its batch."""
    prompts = prompts_of_lengths([5, 300, 2000, 40, 3500, 1], seed=7)
    embeddings = {}
    for scheduler in ("default", "rapid"):
        llm = make_llm(tiny_model, scheduler, engine_kwargs=POOLING)
        embeddings[scheduler] = [o.outputs.embedding for o in llm.embed(prompts, use_tqdm=False)]
        if scheduler == "rapid":
            engine, sched = llm.llm_engine, scheduler_of(llm)
            params = PoolingParams(task="embed")
            engine.add_request("in-flight", prompts_of_lengths([3500], seed=8)[0], params)
            while sched.inflight_prefill is None:
                engine.step()
            engine.add_request("queued", prompts_of_lengths([200], seed=9)[0], params)
            engine.add_request("queued-kept", prompts_of_lengths([100], seed=10)[0], params)
            engine.abort_request(["in-flight", "queued"])
            finished = run_until_idle(llm)
            assert set(finished) >= {"queued-kept"} and finished["queued-kept"].finished
            assert_idle_and_clean(llm)
        llm.llm_engine.engine_core.shutdown()
    for mine, theirs in zip(embeddings["rapid"], embeddings["default"]):
        assert mine == pytest.approx(theirs, abs=1e-5)


def test_data_parallelism_two_engines_match_default(tiny_model, tmp_path):
    """--data-parallel-size 2 (a dense model): each engine core runs its own RAPID scheduler and worker; long and
    short prompts at once through the API server, the same greedy completions as vLLM's default scheduler."""
    from concurrent.futures import ThreadPoolExecutor

    from vllm_rapid.testing.server import Server

    prompts = [[2 + (i * 11 + j) % 300 for j in range(2500 if i % 3 == 0 else 30)] for i in range(6)]
    completions = {}
    for scheduler in ("default", "rapid"):
        args = ["--scheduler", scheduler, "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
                "--kv-cache-memory-bytes", str(32 << 20), "--data-parallel-size", "2"]
        env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}  # two engines on one NUMA node
        with Server(tiny_model, args, tmp_path / f"{scheduler}.log", env=env, startup_timeout_s=600) as server:
            def complete(prompt: list[int], server=server) -> str:
                body = {"model": tiny_model, "prompt": prompt, "max_tokens": 16, "temperature": 0.0,
                        "ignore_eos": True}
                return server.post("/v1/completions", body, timeout=300)["choices"][0]["text"]

            with ThreadPoolExecutor(max_workers=6) as pool:
                completions[scheduler] = list(pool.map(complete, prompts))
            if scheduler == "rapid":
                assert server.log().count("RAPID scheduler: decode every step") == 2, server.log_tail()
    assert completions["rapid"] == completions["default"]
