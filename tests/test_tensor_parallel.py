"""RAPID with tensor parallelism on CPU (TP=2, vLLM's multiprocess executor, shared-memory TP communicators).

Each lane runs its collectives on its own TP communicator; both lanes run at once on every rank; outputs are the
same tokens as vLLM's default scheduler at the same TP size.
"""

from __future__ import annotations

import pytest
from test_rapid_engine import assert_idle_and_clean, decode_while_prefilling, prompts_of_lengths, token_ids
from vllm import LLM, SamplingParams

pytestmark = pytest.mark.slow

# The short prompts decode while the long ones are prefilled (4,800 tokens: two prefill batches of a 4,096 budget).
SHORT, LONG = [5, 40, 17, 64], [2500, 1200, 800, 300]


def tp_llm(model: str, scheduler: str, **rapid_options) -> LLM:
    extra = {"additional_config": {"rapid": rapid_options}} if scheduler == "rapid" else {}
    return LLM(model, scheduler=scheduler, tensor_parallel_size=2, distributed_executor_backend="mp",
               dtype="float32", max_model_len=4096, max_num_batched_tokens=4096, kv_cache_memory_bytes=64 << 20,
               enforce_eager=True, seed=0, disable_log_stats=False, **extra)


def test_tp2_lanes_use_their_own_communicators_and_match_default(tiny_model, monkeypatch):
    # vLLM's CPU worker binds each rank's threads to a NUMA node of its own; this machine has one.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    prompts = prompts_of_lengths(SHORT + LONG, seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    default = tp_llm(tiny_model, "default")
    expected = token_ids(default.generate(prompts, params, use_tqdm=False))
    default.llm_engine.engine_core.shutdown()  # two cores: one TP=2 engine at a time

    rapid = tp_llm(tiny_model, "rapid", record_lane_events=True)
    try:
        groups = rapid.collective_rpc("rapid_lane_tp_groups")
        assert len(groups) == 2  # one answer per rank
        for lanes in groups:
            assert lanes["decode"].startswith("tp:") and lanes["prefill"].startswith("tp_rapid_prefill:"), lanes
        finished = decode_while_prefilling(rapid, prompts[:len(SHORT)], prompts[len(SHORT):], params)
        ids = [f"a{i}" for i in range(len(SHORT))] + [f"b{i}" for i in range(len(LONG))]
        assert sorted(finished) == sorted(ids), sorted(finished)
        assert [list(finished[i].outputs[0].token_ids) for i in ids] == expected
        # On every rank, decode steps ran while a prefill batch ran: both communicators busy at once.
        for events in rapid.collective_rpc("rapid_lane_events"):
            prefills = [e for e in events if e["lane"] == "prefill" and e["num_tokens"] > 0]
            decodes = [e for e in events if e["lane"] == "decode" and e["num_tokens"] > 0]
            during = [d for d in decodes if any(p["start"] <= d["start"] and d["end"] <= p["end"] for p in prefills)]
            assert prefills and during, (len(prefills), len(decodes))
        assert_idle_and_clean(rapid)
    finally:
        rapid.llm_engine.engine_core.shutdown()


def test_pipeline_parallelism_is_refused_with_its_reason_and_dense_data_parallelism_is_not(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_rapid.patch.engine_args import RAPID_WORKER

    args = EngineArgs(tiny_model, scheduler="rapid", load_format="dummy", pipeline_parallel_size=2)
    with pytest.raises(ValueError, match=r"does not support pipeline parallelism .*: each stage's two lanes"):
        args.create_engine_config()
    config = EngineArgs(tiny_model, scheduler="rapid", load_format="dummy", data_parallel_size=2).create_engine_config()
    assert config.parallel_config.worker_cls == RAPID_WORKER
