"""RapidScheduler without an engine: lane split, KV fences, lane failures and stats, step by step.

``LaneDriver`` plays RapidWorker's side of the protocol in-process (vllm_rapid.testing.scheduler); nothing of RAPID
is mocked. Where vLLM's own Scheduler defines what is right, the same requests run through it with ``StepDriver`` and
the tokens and finish reasons must match (the driver's token rule depends only on the tokens so far, as greedy
decoding does). Every test ends idle and clean: no request left, every KV block back in the pool.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

import pytest
from vllm import SamplingParams
from vllm.v1.engine import EngineCoreOutput, FinishReason
from vllm.v1.request import Request, RequestStatus

from vllm_rapid.patch.versions import vllm_in
from vllm_rapid.testing.scheduler import (
    EOS_TOKEN_ID,
    LaneDriver,
    SchedulerSetup,
    StepDriver,
    make_requests,
    make_scheduler,
    make_vllm_scheduler,
    prompts_of_lengths,
    sequence_token,
)


def greedy(max_tokens: int = 8, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def free_blocks(driver: StepDriver) -> int:
    return driver.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def blocks_in_use(driver: StepDriver, block_ids: Sequence[int]) -> list[int]:
    """Which of ``block_ids`` someone still holds."""
    pool = driver.scheduler.kv_cache_manager.block_pool
    return [b for b in block_ids if pool.blocks[b].ref_cnt > 0]


def block_ids_of(driver: StepDriver, req_id: str) -> list[int]:
    (ids,) = driver.scheduler.kv_cache_manager.get_block_ids(req_id)  # one KV-cache group
    return list(ids)


def cached_prefix_tokens(driver: StepDriver, prompt: list[int]) -> int:
    """How many tokens of ``prompt`` the prefix cache would serve a request arriving now."""
    (probe,) = make_requests([prompt], ids=["probe"])
    _, num_tokens, _ = driver.scheduler.kv_cache_manager.get_computed_blocks(probe)
    return num_tokens


def first_outputs(driver: StepDriver) -> dict[str, EngineCoreOutput]:
    """Each request's first EngineCoreOutput (the one with its prefill stats)."""
    first: dict[str, EngineCoreOutput] = {}
    for record in driver.records:
        for out in record.outputs:
            first.setdefault(out.request_id, out)
    return first


def assert_idle_and_clean(driver: StepDriver) -> None:
    scheduler = driver.scheduler
    assert not driver.busy
    assert not scheduler.requests and not scheduler.running and not scheduler.waiting
    if isinstance(driver, LaneDriver):
        assert scheduler.inflight_prefill is None and driver.inflight is None
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # block 0 is vLLM's null block


def run_on_both(
    setup: SchedulerSetup,
    arrivals: Callable[[], dict[int, list[Request]]],
    prefill_steps: int | None = 1,
    next_token: Callable[[Request], int] = sequence_token,
) -> tuple[LaneDriver, StepDriver]:
    """The same arrivals through RAPID and through vLLM's default scheduler, each until idle."""
    rapid = LaneDriver(make_scheduler(setup), next_token, prefill_steps=prefill_steps)
    reference = StepDriver(make_vllm_scheduler(setup), next_token)
    rapid.run_until_idle(arrivals())
    reference.run_until_idle(arrivals())
    return rapid, reference


# ---- the same results as vLLM's scheduler ----------------------------------------------------------------------

MIXED = [1, 3, 7, 16, 31, 64, 100, 129, 200, 300, 511, 700]


def mixed_arrivals(
    block_size: int = 16, max_tokens: Callable[[int], int] = lambda i: 3 + i % 7, lengths: list[int] = MIXED, **kw
):
    def arrivals() -> dict[int, list[Request]]:
        prompts = prompts_of_lengths(lengths)
        params = [greedy(max_tokens(i)) for i in range(len(prompts))]
        reqs = make_requests(prompts, params, block_size=block_size, **kw)
        return {0: reqs[:4], 2: reqs[4:7], 5: reqs[7:10], 9: reqs[10:]}

    return arrivals


def shared_prefix_arrivals() -> dict[int, list[Request]]:
    system, other = prompts_of_lengths([96, 40], seed=5)
    tails = prompts_of_lengths([1, 9, 17, 33, 50, 5], seed=6)
    prompts = [system + t for t in tails[:4]] + [other + t for t in tails[4:]] + [system + tails[0]]
    reqs = make_requests(prompts, greedy(5))
    return {0: reqs[:2], 1: reqs[2:4], 3: reqs[4:6], 8: reqs[6:]}


def preemption_arrivals() -> dict[int, list[Request]]:
    """Far more decode growth than KV blocks: requests are preempted and recomputed again and again."""
    reqs = make_requests(prompts_of_lengths([32] * 12 + [90, 150]), greedy(80))
    return {0: reqs[:6], 3: reqs[6:12], 10: reqs[12:]}


def eos_at_fourth_token(request: Request) -> int:
    return EOS_TOKEN_ID if request.num_output_tokens == 3 and request.num_prompt_tokens % 2 else sequence_token(request)


SCENARIOS = {
    "mixed": (SchedulerSetup(), mixed_arrivals()),
    "chunked": (SchedulerSetup(rapid={"prefill_chunk_tokens": 64}), mixed_arrivals()),
    "long_prefill_threshold": (SchedulerSetup(long_prefill_token_threshold=48), mixed_arrivals()),
    "shared_prefixes": (SchedulerSetup(), shared_prefix_arrivals),
    "single_token": (SchedulerSetup(), mixed_arrivals(max_tokens=lambda i: 1 + i % 2)),
    "kv_pressure": (SchedulerSetup(num_blocks=60, block_size=16), mixed_arrivals(max_tokens=lambda i: 40)),
    "kv_pressure_small_blocks": (
        SchedulerSetup(num_blocks=90, block_size=4, enable_prefix_caching=False),
        mixed_arrivals(block_size=4, max_tokens=lambda i: 12 + i, lengths=MIXED[:9]),  # the longest needs 50 blocks
    ),
    "heavy_preemption": (SchedulerSetup(num_blocks=30), preemption_arrivals),
    "no_chunked_prefill": (SchedulerSetup(enable_chunked_prefill=False, max_model_len=2048), mixed_arrivals()),
    "priority": (
        SchedulerSetup(policy="priority", num_blocks=80),
        mixed_arrivals(max_tokens=lambda i: 20, priorities=[i % 3 for i in range(len(MIXED))]),
    ),
    "seeded": (SchedulerSetup(), mixed_arrivals(seeds=list(range(len(MIXED))))),
    "few_seqs": (SchedulerSetup(max_num_seqs=3), mixed_arrivals()),
}


@pytest.mark.parametrize("prefill_steps", [1, 3])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tokens_and_finish_reasons_match_vllm_scheduler(scenario, prefill_steps):
    setup, arrivals = SCENARIOS[scenario]
    rapid, reference = run_on_both(setup, arrivals, prefill_steps)
    assert rapid.tokens == reference.tokens
    assert rapid.finish_reasons == reference.finish_reasons
    assert set(rapid.finish_reasons) == set(rapid.tokens)  # every request finished
    assert_idle_and_clean(rapid)
    assert_idle_and_clean(reference)


@pytest.mark.parametrize("scenario", ["mixed", "chunked", "kv_pressure", "heavy_preemption", "priority", "seeded"])
def test_v2_decode_runner_is_sent_every_request_it_does_not_hold_as_resumed(scenario):
    """With V2 runners nothing moves between the runners: the decode runner must be sent each request it does not
    hold as vLLM resumes a preempted request on V2 (all tokens so far, all blocks, its computed tokens before the
    step), and only requests it holds as cached ones. Outputs match vLLM's scheduler on the same V2 setup."""
    setup, arrivals = SCENARIOS[scenario]
    rapid, reference = run_on_both(dataclasses.replace(setup, v2_runner=True), arrivals, prefill_steps=2)
    assert rapid.tokens == reference.tokens and rapid.finish_reasons == reference.finish_reasons
    held: set[str] = set()  # what a V2 decode runner holds, replayed from the decode batches it is sent
    resumed = 0
    for record in rapid.records:
        step = record.scheduler_output
        held -= set(step.finished_req_ids) | set(step.preempted_req_ids or ())
        for new in step.scheduled_new_reqs:
            assert len(new.prefill_token_ids) == new.num_computed_tokens + step.num_scheduled_tokens[new.req_id]
            assert new.num_computed_tokens >= len(new.prompt_token_ids)  # the prompt is in the KV cache already
            assert len(new.block_ids[0]) * setup.block_size >= len(new.prefill_token_ids)
            held.add(new.req_id)
            resumed += 1
        assert set(step.scheduled_cached_reqs.req_ids) <= held, "a cached request the decode runner never got"
    assert resumed >= len(rapid.tokens)  # every request reached the decode runner through a resumption
    assert_idle_and_clean(rapid)


def test_eos_ends_requests_on_either_lane():
    """EOS sampled by the decode lane, and EOS as a request's first token (sampled by the prefill lane)."""

    def rule(request: Request) -> int:
        if request.num_prompt_tokens == 7:
            return EOS_TOKEN_ID  # first token
        return eos_at_fourth_token(request)

    rapid, reference = run_on_both(SchedulerSetup(), mixed_arrivals(max_tokens=lambda i: 10), 2, rule)
    assert rapid.tokens == reference.tokens and rapid.finish_reasons == reference.finish_reasons
    assert rapid.tokens["r2"] == [EOS_TOKEN_ID] and rapid.finish_reasons["r2"] == FinishReason.STOP
    assert sum(reason == FinishReason.STOP for reason in rapid.finish_reasons.values()) > 1
    assert_idle_and_clean(rapid)


# ---- lane split ----------------------------------------------------------------------------------------------


def test_decode_batch_holds_only_requests_past_their_prompt_and_the_prefill_lane_runs_one_batch_at_a_time():
    setup, arrivals = SCENARIOS["chunked"]
    driver = LaneDriver(make_scheduler(setup), prefill_steps=3)
    scheduler = driver.scheduler
    pending = arrivals()
    requests = {r.request_id: r for reqs in pending.values() for r in reqs}
    in_flight: int | None = None
    for k in range(1000):
        driver.add(*pending.pop(k, ()))
        if not driver.busy and not pending:
            break
        lane_free_with_work = scheduler.inflight_prefill is None and (
            bool(scheduler.waiting) or any(map(scheduler.in_prefill_lane, scheduler.running))
        )
        record = driver.step()
        decode = record.scheduler_output
        assert not decode.scheduled_new_reqs  # nobody starts on the decode lane
        cached = decode.scheduled_cached_reqs
        for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
            assert computed >= requests[req_id].num_prompt_tokens, f"{req_id} decodes before its prompt is done"
        assert set(record.decode_batch.values()) <= {1}
        if (launch := record.prefill_launch) is not None:
            assert in_flight is None, "a prefill batch launched while another one runs"
            assert launch.scheduler_output.total_num_scheduled_tokens <= 64  # rapid.prefill_chunk_tokens
            assert not set(launch.scheduler_output.num_scheduled_tokens) & set(record.decode_batch)
            in_flight = launch.batch_id
        elif lane_free_with_work:
            raise AssertionError(f"step {k}: the prefill lane was free and requests waited, but nothing launched")
        if (result := record.finished_prefill) is not None:
            assert result.batch_id == in_flight
            in_flight = None
        assert len(scheduler.running) <= setup.max_num_seqs
    assert_idle_and_clean(driver)


def test_decode_steps_keep_coming_while_a_prefill_batch_is_in_flight():
    driver = LaneDriver(make_scheduler(), prefill_steps=None)
    scheduler = driver.scheduler
    driver.add(*make_requests(prompts_of_lengths([8, 12]), greedy(40), ids=["d0", "d1"]))
    driver.step()
    driver.complete_prefill()
    driver.step()
    (long,) = make_requests(prompts_of_lengths([1500], seed=1), greedy(4), ids=["long"])
    driver.add(long)
    launched = driver.step()
    assert set(launched.prefill_launch.scheduler_output.num_scheduled_tokens) == {"long"}
    assert launched.decode_batch == {"d0": 1, "d1": 1}
    for _ in range(10):
        record = driver.step()
        assert record.decode_batch == {"d0": 1, "d1": 1}
        assert record.prefill_launch is None and record.finished_prefill is None
        assert scheduler.inflight_prefill.req_ids == {"long"}
    assert len(driver.tokens["d0"]) == 12 and driver.tokens["long"] == []
    driver.complete_prefill()
    done = driver.step()  # the result rides on this step; its decode batch was built before
    assert done.finished_prefill.batch_id == launched.prefill_launch.batch_id
    assert "long" not in done.decode_batch and len(driver.tokens["long"]) == 1
    assert "long" in driver.step().decode_batch
    driver.run_until_idle()
    assert_idle_and_clean(driver)


def test_long_prompt_is_prefilled_in_chunks_before_it_decodes():
    driver = LaneDriver(make_scheduler(rapid={"prefill_chunk_tokens": 64}), prefill_steps=2)
    (req,) = make_requests(prompts_of_lengths([200]), greedy(3), ids=["long"])
    driver.add(req)
    driver.run_until_idle()
    launches = [r.prefill_launch for r in driver.records if r.prefill_launch]
    chunks = [launch.scheduler_output.num_scheduled_tokens["long"] for launch in launches]
    assert chunks == [64, 64, 64, 8]
    first_decode = next(i for i, r in enumerate(driver.records) if r.decode_batch)
    last_result = max(i for i, r in enumerate(driver.records) if r.finished_prefill)
    assert first_decode == last_result + 1
    reference = StepDriver(make_vllm_scheduler())
    reference.run_until_idle({0: make_requests(prompts_of_lengths([200]), greedy(3), ids=["long"])})
    assert driver.tokens == reference.tokens
    assert_idle_and_clean(driver)


# ---- KV fences -------------------------------------------------------------------------------------------------


def test_no_request_is_admitted_onto_blocks_a_prefill_batch_is_still_writing():
    prompt = prompts_of_lengths([65], seed=2)[0]  # 4 full blocks and one token
    driver = LaneDriver(make_scheduler(), prefill_steps=None)
    driver.add(*make_requests([prompt], greedy(3), ids=["a"]))
    driver.step()
    assert driver.scheduler.inflight_prefill.req_ids == {"a"}
    (repeat,) = make_requests([prompt], greedy(3), ids=["b"])
    driver.add(repeat)  # arrives while a's blocks are being written
    for _ in range(3):
        record = driver.step()
        assert "b" not in record.decode_batch and record.prefill_launch is None
        assert repeat.status == RequestStatus.WAITING and repeat.num_computed_tokens == 0
    driver.complete_prefill()
    driver.step()
    admitted = driver.step().prefill_launch
    assert admitted.scheduler_output.num_scheduled_tokens == {"b": 1}  # a's 4 blocks, now written, serve the rest
    driver.run_until_idle()
    assert first_outputs(driver)["b"].prefill_stats.num_local_cached_tokens == 64
    assert driver.tokens["a"] == driver.tokens["b"]
    assert_idle_and_clean(driver)


def test_blocks_of_a_failed_prefill_batch_never_serve_a_prefix_hit():
    """A batch that raised may have written nothing: a later request with the same prompt computes it all."""
    prefix = prompts_of_lengths([64], seed=2)[0]
    driver = LaneDriver(make_scheduler(), prefill_steps=None)
    driver.add(*make_requests([prefix + [5], prefix + [6]], greedy(3), ids=["a0", "a1"]))
    driver.step()
    driver.complete_prefill(error="prefill batch 0 failed: RuntimeError: boom")
    driver.step()
    assert driver.finish_reasons == {"a0": FinishReason.ERROR, "a1": FinishReason.ERROR}
    driver.run_until_idle({0: make_requests([prefix + [5]], greedy(3), ids=["b"])})
    assert first_outputs(driver)["b"].prefill_stats.num_local_cached_tokens == 0
    assert_idle_and_clean(driver)


def start_decoding(driver: LaneDriver, prompt_len: int = 20, max_tokens: int = 60, req_id: str = "d") -> None:
    """A request decoding alongside, so the engine keeps stepping while the test's batch is in flight."""
    driver.add(*make_requests(prompts_of_lengths([prompt_len], seed=9), greedy(max_tokens), ids=[req_id]))
    driver.step()
    if driver.inflight is not None:
        driver.complete_prefill()
    driver.step()


def test_request_aborted_while_its_prefill_is_in_flight_keeps_its_blocks_until_the_batch_completes():
    driver = LaneDriver(make_scheduler(num_blocks=100), prefill_steps=None)
    start_decoding(driver)
    driver.add(*make_requests(prompts_of_lengths([300, 40], seed=3), greedy(5), ids=["x", "y"]))
    driver.step()
    assert driver.scheduler.inflight_prefill.req_ids == {"x", "y"}
    x_blocks = block_ids_of(driver, "x")
    assert len(x_blocks) == 19
    free = free_blocks(driver)
    driver.abort("x")
    assert "x" not in driver.scheduler.requests
    assert [r.request_id for r in driver.scheduler.inflight_prefill.fenced_frees] == ["x"]
    driver.add(*make_requests(prompts_of_lengths([200], seed=4), greedy(5), ids=["z"]))  # wants blocks
    for _ in range(4):
        driver.step()
        assert blocks_in_use(driver, x_blocks) == x_blocks  # the prefill lane may still write them
        assert free_blocks(driver) <= free
        free = free_blocks(driver)
    driver.complete_prefill()
    done = driver.step()
    assert blocks_in_use(driver, x_blocks) == []
    assert free_blocks(driver) == free + len(x_blocks)
    assert "x" not in {out.request_id for out in done.outputs} and driver.tokens["x"] == []
    driver.run_until_idle()
    assert "x" not in driver.finish_reasons  # aborted by the client: no output at all
    reference = StepDriver(make_vllm_scheduler(num_blocks=100))
    reference.run_until_idle({0: make_requests(prompts_of_lengths([20], seed=9), greedy(60), ids=["d"]),
                              1: make_requests(prompts_of_lengths([300, 40], seed=3)[1:], greedy(5), ids=["y"]),
                              2: make_requests(prompts_of_lengths([200], seed=4), greedy(5), ids=["z"])})
    assert {k: v for k, v in driver.tokens.items() if k != "x"} == reference.tokens
    assert_idle_and_clean(driver)


def test_abort_while_the_step_that_completes_its_prefill_runs():
    """The engine core handles aborts that arrived during a step before it processes that step's outputs."""
    driver = LaneDriver(make_scheduler(), prefill_steps=None)
    start_decoding(driver)
    driver.add(*make_requests(prompts_of_lengths([100, 50], seed=3), greedy(4), ids=["x", "y"]))
    driver.step()
    x_blocks = block_ids_of(driver, "x")
    driver.complete_prefill()
    done = driver.step(abort=["x"])
    assert done.finished_prefill is not None
    assert blocks_in_use(driver, x_blocks) == []
    assert {out.request_id for out in done.outputs} == {"d", "y"}
    driver.run_until_idle()
    assert driver.tokens["x"] == [] and len(driver.tokens["y"]) == 4
    assert_idle_and_clean(driver)


# ---- lane failures ---------------------------------------------------------------------------------------------


def test_failed_prefill_batch_fails_exactly_its_requests():
    driver = LaneDriver(make_scheduler(), prefill_steps=None)
    start_decoding(driver)
    driver.add(*make_requests(prompts_of_lengths([120, 30], seed=3), greedy(4), ids=["a", "b"]))
    driver.step()
    batch_blocks = block_ids_of(driver, "a") + block_ids_of(driver, "b")
    driver.add(*make_requests(prompts_of_lengths([50], seed=4), greedy(4), ids=["c"]))  # queued behind the batch
    driver.complete_prefill(error="prefill batch 1 failed: RuntimeError: boom")
    failed = driver.step()
    assert {out.request_id: out.finish_reason for out in failed.outputs if out.finish_reason} == {
        "a": FinishReason.ERROR,
        "b": FinishReason.ERROR,
    }
    assert "a" not in driver.scheduler.requests and "b" not in driver.scheduler.requests
    assert blocks_in_use(driver, batch_blocks) == []
    assert failed.lane_stats.step.failed_reqs == 2
    assert "d" in failed.decode_batch and len(driver.tokens["d"]) == 3  # decode carries on in that very step
    driver.run_until_idle()
    assert driver.tokens["a"] == driver.tokens["b"] == []
    assert driver.finish_reasons["c"] == driver.finish_reasons["d"] == FinishReason.LENGTH
    reference = StepDriver(make_vllm_scheduler())
    reference.run_until_idle({0: make_requests(prompts_of_lengths([20], seed=9), greedy(60), ids=["d"]),
                              1: make_requests(prompts_of_lengths([50], seed=4), greedy(4), ids=["c"])})
    assert {k: driver.tokens[k] for k in ("c", "d")} == reference.tokens
    assert_idle_and_clean(driver)


def test_failed_decode_step_fails_the_decode_batch_and_nothing_else():
    driver = LaneDriver(make_scheduler(), prefill_steps=None)
    start_decoding(driver, req_id="d0")
    start_decoding(driver, prompt_len=33, req_id="d1")
    driver.add(*make_requests(prompts_of_lengths([80], seed=3), greedy(4), ids=["x"]))
    driver.step()
    decode_blocks = block_ids_of(driver, "d0") + block_ids_of(driver, "d1")
    driver.complete_prefill()  # x's result rides on the failing step
    failed = driver.step(decode_error="decode failed: RuntimeError: boom")
    assert set(failed.decode_batch) == {"d0", "d1"}
    assert {out.request_id: out.finish_reason for out in failed.outputs} == {
        "d0": FinishReason.ERROR,
        "d1": FinishReason.ERROR,
        "x": None,  # its first token
    }
    assert blocks_in_use(driver, decode_blocks) == []
    assert failed.lane_stats.step.failed_reqs == 2
    driver.run_until_idle()
    assert driver.finish_reasons["x"] == FinishReason.LENGTH
    reference = StepDriver(make_vllm_scheduler())
    reference.run_until_idle({0: make_requests(prompts_of_lengths([80], seed=3), greedy(4), ids=["x"])})
    assert driver.tokens["x"] == reference.tokens["x"]
    assert_idle_and_clean(driver)


# ---- stats -----------------------------------------------------------------------------------------------------


def test_lane_stats_report_queue_batch_in_flight_and_decode_batch():
    driver = LaneDriver(make_scheduler(), prefill_steps=None, decode_step_ms=2.0, prefill_batch_ms=30.0)
    driver.add(*make_requests(prompts_of_lengths([40, 60]), greedy(3), ids=["a", "b"]))
    stats = driver.step().lane_stats
    assert (stats.prefill_queue_reqs, stats.prefill_inflight_reqs, stats.prefill_inflight_tokens) == (0, 2, 100)
    assert (stats.step.decode_batch_reqs, stats.step.decode_step_ms, stats.step.prefill_batch_ms) == (0, None, None)
    driver.add(*make_requests(prompts_of_lengths([25], seed=1), greedy(3), ids=["c"]))
    stats = driver.step().lane_stats
    assert (stats.prefill_queue_reqs, stats.prefill_inflight_reqs, stats.prefill_inflight_tokens) == (1, 2, 100)
    driver.complete_prefill()
    stats = driver.step().lane_stats
    assert (stats.prefill_queue_reqs, stats.prefill_inflight_reqs, stats.prefill_inflight_tokens) == (1, 0, 0)
    step = stats.step
    assert (step.prefill_batch_ms, step.prefill_batch_tokens, step.decode_batch_reqs) == (30.0, 100, 0)
    stats = driver.step().lane_stats  # a and b decode; c goes to the prefill lane
    assert (stats.prefill_queue_reqs, stats.prefill_inflight_reqs, stats.prefill_inflight_tokens) == (0, 1, 25)
    assert (stats.step.decode_batch_reqs, stats.step.decode_step_ms, stats.step.prefill_batch_ms) == (2, 2.0, None)
    assert stats.step.failed_reqs == 0
    driver.run_until_idle()
    assert_idle_and_clean(driver)


def test_one_stats_record_per_engine_step():
    setup, arrivals = SCENARIOS["chunked"]
    driver = LaneDriver(make_scheduler(setup), prefill_steps=2)
    driver.run_until_idle(arrivals())
    assert any(r.finished_prefill and r.decode_batch for r in driver.records)  # both lanes' outputs in one step
    for record in driver.records:
        assert len(record.scheduler_stats) == 1
        step = record.lane_stats.step
        assert step.decode_batch_reqs == len(record.decode_batch)
        assert (step.decode_step_ms is not None) == bool(record.decode_batch)
        assert (step.prefill_batch_ms is not None) == (record.finished_prefill is not None)
        if record.finished_prefill is not None:
            launch = next(r.prefill_launch for r in driver.records
                          if r.prefill_launch and r.prefill_launch.batch_id == record.finished_prefill.batch_id)
            assert step.prefill_batch_tokens == launch.scheduler_output.total_num_scheduled_tokens
    assert_idle_and_clean(driver)


def test_make_stats_before_the_first_step():
    """Issue 10 item 4 (fixed: the step stats start empty instead of missing, so this raised TypeError)."""
    driver = LaneDriver(make_scheduler())
    stats = driver.scheduler.make_stats()
    assert stats.plugin_stats["rapid"]["prefill_inflight_reqs"] == 0
    assert_idle_and_clean(driver)


# ---- vLLM's semantics where two lanes once differed (issue 10) ---------------------------------------------------


def test_request_finishing_on_its_first_token_publishes_its_prompt_blocks():
    prompt = prompts_of_lengths([64], seed=3)[0]
    for driver in (LaneDriver(make_scheduler()), StepDriver(make_vllm_scheduler())):
        driver.run_until_idle({0: make_requests([prompt], greedy(1), ids=["a"])})
        driver.run_until_idle({0: make_requests([prompt], greedy(1), ids=["b"])})
        assert first_outputs(driver)["b"].prefill_stats.num_local_cached_tokens == 48, type(driver.scheduler)
        assert_idle_and_clean(driver)


def test_blocks_completed_by_a_requests_last_decode_step_are_published():
    """A follow-up turn (prompt = the last turn's prompt and output) hits every block the last turn wrote."""
    prompt = prompts_of_lengths([16], seed=3)[0]
    for driver in (LaneDriver(make_scheduler()), StepDriver(make_vllm_scheduler())):
        driver.run_until_idle({0: make_requests([prompt], greedy(17), ids=["turn1"])})
        follow_up = prompt + driver.tokens["turn1"] + [7, 8, 9]  # the 17th output token is position 32
        driver.run_until_idle({0: make_requests([follow_up], greedy(2), ids=["turn2"])})
        assert first_outputs(driver)["turn2"].prefill_stats.num_local_cached_tokens == 32, type(driver.scheduler)
        assert_idle_and_clean(driver)


def test_requests_prefilled_in_one_batch_share_a_new_common_prefix():
    prefix = prompts_of_lengths([64], seed=3)[0]
    for driver in (LaneDriver(make_scheduler()), StepDriver(make_vllm_scheduler())):
        driver.add(*make_requests([prefix + [5], prefix + [6]], greedy(3)))
        driver.step()
        shared = set(block_ids_of(driver, "r0")) & set(block_ids_of(driver, "r1"))
        assert len(shared) == 4, type(driver.scheduler)  # the prefix's 4 full blocks
        driver.run_until_idle()
        assert_idle_and_clean(driver)


PRIORITY_SETUP = SchedulerSetup(
    num_blocks=8, block_size=4, max_num_batched_tokens=16, max_num_seqs=4, policy="priority",
    enable_prefix_caching=False, long_prefill_token_threshold=8, rapid={"prefill_chunk_tokens": 8},
)


def priority_pair() -> list[Request]:
    """h (priority 0) decodes; l (priority 1) is prefilled in chunks beside it until the blocks run out."""
    return make_requests(
        prompts_of_lengths([4, 24]), [greedy(20), greedy(2)], ids=["h", "l"], priorities=[0, 1], block_size=4
    )


def test_decode_preemption_picks_the_lowest_priority_victim_of_either_lane():
    """When h needs a block, l holds the rest, between two of its chunks (not in flight): vLLM preempts l."""
    reference = StepDriver(make_vllm_scheduler(PRIORITY_SETUP))
    h, low = priority_pair()
    reference.run_until_idle({0: [h, low]})
    assert (h.num_preemptions, low.num_preemptions) == (0, 1)
    driver = LaneDriver(make_scheduler(PRIORITY_SETUP), prefill_steps=2)
    h, low = priority_pair()
    driver.run_until_idle({0: [h, low]})
    assert driver.tokens == reference.tokens
    assert h.num_preemptions == 0
    assert_idle_and_clean(driver)


def test_reset_prefix_cache_with_a_prefill_batch_in_flight():
    """All running requests are preempted; the one in flight keeps its blocks until its batch completes."""
    driver = LaneDriver(make_scheduler(), prefill_steps=None)
    start_decoding(driver)
    driver.add(*make_requests(prompts_of_lengths([100], seed=1), greedy(4), ids=["x"]))
    driver.step()
    x_blocks = block_ids_of(driver, "x")
    d_prompt = driver.scheduler.requests["d"].prompt_token_ids
    assert driver.scheduler.reset_prefix_cache(reset_running_requests=True) is True
    assert blocks_in_use(driver, x_blocks) == x_blocks
    driver.complete_prefill()
    driver.step()
    assert blocks_in_use(driver, x_blocks) == []
    assert cached_prefix_tokens(driver, d_prompt) == 0  # the reset ran once the lane was done with the batch
    driver.run_until_idle()
    reference = StepDriver(make_vllm_scheduler())
    reference.run_until_idle({0: make_requests(prompts_of_lengths([20], seed=9), greedy(60), ids=["d"]),
                              2: make_requests(prompts_of_lengths([100], seed=1), greedy(4), ids=["x"])})
    assert driver.tokens == reference.tokens
    assert_idle_and_clean(driver)


def test_engine_keeps_stepping_while_a_prefill_batch_is_in_flight():
    driver = LaneDriver(make_scheduler(), prefill_steps=None)
    driver.add(*make_requests(prompts_of_lengths([300]), greedy(4), ids=["x"]))
    driver.step()
    driver.abort("x")  # the client goes away while its prompt is prefilled
    driver.step()  # the step that tells the worker; the batch is still running
    assert driver.scheduler.inflight_prefill is not None
    assert driver.busy, "the engine core would stop stepping: nobody collects the batch or frees its blocks"
    driver.complete_prefill()
    driver.run_until_idle()
    assert_idle_and_clean(driver)


def test_requests_preempted_by_one_decode_step_keep_their_fcfs_order():
    setup = SchedulerSetup(num_blocks=4, block_size=4, enable_prefix_caching=False)  # three blocks to share

    def waiting_after_preemption(driver: StepDriver) -> list[str]:
        driver.add(*make_requests(prompts_of_lengths([4, 4, 4]), greedy(3), block_size=4))
        while not driver.step().scheduler_output.preempted_req_ids:
            pass
        order = [r.request_id for r in driver.scheduler.waiting]
        driver.run_until_idle()
        assert_idle_and_clean(driver)
        return order

    assert waiting_after_preemption(StepDriver(make_vllm_scheduler(setup))) == ["r1", "r2"]
    assert waiting_after_preemption(LaneDriver(make_scheduler(setup))) == ["r1", "r2"]


FCFS_SETUP = SchedulerSetup(
    num_blocks=8, block_size=4, max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=False,
    long_prefill_token_threshold=8, rapid={"prefill_chunk_tokens": 8},
)


def fcfs_pair() -> list[Request]:
    """o (older) decodes; n (newer) is prefilled in chunks beside it until the blocks run out."""
    return make_requests(prompts_of_lengths([4, 24]), [greedy(20), greedy(2)], ids=["o", "n"], block_size=4)


def test_decode_preemption_takes_the_newest_request_of_either_lane_under_fcfs():
    """When o needs a block, n (newest, between two of its chunks) holds the rest: vLLM preempts n, never o."""
    reference = StepDriver(make_vllm_scheduler(FCFS_SETUP))
    o, n = fcfs_pair()
    reference.run_until_idle({0: [o, n]})
    assert (o.num_preemptions, n.num_preemptions) == (0, 1)
    driver = LaneDriver(make_scheduler(FCFS_SETUP), prefill_steps=2)
    o, n = fcfs_pair()
    driver.run_until_idle({0: [o, n]})
    assert driver.tokens == reference.tokens
    assert (o.num_preemptions, n.num_preemptions) == (0, 1)
    assert_idle_and_clean(driver)


def test_a_decode_request_waits_for_a_newer_request_in_flight_instead_of_being_preempted():
    """o (two prompt tokens, one block) decodes; n (newer) fills every other block, its batch in flight. When o
    needs its second block, the newest request is n, whose blocks come back only when its batch completes: o waits
    for that rather than being preempted in n's place (as vLLM's policy would never choose it)."""
    setup = SchedulerSetup(num_blocks=8, block_size=4, max_num_batched_tokens=32, enable_prefix_caching=False)

    def arrivals() -> dict[int, list[Request]]:
        o, n = make_requests(prompts_of_lengths([2, 24]), [greedy(12), greedy(2)], ids=["o", "n"], block_size=4)
        return {0: [o], 2: [n]}

    driver = LaneDriver(make_scheduler(setup), prefill_steps=5)
    waves = arrivals()
    o = waves[0][0]
    driver.run_until_idle(waves)
    assert o.num_preemptions == 0
    reference = StepDriver(make_vllm_scheduler(setup))
    reference.run_until_idle(arrivals())
    assert driver.tokens == reference.tokens
    assert_idle_and_clean(driver)


def test_no_admission_in_a_step_whose_decode_pass_preempted():
    """vLLM never admits waiting requests in a step that preempted; neither does RAPID's prefill pass (seeded random
    workloads under KV pressure, priorities and staggered arrivals, where a newcomer could otherwise take the blocks
    a preemption just freed)."""
    rng = random.Random(7)
    preempting_steps = 0
    for trial in range(12):
        n = rng.randint(4, 6)
        setup = SchedulerSetup(num_blocks=rng.choice([8, 12]), block_size=4, max_num_batched_tokens=32,
                               policy="priority")
        reqs = make_requests(prompts_of_lengths([rng.randint(1, 10) for _ in range(n)], seed=trial),
                             greedy(rng.choice([6, 10, 16])), block_size=4,
                             priorities=[rng.randint(0, 2) for _ in range(n)])
        arrivals: dict[int, list[Request]] = {}
        for request in reqs:
            arrivals.setdefault(rng.randint(0, 12), []).append(request)
        driver = LaneDriver(make_scheduler(setup), prefill_steps=1)
        driver.run_until_idle(arrivals)
        for record in driver.records:
            if record.scheduler_output.preempted_req_ids:
                preempting_steps += 1
                assert record.scheduler_output.prefill is None, f"trial {trial}: admitted in a preempting step"
        assert_idle_and_clean(driver)
    assert preempting_steps > 0


def test_streaming_input_sessions_fail_with_a_reason():
    """A streaming-input session (a resumable request) is refused on arrival with a clear reason; others run."""
    driver = LaneDriver(make_scheduler())
    session, plain = make_requests(prompts_of_lengths([20, 30], seed=4), greedy(4), ids=["session", "plain"])
    session.resumable = True
    driver.add(session, plain)
    driver.run_until_idle()
    finishes = {out.request_id: out.finish_reason for record in driver.records for out in record.outputs
                if out.finish_reason is not None}
    assert finishes == {"session": FinishReason.ERROR, "plain": FinishReason.LENGTH}
    assert driver.tokens["session"] == [] and len(driver.tokens["plain"]) == 4
    assert_idle_and_clean(driver)


def test_step_stats_ride_with_the_outputs_of_another_client():
    """When the decode part of a step has nothing for any client, vLLM's update gives the stats to client 0; merged
    with a finished prefill's outputs for client 1, they ride there instead of in a message of their own."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats

    from vllm_rapid.core.scheduler import _merge_outputs

    prefill = {1: EngineCoreOutputs(outputs=[EngineCoreOutput(request_id="p", new_token_ids=[5])])}
    decode = {0: EngineCoreOutputs(scheduler_stats=SchedulerStats())}
    merged = _merge_outputs(prefill, decode)
    assert list(merged) == [1] and merged[1].scheduler_stats is not None and merged[1].outputs


def test_iteration_details_count_the_prefill_batch_a_step_launches():
    import vllm.v1.engine.core as core

    driver = LaneDriver(make_scheduler(), prefill_steps=None)  # the scheduler wraps vLLM's count on start-up
    driver.add(*make_requests(prompts_of_lengths([300, 40], seed=5), greedy(4)))
    step = driver.step().scheduler_output
    details = core.compute_iteration_details(step)
    assert (details.num_ctx_requests, details.num_ctx_tokens) == (2, 340)
    driver.complete_prefill()
    driver.run_until_idle()
    assert_idle_and_clean(driver)


def test_data_parallel_prefill_throttling_defers_prefills_beside_a_decode():
    """vLLM's DP prefill balancing: a throttled step schedules no prefill while a request decodes, unless the
    waiting queue is capacity-bound (decided over both lanes, and the decode pass does not reset that)."""
    driver = LaneDriver(make_scheduler(), prefill_steps=1)
    start_decoding(driver)
    driver.add(*make_requests(prompts_of_lengths([40], seed=6), greedy(3), ids=["new"]))
    driver.throttle_prefills = True
    driver.scheduler.prefill_capacity_bound = False
    assert driver.step().scheduler_output.prefill is None
    driver.scheduler.prefill_capacity_bound = True
    launched = driver.step().scheduler_output.prefill
    assert launched is not None and "new" in launched.scheduler_output.num_scheduled_tokens
    driver.throttle_prefills = False
    driver.run_until_idle()
    assert_idle_and_clean(driver)


@pytest.mark.skipif(not vllm_in(since="0.33"), reason="vLLM 0.33 added the local prefill cadence")
def test_prefill_cadence_holds_prefill_for_the_same_engine_steps_as_vllm():
    """--prefill-schedule-interval 4: vLLM holds prefill while a request decodes until 4 executed steps have passed
    since the last prefill step. RAPID runs vLLM's pass twice per engine step, so it applies the rule itself, per
    engine step: its prefill batches launch on exactly the steps where vLLM's scheduler prefills."""
    setup = SchedulerSetup(prefill_schedule_interval=4)

    def arrivals() -> dict[int, list[Request]]:
        reqs = make_requests(prompts_of_lengths([20, 30, 40, 50, 60], seed=7), greedy(24))
        return {0: reqs[:1], 2: reqs[1:2], 3: reqs[2:3], 6: reqs[3:4], 11: reqs[4:]}

    rapid, reference = run_on_both(setup, arrivals)
    vllm_prefill_steps = [
        k for k, record in enumerate(reference.records)
        if record.scheduler_output.scheduled_new_reqs or any(n > 1 for n in record.decode_batch.values())
    ]
    rapid_prefill_steps = [k for k, record in enumerate(rapid.records) if record.prefill_launch is not None]
    assert vllm_prefill_steps == [0, 4, 8, 12]  # arrivals at steps 2, 3, 6 and 11 held
    assert rapid_prefill_steps == vllm_prefill_steps
    assert rapid.tokens == reference.tokens and rapid.finish_reasons == reference.finish_reasons
    assert rapid.scheduler.num_executed_steps == reference.scheduler.num_executed_steps  # engine steps, not passes
    assert_idle_and_clean(rapid)
