"""Shared fixtures: a tiny random-weight Llama made on the spot (no model hub is reachable in CI)."""

from __future__ import annotations

import os

import pytest

# Engines in these tests run their engine core inside the test process, so tests can look at the scheduler and
# its KV-cache manager directly. Workers still run in their own process, as in production.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

if os.environ.get("VLLM_RAPID_TEST_RUNNER") == "v2":
    # The engine tests on vLLM's model runner V2, its Triton kernels in Triton's interpreter (vllm_rapid.testing.
    # v2_cpu): set for this process before vLLM is imported, and for every process it starts.
    import runpy

    from vllm_rapid.testing.v2_cpu import SITE, v2_cpu_env

    os.environ.update(v2_cpu_env())
    runpy.run_path(str(SITE / "sitecustomize.py"))  # what Python runs at start-up in the processes this one starts


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Llama (hidden 128) with a locally trained tokenizer and seeded random weights (vLLM's dummy weights
    would make almost every logit a tie; see ``vllm_rapid.testing.tiny_model``)."""
    from vllm_rapid.testing.tiny_model import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> str:
    """A somewhat larger model (4 layers, hidden 256), so a long prefill takes many decode steps' time."""
    from vllm_rapid.testing.tiny_model import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("small-llama"), hidden_size=256, num_layers=4))
