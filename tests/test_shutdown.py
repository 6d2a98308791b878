"""Graceful shutdown of ``vllm serve --scheduler rapid --shutdown-timeout N``: on SIGTERM the engine drains both
lanes (prefill batches in flight and decoding requests) before it tears down; every request in flight completes."""

from __future__ import annotations

import signal
import threading

import pytest

from vllm_rapid.testing.server import Server, metric

pytestmark = pytest.mark.slow


SHORT, LONG = 6, 3  # requests decoding for a while, and long prompts whose prefill is in flight at SIGTERM


def test_sigterm_drains_both_lanes(small_model, tmp_path):
    from openai import OpenAI

    args = ["--scheduler", "rapid", "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
            "--kv-cache-memory-bytes", str(64 << 20), "--shutdown-timeout", "60"]
    with Server(small_model, args, tmp_path / "server.log") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="EMPTY", timeout=120, max_retries=0)
        client.completions.create(model=server.model, prompt="warm up", max_tokens=2)
        results: dict[int, tuple[int, str]] = {}

        def one(i: int, prompt_len: int, max_tokens: int) -> None:
            prompt = [2 + (i * 11 + j) % 300 for j in range(prompt_len)]
            response = client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0.0, extra_body={"ignore_eos": True})
            results[i] = (response.usage.completion_tokens, response.choices[0].finish_reason)

        def in_engine() -> float:
            m = server.metrics()
            return metric(m, "vllm:num_requests_running") + metric(m, "vllm:num_requests_waiting")

        threads = [threading.Thread(target=one, args=(i, 30, 256)) for i in range(SHORT)]
        threads += [threading.Thread(target=one, args=(i, 3000, 16)) for i in range(SHORT, SHORT + LONG)]
        for thread in threads[:SHORT]:
            thread.start()
        assert _wait_for(lambda: metric(server.metrics(), "vllm_rapid:decode_batch_requests") == SHORT, 60)
        for thread in threads[SHORT:]:
            thread.start()
        # Every request is in the engine (one arriving after SIGTERM is refused with an abort, with vLLM's own
        # scheduler too), a prefill batch is in flight and the short requests decode: then ask it to stop.
        assert _wait_for(lambda: in_engine() == SHORT + LONG
                         and metric(server.metrics(), "vllm_rapid:prefill_inflight_requests") >= 1
                         and metric(server.metrics(), "vllm_rapid:decode_batch_requests") >= 1, 60), server.log_tail()
        server.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=180)
        assert server.proc.wait(timeout=120) == 0, server.log_tail()
    log = server.log()
    assert "[shutdown] EngineCore: draining in-flight requests" in log, server.log_tail()
    expected = {i: (256, "length") for i in range(SHORT)} | {i: (16, "length") for i in range(SHORT, SHORT + LONG)}
    assert results == expected, results


def _wait_for(predicate, timeout_s: float) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
