"""RAPID answers as vLLM's default scheduler does, on real vLLM (CPU build), where two lanes once made it differ.

Each test runs the same requests through an engine with ``scheduler="default"`` and one with ``scheduler="rapid"``
(the reference is always vLLM's own scheduler on the same input), except where vLLM itself defines the expectation
(a grammar's choices, a run repeated in a fresh engine). Prompts are fresh per test, so the two engines' prefix
caches hold the same history when a test compares hit counts.
"""

from __future__ import annotations

import json

import pytest
from test_rapid_engine import (
    assert_idle_and_clean,
    decode_while_prefilling,
    make_llm,
    prompts_of_lengths,
    run_until_idle,
    scheduler_of,
    token_ids,
)
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_llm(tiny_model):
    return make_llm(tiny_model, "default")


@pytest.fixture(scope="module")
def rapid_llm(tiny_model):
    return make_llm(tiny_model, "rapid")


def both(default_llm, rapid_llm):
    return {"default": default_llm, "rapid": rapid_llm}


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


@pytest.mark.parametrize("kind", ["choice", "json"])
def test_structured_outputs_stay_valid_with_both_lanes_busy(rapid_llm, kind):
    """Issue 10 item 1: with a decode batch and a prefill batch both under a grammar in one step, every request's
    output obeys its grammar and none fails (the lanes' bitmasks were views of one buffer)."""
    if kind == "choice":
        choices = ["alpha", "beta", "gamma", "delta"]
        structured = StructuredOutputsParams(choice=choices)
        valid = lambda text: text in choices  # noqa: E731
    else:
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                  "additionalProperties": False}
        structured = StructuredOutputsParams(json=schema)
        valid = lambda text: isinstance(json.loads(text).get("n"), int)  # noqa: E731
    params = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=structured)
    prompts = [f"Pick {i}:" for i in range(8)]
    finished = decode_while_prefilling(rapid_llm, prompts, [p + " now" for p in prompts], params)  # both lanes
    assert len(finished) == 16
    texts = {rid: (o.outputs[0].finish_reason, o.outputs[0].text) for rid, o in finished.items()}
    # No request fails (vLLM's "Failed to advance FSM" errors) and every completed one obeys its grammar; a random
    # model may fill 48 tokens with an ever longer integer before closing its JSON.
    assert {reason for reason, _ in texts.values()} <= {"stop", "length"}, texts
    stopped = [text for reason, text in texts.values() if reason == "stop"]
    assert len(stopped) >= 8 and all(valid(text) for text in stopped), texts
    assert_idle_and_clean(rapid_llm)


def _cached_tokens(llm, prompts: list, params: SamplingParams) -> list[int]:
    return [o.num_cached_tokens for o in llm.generate(prompts, params, use_tqdm=False)]


def test_requests_that_finish_on_their_first_token_reach_the_prefix_cache(default_llm, rapid_llm):
    """Issue 10 item 2: max_tokens=1 (cache warm-up, scoring, beam search steps): the repeat hits the prompt."""
    prompt = prompts_of_lengths([2000], seed=101)[0]
    hits = {}
    for name, llm in both(default_llm, rapid_llm).items():
        _cached_tokens(llm, [prompt], greedy(1))
        hits[name] = _cached_tokens(llm, [prompt], greedy(1))
    assert hits["rapid"] == hits["default"] and hits["default"][0] > 0, hits
    assert_idle_and_clean(rapid_llm)


def test_a_second_turn_hits_the_block_the_first_turn_completed_last(default_llm, rapid_llm):
    """Issue 10 item 2: the block a request fills on its last decode step is published too."""
    block = scheduler_of(rapid_llm).block_size
    prompt = prompts_of_lengths([block - 8], seed=102)[0]["prompt_token_ids"]
    hits = {}
    for name, llm in both(default_llm, rapid_llm).items():
        # Nine tokens: the last decode step writes the KV of the eighth, the block's last slot.
        first = token_ids(llm.generate([{"prompt_token_ids": prompt}], greedy(9), use_tqdm=False))[0]
        turn2 = {"prompt_token_ids": prompt + first + [5, 6, 7]}
        hits[name] = _cached_tokens(llm, [turn2], greedy(2))
    assert hits["rapid"] == hits["default"] == [block], hits
    assert_idle_and_clean(rapid_llm)


def test_requests_prefilled_together_share_a_new_common_prefix(default_llm, rapid_llm):
    """Issue 10 item 3: ten requests with a fresh 1,024-token prefix at once, and n=4 children of one prompt."""
    prefix = prompts_of_lengths([1024], seed=103)[0]["prompt_token_ids"]
    tails = prompts_of_lengths([5 + 7 * i for i in range(10)], seed=104)
    prompts = [{"prompt_token_ids": prefix + t["prompt_token_ids"]} for t in tails]
    parent = prompts_of_lengths([512], seed=105)
    hits = {}
    for name, llm in both(default_llm, rapid_llm).items():
        together = sum(_cached_tokens(llm, prompts, greedy(2)))
        children = llm.generate(parent, SamplingParams(n=4, temperature=0.8, seed=1, max_tokens=2), use_tqdm=False)
        hits[name] = (together, children[0].num_cached_tokens)
    assert hits["rapid"] == hits["default"] and hits["default"][0] > 0, hits
    assert_idle_and_clean(rapid_llm)


def test_prompt_logprobs_of_a_prompt_whose_last_chunk_is_one_token(tiny_model, default_llm):
    """Issue 10 item 6: the one-token last chunk of a chunked prompt ran on the decode lane, whose runner had no
    prompt-logprobs state for it."""
    llm = make_llm(tiny_model, "rapid", prefill_chunk_tokens=256)
    prompt = prompts_of_lengths([257], seed=106)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    expected = default_llm.generate(prompt, params, use_tqdm=False)[0].prompt_logprobs
    got = llm.generate(prompt, params, use_tqdm=False)[0].prompt_logprobs
    assert len(got) == len(expected) == 257 and got[0] is None
    for position, (mine, theirs) in enumerate(zip(got[1:], expected[1:]), start=1):
        assert mine.keys() == theirs.keys(), position
        assert all(mine[t].logprob == pytest.approx(theirs[t].logprob, abs=1e-4) for t in theirs), position
    assert_idle_and_clean(llm)
    llm.llm_engine.engine_core.shutdown()


def test_reset_prefix_cache_with_running_requests_while_a_prefill_is_in_flight(small_model, default_llm):
    """Issue 10 item 7: vLLM preempts every running request and resets the cache; with a prefill batch in flight
    RAPID did the first and then raised, its fenced blocks still held."""
    llm = make_llm(small_model, "rapid", idle_wait_ms=0.01)
    engine, sched = llm.llm_engine, scheduler_of(llm)
    warm = prompts_of_lengths([2000], seed=112)
    llm.generate(warm, greedy(1), use_tqdm=False)  # in the prefix cache before the reset
    keep = greedy(16)
    engine.add_request("decoding", prompts_of_lengths([30], seed=107)[0], keep)
    while not sched.running or any(map(sched.in_prefill_lane, sched.running)):
        engine.step()
    engine.add_request("long", prompts_of_lengths([2500], seed=108)[0], keep)
    while sched.inflight_prefill is None:
        engine.step()
    assert llm.reset_prefix_cache(reset_running_requests=True) is True
    finished = run_until_idle(llm)
    assert {rid: len(o.outputs[0].token_ids) for rid, o in finished.items()} == {"decoding": 16, "long": 16}
    assert sched.get_kv_cache_usage() == 0.0
    assert llm.generate(warm, greedy(1), use_tqdm=False)[0].num_cached_tokens == 0  # the reset did happen
    assert_idle_and_clean(llm)
    llm.llm_engine.engine_core.shutdown()


UNSEEDED_LENGTHS = [5, 60, 300, 1200, 5000]  # 5,000 tokens is chunked (4,096-token batches)


CHUNKED = {"max_num_batched_tokens": 4096}


def _unseeded_run(model: str) -> list[list[int]]:
    llm = make_llm(model, "rapid", max_model_len=8192, engine_kwargs=CHUNKED)
    try:
        params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True)
        return token_ids(llm.generate(prompts_of_lengths(UNSEEDED_LENGTHS, seed=109), params, use_tqdm=False))
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_unseeded_sampling_is_the_same_on_every_run(tiny_model):
    """Issue 10 item 8: LLM(seed=0), unseeded random sampling, two fresh engines: the same samples, as vLLM gives.
    The 5,000-token prompt is prefilled in chunks, so on CPU this also covers seeded chunked prompts (vLLM's CPU
    runner raised 'CPU Generator does not use offset' for them)."""
    first, second = _unseeded_run(tiny_model), _unseeded_run(tiny_model)
    assert first == second
    assert len({tuple(t) for t in first}) == len(first)  # really random: no two prompts sampled alike


def test_a_seeded_chunked_prompt_fails_nothing_on_cpu(tiny_model, default_llm):
    """A seeded request whose prompt is chunked, batched with an unseeded one: both complete (the default scheduler's
    engine dies on this in vLLM 0.32's CPU runner), and the greedy batch-mate's tokens are the default's."""
    llm = make_llm(tiny_model, "rapid", max_model_len=8192, engine_kwargs=CHUNKED)
    long_seeded, mate = prompts_of_lengths([5000, 200], seed=110)
    outputs = llm.generate([long_seeded, mate], [SamplingParams(temperature=0.9, seed=7, max_tokens=8), greedy(8)],
                           use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [8, 8]
    assert list(outputs[1].outputs[0].token_ids) == token_ids(default_llm.generate([mate], greedy(8),
                                                                                   use_tqdm=False))[0]
    assert_idle_and_clean(llm)
    llm.llm_engine.engine_core.shutdown()


def test_an_idle_engine_frees_a_batch_whose_requests_were_all_aborted(small_model):
    """Issue 10 item 4: clients gone during their prefill; the engine core's loop keeps stepping while the batch is in
    flight (has_requests), collects it and frees every block, with no new request arriving."""
    llm = make_llm(small_model, "rapid")
    engine, core, sched = llm.llm_engine, llm.llm_engine.engine_core.engine_core, scheduler_of(llm)
    for i, prompt in enumerate(prompts_of_lengths([3000, 40], seed=111)):
        engine.add_request(f"gone{i}", prompt, greedy(8))
    while sched.inflight_prefill is None:
        engine.step()
    engine.abort_request(["gone0", "gone1"])
    steps = 0
    while core.scheduler.has_requests():  # what the engine core's busy loop steps on between client requests
        core.step()
        steps += 1
        assert steps < 10_000, "the engine never went idle"
    assert sched.inflight_prefill is None and sched.get_kv_cache_usage() == 0.0
    assert_idle_and_clean(llm)
    llm.llm_engine.engine_core.shutdown()
