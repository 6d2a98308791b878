"""``vllm serve --scheduler rapid`` end to end: one real server (API server, engine core and worker processes) on a
tiny model, driven through the OpenAI API and ``vllm bench serve``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vllm_rapid.testing.server import HOST, Server, metric, vllm_env

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """ONE ``vllm serve --config examples/rapid.yaml`` (``scheduler: rapid``) for the whole module.

    RAPID options come from examples/rapid_config.yaml through VLLM_RAPID_CONFIG, merged with
    ``--additional-config`` (lane records on); dev mode exposes ``/collective_rpc`` to read the records.
    """
    args = [
        "--config", str(EXAMPLES / "rapid.yaml"),
        "--dtype", "float32",
        "--enforce-eager",
        "--seed", "0",
        "--additional-config", json.dumps({"rapid": {"record_lane_events": True}}),
        # Fails the lane batch of any request that asks for it (tests/failing_logits.py); inert otherwise.
        "--logits-processors", "failing_logits:FailOnRequest",
    ]
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_RAPID_CONFIG": str(EXAMPLES / "rapid_config.yaml"),
           "PYTHONPATH": str(Path(__file__).resolve().parent)}
    with Server(tiny_model, args, tmp_path_factory.mktemp("serve") / "server.log", env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key="EMPTY", timeout=120, max_retries=0) as c:
        yield c


def complete(client, model: str, endpoint: str, stream: bool, **kwargs) -> tuple[str, str | None]:
    """(text, finish_reason) of one completion or chat completion, streamed or not."""
    if endpoint == "completions":
        call = client.completions.create
        kwargs["prompt"] = "The quick brown fox jumps over the lazy dog. Serving systems trade latency"
    else:
        call = client.chat.completions.create
        kwargs["messages"] = [{"role": "user", "content": "Hello world! How are you today?"}]
    response = call(model=model, temperature=0.0, stream=stream, **kwargs)
    if not stream:
        choice = response.choices[0]
        return (choice.text if endpoint == "completions" else choice.message.content), choice.finish_reason
    text, finish_reason = [], None
    for chunk in response:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        piece = choice.text if endpoint == "completions" else choice.delta.content
        text.append(piece or "")
        finish_reason = choice.finish_reason or finish_reason
    return "".join(text), finish_reason


ENDPOINTS = ["completions", "chat"]
STREAM = pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@STREAM
def test_length_finish(server, client, endpoint, stream):
    text, finish_reason = complete(client, server.model, endpoint, stream, max_tokens=16,
                                   extra_body={"ignore_eos": True})
    assert text.strip()
    assert finish_reason == "length"


def _stop_string(text: str) -> str | None:
    """A short printable-ASCII piece of ``text`` (not at its start) whose first occurrence is where it stands."""
    for i in range(2, len(text) - 2):
        piece = text[i:i + 2]
        if piece.isascii() and piece.isprintable() and piece.strip() == piece and text.find(piece) == i:
            return piece
    return None


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@STREAM
def test_stop_finish(server, client, endpoint, stream):
    full, finish_reason = complete(client, server.model, endpoint, False, max_tokens=32,
                                   extra_body={"ignore_eos": True})
    assert finish_reason == "length"
    stop = _stop_string(full)
    if stop is None:
        pytest.skip(f"no usable stop string in the model's output {full!r}")
    text, finish_reason = complete(client, server.model, endpoint, stream, max_tokens=32, stop=[stop],
                                   extra_body={"ignore_eos": True})
    assert finish_reason == "stop", (full, stop, text)
    assert text and stop not in text
    assert full.startswith(text)  # greedy: the same tokens, cut at the stop string


def test_concurrent_mixed_requests(server, client):
    """Long and short prompts at once: every request completes with all its tokens."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int):
        prompt = [2 + (i * 7 + j) % 300 for j in range(1500 if i % 4 == 0 else 40)]
        response = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0.0,
                                             extra_body={"ignore_eos": True})
        return response.usage.prompt_tokens, response.usage.completion_tokens, response.choices[0].finish_reason

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, range(12)))
    assert sorted(r[0] for r in results) == sorted(1500 if i % 4 == 0 else 40 for i in range(12))
    assert all(r[1:] == (24, "length") for r in results)


def test_runs_rapid_scheduler(server, client):
    complete(client, server.model, "completions", False, max_tokens=8)
    log = server.log()
    assert "RAPID scheduler" in log, server.log_tail()  # the RapidScheduler's own start-up line
    # The RapidWorker's lane records (on through --additional-config, merged with VLLM_RAPID_CONFIG's file).
    results = server.collective_rpc("rapid_lane_events")
    assert len(results) == 1  # one worker
    events = results[0]
    lanes = {e["lane"] for e in events}
    assert lanes == {"prefill", "decode"}, lanes
    assert any(e["label"].startswith("prefill#") and e["num_tokens"] > 0 for e in events)
    assert any(e["label"] == "decode" and e["num_tokens"] > 0 for e in events)
    arm = server.collective_rpc("rapid_arm_state")[0]
    assert isinstance(arm, dict) and arm


def test_rapid_metrics_on_prometheus_endpoint(server, client):
    """RAPID's lane, partition and SLO metrics reach vLLM's /metrics from the engine-core process, next to vLLM's
    own, and agree with them."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int):
        prompt = [2 + (i * 5 + j) % 300 for j in range(800 if i % 3 == 0 else 30)]
        client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0.0,
                                  extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(one, range(6)))
    m = server.metrics()
    assert metric(m, "vllm_rapid:lane_step_seconds_count", lane="decode") > 0
    assert metric(m, "vllm_rapid:lane_step_seconds_count", lane="prefill") > 0
    # CPU: the lanes are OpenMP teams; units are threads, both lanes' together make the device.
    decode_units = metric(m, "vllm_rapid:partition_units", lane="decode")
    prefill_units = metric(m, "vllm_rapid:partition_units", lane="prefill")
    assert decode_units >= 1 and prefill_units >= 1
    assert metric(m, "vllm_rapid:partition_total_units") >= max(decode_units, prefill_units)
    # CPU thread splits are disjoint, or the full split on which both lanes share every core.
    assert metric(m, "vllm_rapid:partition_shared_units") in (0, metric(m, "vllm_rapid:partition_total_units"))
    reasons = {k: v for k, v in m.items() if k.startswith("vllm_rapid:arm_reason{")}
    assert sorted(reasons.values()) == [0.0] * (len(reasons) - 1) + [1.0], reasons
    # Idle now: nothing queued, nothing in flight.
    for name in ("prefill_queue_requests", "prefill_inflight_requests", "prefill_inflight_tokens"):
        assert metric(m, f"vllm_rapid:{name}") == 0, name
    assert metric(m, "vllm_rapid:slo_seconds", slo="ttft") == 2.0  # examples/rapid_config.yaml
    assert metric(m, "vllm_rapid:slo_seconds", slo="itl") == 0.1
    # SLO counters count exactly what vLLM's own latency histograms saw.
    ttft = metric(m, "vllm_rapid:ttft_slo_requests_total")
    assert ttft == metric(m, "vllm:time_to_first_token_seconds_count") > 0
    assert metric(m, "vllm_rapid:itl_slo_tokens_total") == metric(m, "vllm:inter_token_latency_seconds_count") > 0
    completed = metric(m, "vllm:request_success_total", finished_reason="stop") + metric(
        m, "vllm:request_success_total", finished_reason="length")
    assert metric(m, "vllm_rapid:slo_requests_total") == completed > 0
    assert metric(m, "vllm_rapid:lane_failed_requests_total") == metric(
        m, "vllm:request_success_total", finished_reason="error")


@pytest.mark.parametrize("lane, fail_after", [("prefill", 0), ("decode", 2)])
@STREAM
def test_a_failing_lane_batch_gets_http_500_and_the_server_keeps_serving(server, client, lane, fail_after, stream):
    import openai

    failed_before = metric(server.metrics(), "vllm_rapid:lane_failed_requests_total")
    with pytest.raises(openai.APIError) as raised:
        complete(client, server.model, "completions", stream, max_tokens=8,
                 extra_body={"ignore_eos": True, "vllm_xargs": {"fail_after_tokens": fail_after}})
    if not stream:
        assert raised.value.code == 500 or getattr(raised.value, "status_code", None) == 500
    text, finish_reason = complete(client, server.model, "completions", stream, max_tokens=8,
                                   extra_body={"ignore_eos": True})
    assert text and finish_reason == "length"
    assert server.proc.poll() is None
    assert metric(server.metrics(), "vllm_rapid:lane_failed_requests_total") == failed_before + 1
    assert f"RAPID: {lane}" in server.log()


def test_grafana_dashboard_queries_only_exported_metrics(server, client):
    """examples/grafana/vllm-rapid.json: every metric its queries name is on this server's /metrics."""
    import re

    complete(client, server.model, "completions", False, max_tokens=4)
    dashboard = json.loads((EXAMPLES / "grafana" / "vllm-rapid.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    wanted = {name for e in exprs for name in re.findall(r"\bvllm(?:_rapid)?:[a-z_]+", e)}
    exported = {key.split("{", 1)[0] for key in server.metrics()}
    assert len(wanted) > 10 and wanted <= exported, sorted(wanted - exported)


def test_bench_serve(server, tmp_path):
    result_dir = tmp_path / "bench"
    result_dir.mkdir()
    cmd = ["vllm",
        "bench", "serve",
        "--backend", "vllm",
        "--model", server.model,
        "--tokenizer", server.model,
        "--host", HOST,
        "--port", str(server.port),
        "--dataset-name", "random",
        "--num-prompts", "200",
        "--request-rate", "20",
        "--random-input-len", "256",
        "--random-output-len", "32",
        "--seed", "0",
        "--disable-tqdm",
        "--save-result",
        "--result-dir", str(result_dir),
        "--result-filename", "bench.json",
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=400, env=vllm_env(),
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((result_dir / "bench.json").read_text())
    assert result["num_prompts"] == 200
    assert result["completed"] == 200, {k: v for k, v in result.items() if not isinstance(v, list)}
    assert result["failed"] == 0
    assert result["total_output_tokens"] > 0
    assert server.proc.poll() is None  # the server survived the load
