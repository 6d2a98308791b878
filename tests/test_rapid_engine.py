"""RAPID mode against real vLLM (CPU build): outputs, lane overlap, KV fences, aborts and preemption.

Engines run their engine core in the test process (conftest), so the tests step the engine one step at a time and
look at the real scheduler and KV-cache manager; the model runs in a real worker process.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from vllm import LLM, SamplingParams
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from vllm_rapid.testing.overlap import summarize_overlap
from vllm_rapid.worker.lane_control import worker_cpu_cores

pytestmark = pytest.mark.slow

ENGINE_KWARGS = dict(
    dtype="float32",
    max_model_len=4096,
    max_num_batched_tokens=4096,
    enforce_eager=True,
    seed=0,
    distributed_executor_backend="mp",  # the worker (and its two lanes) in its own process, as in production
)


def make_llm(model: str, scheduler: str, kv_bytes: int = 64 << 20, max_model_len: int = 4096,
             engine_kwargs: dict | None = None, **rapid_options) -> LLM:
    rapid_options = {"debug_invariants": True, **rapid_options}  # the scheduler checks its lifecycle every step
    extra = {"additional_config": {"rapid": rapid_options}} if scheduler == "rapid" else {}
    kwargs = ENGINE_KWARGS | {"max_model_len": max_model_len, "max_num_batched_tokens": max_model_len}
    kwargs |= engine_kwargs or {}
    return LLM(model, scheduler=scheduler, kv_cache_memory_bytes=kv_bytes, disable_log_stats=False,
               **kwargs, **extra)


def scheduler_of(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.scheduler


def prompts_of_lengths(lengths: list[int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(2, 400) for _ in range(n)]} for n in lengths]


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def run_until_idle(llm: LLM, timeout_s: float = 120.0) -> dict[str, object]:
    """Step the engine until no request is left; return the final RequestOutput of each request."""
    engine, finished, deadline = llm.llm_engine, {}, time.monotonic() + timeout_s
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "engine did not drain"
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def decode_while_prefilling(llm: LLM, first: list, second: list, params: SamplingParams) -> dict[str, object]:
    """``first`` (ids a0, a1, ...) decodes when ``second`` (b0, ...) arrives, so the prefill lane runs ``second``
    beside a decode batch; every request's final output, once idle."""
    engine = llm.llm_engine
    params = params.clone()
    params.output_kind = RequestOutputKind.CUMULATIVE  # every step's tokens (LLM.generate sets FINAL_ONLY on params)
    for i, prompt in enumerate(first):
        engine.add_request(f"a{i}", prompt, params)
    while not any(o.outputs[0].token_ids for o in engine.step()):
        pass
    for i, prompt in enumerate(second):
        engine.add_request(f"b{i}", prompt, params)
    return run_until_idle(llm)


def assert_idle_and_clean(llm: LLM) -> None:
    """No request left anywhere, every KV block back in the pool, no runner state left in either lane."""
    sched = scheduler_of(llm)
    # The steps a server's engine loop still makes: it steps while the scheduler has work, which includes a prefill
    # batch in flight whose requests were all aborted, and the step that tells the runners which requests finished.
    for _ in range(1000):
        if not (sched.has_requests() or sched.has_finished_requests()):
            break
        llm.llm_engine.step()
    assert not sched.running and not sched.waiting and not sched.requests
    assert sched.inflight_prefill is None
    assert sched.get_kv_cache_usage() == 0.0
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # block 0 is vLLM's reserved null block
    assert set(llm.collective_rpc("rapid_num_request_states")) == {0}  # every rank


@pytest.fixture(scope="module")
def default_llm(tiny_model):
    return make_llm(tiny_model, "default")


@pytest.fixture(scope="module")
def rapid_llm(tiny_model):
    return make_llm(tiny_model, "rapid", record_lane_events=True)


MIXED_LENGTHS = [1, 3, 7, 16, 31, 64, 100, 127, 128, 129, 200, 255, 256, 300, 400, 511,
                 512, 600, 700, 800, 900, 1000, 1100, 1200, 1300, 1500, 1700, 1900, 2000, 2200, 2500, 3000]


def test_greedy_outputs_match_default_scheduler(default_llm, rapid_llm):
    prompts = prompts_of_lengths(MIXED_LENGTHS)
    assert len(prompts) == 32
    params = [SamplingParams(temperature=0.0, max_tokens=8 + i % 17, ignore_eos=True) for i in range(32)]
    expected = token_ids(default_llm.generate(prompts, params, use_tqdm=False))
    got = token_ids(rapid_llm.generate(prompts, params, use_tqdm=False))
    assert got == expected
    assert_idle_and_clean(rapid_llm)


def test_seeded_sampling_matches_default_scheduler(default_llm, rapid_llm):
    """The sampling generator moves with the request from the prefill lane to the decode lane."""
    prompts = prompts_of_lengths([5, 50, 500, 1500], seed=1)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=24, ignore_eos=True)
              for i in range(len(prompts))]
    expected = token_ids(default_llm.generate(prompts, params, use_tqdm=False))
    assert token_ids(rapid_llm.generate(prompts, params, use_tqdm=False)) == expected


def test_single_token_and_parallel_sampling_match_default(default_llm, rapid_llm):
    """Requests that finish on the prefill lane, and n > 1 seeded sampling."""
    prompts = prompts_of_lengths([5, 300, 700], seed=7)
    for case_prompts, params in [
        (prompts, SamplingParams(temperature=0.0, max_tokens=1)),
        (prompts[:2], SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=6)),
    ]:
        expected = default_llm.generate(case_prompts, params, use_tqdm=False)
        got = rapid_llm.generate(case_prompts, params, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in expected]
    assert_idle_and_clean(rapid_llm)


def test_structured_output_is_enforced_on_both_lanes(rapid_llm):
    """The grammar bitmask reaches the prefill lane (first token) and the decode lane (the rest).

    Not compared token by token with the default scheduler: under the grammar the few allowed first tokens of this
    random model can be near-ties, and which one wins then depends on how the lanes happened to batch the prompts.
    """
    choices = ["alpha", "beta", "gamma"]
    params = SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=StructuredOutputsParams(choice=choices))
    prompts = ["Pick one:", "Hello world! Pick one:", "0123456789 choose:", *(["Pick one:"] * 3)]
    outputs = rapid_llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].text in choices for o in outputs] == [True] * len(prompts)
    assert all(o.outputs[0].finish_reason == "stop" for o in outputs)
    assert_idle_and_clean(rapid_llm)


def test_decode_is_not_blocked_by_a_long_prefill(small_model, monkeypatch):
    # The lanes get every core (vLLM keeps none for the engine core's poller), so the ARM has a partition to give.
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    llm = make_llm(small_model, "rapid", record_lane_events=True)
    engine = llm.llm_engine
    decode_params = SamplingParams(temperature=0.0, max_tokens=3000, ignore_eos=True)
    for i, prompt in enumerate(prompts_of_lengths([8, 12, 16, 20])):
        engine.add_request(f"d{i}", prompt, decode_params)
    for _ in range(40):  # prefill the short prompts, then decode alone for a while
        engine.step()
    engine.add_request("long", prompts_of_lengths([2500], seed=2)[0],
                       SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    split_during_prefill = None
    first_token_seen = False
    while not first_token_seen:
        first_token_seen = any(o.request_id == "long" and o.outputs[0].token_ids for o in engine.step())
        if split_during_prefill is None and scheduler_of(llm).inflight_prefill is not None:
            split_during_prefill = llm.collective_rpc("rapid_arm_state")[0]["split"]
    for _ in range(10):
        engine.step()
    events = llm.collective_rpc("rapid_lane_events")[0]
    # One timer: the decode step time in the stats (metrics, the ARM's observation) is the lane's record of it.
    last = [e for e in events if e["lane"] == "decode"][-1]
    assert last["label"] == "decode"
    assert scheduler_of(llm).lane_stats().step.decode_step_ms == pytest.approx((last["end"] - last["start"]) * 1e3)
    engine.abort_request([f"d{i}" for i in range(4)])
    run_until_idle(llm)

    summary = summarize_overlap(events, min_prefill_tokens=2000)
    assert summary.prefill_tokens == 2500  # the whole prompt as one batch on the prefill lane
    # Decode steps complete while the prefill is in flight: the step is clocked by decode, not by the prefill...
    assert summary.decode_steps_during >= 3, summary
    # ...each runs the whole decode batch, and no decode step waited out the prefill (hybrid batching would).
    assert summary.decode_batch_sizes_during == (4,)
    assert not summary.decode_step_spanning_prefill
    # Decode inter-token latency during the prefill stays within 2x of decode alone (same recorded steps).
    assert summary.itl_ratio <= 2.0, summary
    # The split reported is the one in effect: with both lanes busy the cores are divided between their teams.
    cores = len(os.sched_getaffinity(0))
    assert split_during_prefill is not None
    if cores >= 2:
        assert not split_during_prefill["full_overlap"], split_during_prefill
        assert split_during_prefill["decode_units"] + split_during_prefill["prefill_units"] == cores
    assert_idle_and_clean(llm)
    del llm


def _step_until(llm: LLM, predicate, limit: int = 500) -> list:
    outputs = []
    for _ in range(limit):
        outputs += llm.llm_engine.step()
        if predicate():
            return outputs
    raise AssertionError("condition not reached")


def test_abort_while_prefill_in_flight_frees_blocks_only_after_the_lane_is_done(small_model):
    llm = make_llm(small_model, "rapid", idle_wait_ms=0.01)
    engine, sched = llm.llm_engine, scheduler_of(llm)
    pool = sched.kv_cache_manager.block_pool
    keep = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    engine.add_request("long-a", prompts_of_lengths([2500], seed=3)[0], keep)
    engine.add_request("long-b", prompts_of_lengths([1200], seed=4)[0], keep)
    _step_until(llm, lambda: sched.inflight_prefill is not None)
    inflight = sched.inflight_prefill
    victim = next(r for r in inflight.req_ids if "long-a" in r)
    free_before = pool.get_num_free_blocks()
    engine.abort_request(["long-a"])
    assert sched.inflight_prefill is inflight, "the prefill finished too fast for this test to mean anything"
    # The aborted request is gone from the scheduler, but the lane may still write its blocks: none is reusable.
    assert victim not in sched.requests
    assert pool.get_num_free_blocks() == free_before
    assert any(r.request_id == victim for r in inflight.fenced_frees)
    finished = run_until_idle(llm)
    assert "long-a" not in finished or finished["long-a"].outputs[0].finish_reason == "abort"
    assert len(finished["long-b"].outputs[0].token_ids) == 16  # the other request lost nothing
    assert_idle_and_clean(llm)


def test_prefix_blocks_are_published_only_after_the_lane_wrote_them(tiny_model, default_llm):
    """A request admitted while a decode step fills a block must not get a prefix hit on that block."""
    llm = make_llm(tiny_model, "rapid")
    engine, sched = llm.llm_engine, scheduler_of(llm)
    block_size = sched.block_size
    base = prompts_of_lengths([block_size - 1], seed=5)[0]["prompt_token_ids"]
    engine.add_request("D", {"prompt_token_ids": base}, SamplingParams(temperature=0.0, max_tokens=8,
                                                                       ignore_eos=True))
    first = []
    while not first:
        first = [o.outputs[0].token_ids[0] for o in engine.step() if o.request_id == "D" and o.outputs[0].token_ids]
    # D now holds block_size tokens; its next decode step writes the block's last slot. E shares that whole block.
    e_prompt = base + first[:1] + list(range(10, 60))
    engine.add_request("E", {"prompt_token_ids": e_prompt}, SamplingParams(temperature=0.0, max_tokens=4,
                                                                           ignore_eos=True))
    finished = run_until_idle(llm)
    assert finished["E"].num_cached_tokens == 0  # vLLM alone would report block_size cached tokens here
    expected = default_llm.generate([{"prompt_token_ids": e_prompt}],
                                    SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert list(finished["E"].outputs[0].token_ids) == token_ids(expected)[0]
    # Once written, the block is shared as usual.
    engine.add_request("F", {"prompt_token_ids": e_prompt}, SamplingParams(temperature=0.0, max_tokens=1))
    assert run_until_idle(llm)["F"].num_cached_tokens >= block_size
    assert_idle_and_clean(llm)


def test_preemption_under_kv_pressure_loses_nothing(tiny_model, default_llm):
    prompts = prompts_of_lengths([150, 200, 250, 300, 120, 180, 220, 260], seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    expected = token_ids(default_llm.generate(prompts, params, use_tqdm=False))
    llm = make_llm(tiny_model, "rapid", kv_bytes=2 << 20, max_model_len=1024)  # 16 blocks: too few for all
    got = token_ids(llm.generate(prompts, params, use_tqdm=False))
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert preemptions > 0, "the KV cache was large enough that nothing was preempted"
    assert got == expected
    assert_idle_and_clean(llm)


def test_arm_state_is_exported(rapid_llm):
    """On CPU the lanes are threads: with no prefill running, decode has every core vLLM gives the worker (the
    paper's P100-D100)."""
    rapid_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)  # decisions, also when run alone
    state = rapid_llm.collective_rpc("rapid_arm_state")[0]
    assert state["backend"] == "threads"
    cores = worker_cpu_cores(rapid_llm.llm_engine.vllm_config.parallel_config)
    assert state["label"] == "P100-D100" and state["split"]["total_units"] == cores
    assert state["reason"] in {"light_load", "no_decode"} and state["detail"]


def _fail_after(n: int, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args={"fail_after_tokens": n})


@pytest.fixture(scope="module")
def failing_llm(tiny_model):
    from failing_logits import failing_logits_processor

    return make_llm(tiny_model, "rapid", engine_kwargs={"logits_processors": [failing_logits_processor()]})


def test_a_failed_prefill_batch_fails_only_its_requests(failing_llm, default_llm):
    """A prefill batch that raises fails its requests with an error; requests decoding meanwhile finish exactly as
    without the failure, every block comes back, and the engine keeps serving."""
    llm = failing_llm
    engine, sched = llm.llm_engine, scheduler_of(llm)
    keep = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    survivors = prompts_of_lengths([40, 90, 300], seed=11)
    for i, prompt in enumerate(survivors):
        engine.add_request(f"ok-{i}", prompt, keep)
    # The survivors decode before the poisoned request arrives, so they are never in its batch.
    _step_until(llm, lambda: sched.running and not any(map(sched.in_prefill_lane, sched.running)))
    engine.add_request("poison", prompts_of_lengths([200], seed=12)[0], _fail_after(0))
    finished = run_until_idle(llm)
    assert finished["poison"].outputs[0].finish_reason == "error"
    assert not finished["poison"].outputs[0].token_ids
    expected = token_ids(default_llm.generate(survivors, keep, use_tqdm=False))
    assert [list(finished[f"ok-{i}"].outputs[0].token_ids) for i in range(3)] == expected
    assert_idle_and_clean(llm)
    _still_serving(llm)


def test_a_failed_decode_step_fails_only_the_decode_batch(failing_llm, default_llm):
    """A decode step that raises fails the decode batch's requests; the prefill in flight on the other lane and
    its request carry on exactly as without the failure."""
    llm = failing_llm
    engine, sched = llm.llm_engine, scheduler_of(llm)
    engine.add_request("poison", prompts_of_lengths([30], seed=17)[0], _fail_after(3))
    _step_until(llm, lambda: sched.running and not sched.in_prefill_lane(sched.running[0]))
    long_prompt = prompts_of_lengths([3000], seed=18)[0]
    keep = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    engine.add_request("long", long_prompt, keep)
    outputs = _step_until(llm, lambda: "poison" not in {r.request_id.rsplit("-", 1)[0] for r in sched.running})
    assert any("long" in rid for rid in (sched.inflight_prefill.req_ids if sched.inflight_prefill else ())), (
        "the long prefill finished before the decode failure: this test would mean nothing"
    )
    finished = {o.request_id: o for o in outputs if o.finished} | run_until_idle(llm)
    assert finished["poison"].outputs[0].finish_reason == "error"
    assert len(finished["poison"].outputs[0].token_ids) == 3
    assert list(finished["long"].outputs[0].token_ids) == token_ids(
        default_llm.generate([long_prompt], keep, use_tqdm=False))[0]
    assert_idle_and_clean(llm)
    _still_serving(llm)


def _still_serving(llm: LLM) -> None:
    """The next requests through both lanes complete normally."""
    keep = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    after = llm.generate(prompts_of_lengths([20, 500], seed=13), keep, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in after] == [24, 24]
    assert_idle_and_clean(llm)


def test_a_failed_prefill_batch_fails_all_its_requests_and_only_them(failing_llm):
    """Requests batched with a poisoned one on the prefill lane fail with it; those queued behind it do not."""
    llm = failing_llm
    engine = llm.llm_engine
    keep = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.add_request("poison", prompts_of_lengths([100], seed=14)[0], _fail_after(0))
    engine.add_request("batch-mate", prompts_of_lengths([60], seed=15)[0], keep)
    outputs = engine.step()  # one prefill batch with both
    engine.add_request("later", prompts_of_lengths([50], seed=16)[0], keep)
    finished = {o.request_id: o for o in outputs if o.finished} | run_until_idle(llm)
    reasons = {rid: out.outputs[0].finish_reason for rid, out in finished.items()}
    assert reasons == {"poison": "error", "batch-mate": "error", "later": "length"}
    assert_idle_and_clean(llm)


def test_aborts_at_every_stage_free_every_block(small_model):
    """Abort one request queued behind a busy prefill lane, one in the prefill batch in flight and one decoding, all
    in the same step: the others finish whole, and every block and runner state comes back."""
    llm = make_llm(small_model, "rapid", idle_wait_ms=0.01)
    engine, sched = llm.llm_engine, scheduler_of(llm)
    keep = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    engine.add_request("decoding", prompts_of_lengths([30], seed=31)[0], keep)
    engine.add_request("decoding-kept", prompts_of_lengths([40], seed=32)[0], keep)
    _step_until(llm, lambda: sched.running and not any(map(sched.in_prefill_lane, sched.running)))
    engine.add_request("in-flight", prompts_of_lengths([2500], seed=33)[0], keep)
    _step_until(llm, lambda: sched.inflight_prefill is not None)
    engine.add_request("queued", prompts_of_lengths([200], seed=34)[0], keep)
    engine.add_request("queued-kept", prompts_of_lengths([100], seed=35)[0], keep)
    assert sched.inflight_prefill is not None, "the prefill finished too fast for this test to mean anything"
    assert {r.request_id.rsplit("-", 1)[0] for r in sched.waiting} == {"queued", "queued-kept"}
    engine.abort_request(["queued", "in-flight", "decoding"])
    finished = run_until_idle(llm)
    assert {rid for rid in finished if finished[rid].outputs[0].finish_reason == "length"} == {
        "decoding-kept", "queued-kept"}
    assert all(len(finished[rid].outputs[0].token_ids) == 16 for rid in ("decoding-kept", "queued-kept"))
    assert_idle_and_clean(llm)
