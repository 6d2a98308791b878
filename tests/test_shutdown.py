"""Graceful shutdown of ``vllm serve --scheduler rapid --shutdown-timeout N``: on SIGTERM the engine drains both
lanes (prefill batches in flight and decoding requests) before it tears down; every request in flight completes."""

from __future__ import annotations

import signal
import threading

import pytest

from vllm_rapid.testing.server import Server, metric

pytestmark = pytest.mark.slow


def test_sigterm_drains_both_lanes(tiny_model, tmp_path):
    from openai import OpenAI

    args = ["--scheduler", "rapid", "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
            "--kv-cache-memory-bytes", str(64 << 20), "--shutdown-timeout", "60"]
    with Server(tiny_model, args, tmp_path / "server.log") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="EMPTY", timeout=120, max_retries=0)
        client.completions.create(model=server.model, prompt="warm up", max_tokens=2)
        results: dict[int, tuple[int, str]] = {}

        def one(i: int) -> None:
            # Long prompts put prefill batches in flight while the short ones decode.
            prompt = [2 + (i * 11 + j) % 300 for j in range(2500 if i % 3 == 0 else 30)]
            response = client.completions.create(model=server.model, prompt=prompt, max_tokens=64,
                                                 temperature=0.0, extra_body={"ignore_eos": True})
            results[i] = (response.usage.completion_tokens, response.choices[0].finish_reason)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
        for thread in threads:
            thread.start()
        # Wait until every request is in the engine (one that arrives after SIGTERM is refused with an abort, with
        # vLLM's own scheduler too) and both lanes have work (a prefill batch in flight, a decode batch running).
        def all_in_and_both_lanes_busy() -> bool:
            m = server.metrics()
            in_engine = metric(m, "vllm:num_requests_running") + metric(m, "vllm:num_requests_waiting")
            return (in_engine == 9 and metric(m, "vllm_rapid:prefill_inflight_requests") >= 1
                    and metric(m, "vllm_rapid:decode_batch_requests") >= 1)

        assert _wait_for(all_in_and_both_lanes_busy, timeout_s=60), server.log_tail()
        server.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=180)
        assert server.proc.wait(timeout=120) == 0, server.log_tail()
    log = server.log()
    assert "[shutdown] EngineCore: draining in-flight requests" in log, server.log_tail()
    assert results == {i: (64, "length") for i in range(9)}, results


def _wait_for(predicate, timeout_s: float) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
