"""The harness that runs vLLM's own tests against RAPID (vllm_rapid.testing.vllm_suite), without vLLM's tests.

The suite itself runs from .ci/run (``python -m vllm_rapid.testing.vllm_suite``); here, in seconds: the adapter that
presents RAPID's two-batch step as vLLM's one-batch step, and the selection's consistency.
"""

from __future__ import annotations

import pytest
from vllm.v1.structured_output import StructuredOutputManager

from vllm_rapid.core.compat import model_runner_output
from vllm_rapid.testing.scheduler import SchedulerSetup, make_requests, prompts_of_lengths
from vllm_rapid.testing.vllm_suite import selection
from vllm_rapid.testing.vllm_suite.adapter import CombinedRapidScheduler, CombinedSchedulerOutput
from vllm_rapid.testing.vllm_suite.sdist import SDISTS


def make_combined(**changes) -> CombinedRapidScheduler:
    setup = SchedulerSetup(**changes)
    vllm_config = setup.vllm_config()
    return CombinedRapidScheduler(
        vllm_config=vllm_config,
        kv_cache_config=setup.kv_cache_config(),
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=setup.block_size,
        log_stats=True,
    )


def run_step(scheduler: CombinedRapidScheduler, token: int = 7) -> CombinedSchedulerOutput:
    """One step as vLLM's tests make it: every scheduled request that completes its tokens samples ``token``."""
    output = scheduler.schedule()
    req_ids = list(output.num_scheduled_tokens)
    sampled = [[] if scheduler.requests[r].is_prefill_chunk else [token] for r in req_ids]
    scheduler.update_from_output(output, model_runner_output(req_ids, sampled_token_ids=sampled))
    return output


def test_one_step_shows_both_lanes_and_completes_the_prefill_batch():
    scheduler = make_combined()
    decoding, long = make_requests(prompts_of_lengths([20, 300]), ids=["decoding", "long"])
    scheduler.add_request(decoding)
    first = run_step(scheduler)
    assert first.rapid_step is not None and first.rapid_step.prefill is not None
    assert [r.req_id for r in first.scheduled_new_reqs] == ["decoding"]
    assert scheduler.inflight_prefill is None  # completed within the step

    scheduler.add_request(long)
    second = run_step(scheduler)
    assert second.rapid_step.num_scheduled_tokens == {"decoding": 1}  # the decode lane's batch
    assert second.rapid_step.prefill.scheduler_output.num_scheduled_tokens == {"long": 300}
    assert second.num_scheduled_tokens == {"decoding": 1, "long": 300}
    assert second.total_num_scheduled_tokens == 301
    assert [r.req_id for r in second.scheduled_new_reqs] == ["long"]
    assert second.scheduled_cached_reqs.req_ids == ["decoding"]
    assert list(decoding.output_token_ids) == [7, 7] and list(long.output_token_ids) == [7]


def test_every_request_finishes_and_every_block_comes_back():
    scheduler = make_combined(num_blocks=40)
    for request in make_requests(prompts_of_lengths([5, 40, 90, 130, 17])):
        scheduler.add_request(request)
    for _ in range(50):
        if not scheduler.has_requests():
            break
        run_step(scheduler)
    assert not scheduler.has_requests()
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


@pytest.mark.parametrize("version", selection.SELECTIONS)
def test_selection_is_consistent(version):
    chosen = selection.for_version(version)
    assert version in SDISTS  # its tests come from a pinned sdist
    selected = [*chosen.scheduler_tests, *chosen.engine_tests]
    assert len(selected) == len(set(selected))
    for entry, reason in {**chosen.by_design, **chosen.rapid_bugs}.items():
        assert reason.strip(), entry
        assert chosen.group_of(entry) is not None or any(selection.matches(entry, e) for e in selected), entry
    assert not set(chosen.by_design) & set(chosen.rapid_bugs)
    assert all(f.startswith("tests/") and f.endswith(".py") for f in chosen.files_to_collect())
