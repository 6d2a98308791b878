"""Graceful shutdown of ``vllm serve --scheduler rapid --shutdown-timeout N``: on SIGTERM the engine drains both
lanes (prefill batches in flight and decoding requests) before it tears down; every request in flight completes."""

from __future__ import annotations

import signal
import threading

import pytest

from vllm_rapid.testing.server import Server, metric

pytestmark = pytest.mark.slow


# Requests decoding for a while (long enough that they still decode while the long prompts arrive and prefill, also
# on a slow machine whose API server answers a /metrics scrape late), and long prompts whose prefill is in flight at
# SIGTERM; all fit the KV cache (32,768 tokens).
SHORT, LONG = 6, 3
SHORT_TOKENS, LONG_PROMPT = 1536, 3000


def test_sigterm_drains_both_lanes(small_model, tmp_path):
    from openai import OpenAI

    args = ["--scheduler", "rapid", "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
            "--kv-cache-memory-bytes", str(128 << 20), "--shutdown-timeout", "60"]
    with Server(small_model, args, tmp_path / "server.log") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="EMPTY", timeout=120, max_retries=0)
        client.completions.create(model=server.model, prompt="warm up", max_tokens=2)
        results: dict[int, tuple[int, str]] = {}

        def one(i: int, prompt_len: int, max_tokens: int) -> None:
            prompt = [2 + (i * 11 + j) % 300 for j in range(prompt_len)]
            response = client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0.0, extra_body={"ignore_eos": True})
            results[i] = (response.usage.completion_tokens, response.choices[0].finish_reason)

        seen: list[tuple[float, float, float]] = []  # (arrived, prefilling, decoding) at each look
        finished_before = metric(server.metrics(), "vllm:request_success_total")  # the warm-up

        def look() -> tuple[float, float, float]:
            m = server.metrics()  # one scrape: the values of one moment
            seen.append((metric(m, "vllm:num_requests_running") + metric(m, "vllm:num_requests_waiting")
                         + metric(m, "vllm:request_success_total") - finished_before,
                         metric(m, "vllm_rapid:prefill_inflight_requests"),
                         metric(m, "vllm_rapid:decode_batch_requests")))
            return seen[-1]

        def all_arrived() -> bool:
            return look()[0] == SHORT + LONG

        def draining_both_lanes() -> bool:
            _, prefilling, decoding = look()
            return prefilling >= 1 and decoding >= 1

        threads = [threading.Thread(target=one, args=(i, 30, SHORT_TOKENS)) for i in range(SHORT)]
        threads += [threading.Thread(target=one, args=(i, LONG_PROMPT, 16)) for i in range(SHORT, SHORT + LONG)]
        for thread in threads[:SHORT]:
            thread.start()
        assert _wait_for(lambda: metric(server.metrics(), "vllm_rapid:decode_batch_requests") == SHORT, 60)
        for thread in threads[SHORT:]:
            thread.start()
        # Every request has reached the engine (one arriving after SIGTERM is refused with an abort, with vLLM's own
        # scheduler too; counted with those already finished, so a slow scrape cannot miss the moment), then a
        # prefill batch is in flight and the short requests decode: ask it to stop.
        ready = _wait_for(all_arrived, 60) and _wait_for(draining_both_lanes, 60)
        assert ready, f"(arrived, prefilling, decoding), last looks: {seen[-40:]}\n{server.log_tail()}"
        server.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=180)
        assert server.proc.wait(timeout=120) == 0, server.log_tail()
    log = server.log()
    assert "[shutdown] EngineCore: draining in-flight requests" in log, server.log_tail()
    expected = {i: (SHORT_TOKENS, "length") for i in range(SHORT)}
    expected |= {i: (16, "length") for i in range(SHORT, SHORT + LONG)}
    assert results == expected, results


def _wait_for(predicate, timeout_s: float) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
