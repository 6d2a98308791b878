"""Load test of ``vllm serve --scheduler rapid`` through the OpenAI server: thousands of completions offered faster
than the server can serve them, streamed and not, with ~15% cancelled by the client at random moments and a few
prompts over ``--max-model-len``; afterwards the server must be idle with an empty KV cache and flat memory.

Nothing here measures speed: no assertion depends on latency or throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass

import pytest

from vllm_rapid.testing.server import Server, metric, parse_metrics

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 512
# Small on purpose (8,192 tokens for the tiny model): 64 running requests of up to ~330 tokens do not all fit, so
# the load also goes through the scheduler's KV-pressure (preemption) paths.
KV_CACHE_BYTES = 8 * 1024 * 1024
MAX_NUM_SEQS = 64
OFFERED_RATE = 250.0  # requests/s, about twice what the server manages on 2 cores
MAX_IN_FLIGHT = 192  # bounded, so the client itself stays healthy
REQUEST_TIMEOUT_S = 150
LOAD_TIMEOUT_S = 200
PEAKS: dict[str, float] = {}
IDLE_TIMEOUT_S = 60
ABORT_FRACTION = 0.15
TOKEN_IDS = (2, 400)  # the tiny tokenizer has ~430 tokens; 0 and 1 are <s> and </s>
_TEXT = ("The quick brown fox jumps over the lazy dog . Prefill and decode share one GPU and one KV cache . "
         "Large language models generate text one token at a time . Serving systems trade latency against "
         "throughput . Hello world ! How are you today ? 0123456789 + - * / = ( ) [ ] { } < >")
WORDS = _TEXT.split()


def aborted_in_log(server: Server) -> int:
    """Request ids in the server's "Aborted request(s) ..." lines (vLLM logs them with --enable-log-requests)."""
    count = 0
    for line in server.log().splitlines():
        if "Aborted request(s) " in line:
            count += len(line.split("Aborted request(s) ", 1)[1].rstrip(".").split(","))
    return count


def tree_rss(server: Server) -> int:
    """Resident memory of ``vllm serve`` and every process under it (API server, engine core, worker)."""
    import psutil

    root = psutil.Process(server.proc.pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """ONE ``vllm serve --scheduler rapid`` for the module, with a small KV cache and a short max model length."""
    args = [
        "--scheduler", "rapid",
        "--dtype", "float32",
        "--enforce-eager",
        "--seed", "0",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", str(MAX_NUM_SEQS),
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
        "--disable-uvicorn-access-log",
        # "Aborted request(s) ..." lines show that client cancels reached the engine (vLLM's metrics do not count
        # client aborts); --max-log-len keeps the per-request lines short.
        "--enable-log-requests",
        "--max-log-len", "0",
    ]
    with Server(tiny_model, args, tmp_path_factory.mktemp("load") / "server.log") as srv:
        yield srv


# ---------------------------------------------------------------------------------------------------------------
# The request mix


@dataclass
class Spec:
    index: int
    prompt: list[int] | str
    max_tokens: int
    stream: bool
    ignore_eos: bool
    too_long: bool = False
    # How the client cancels it (None: it does not): "delay" cancels the whole request after abort_after_s
    # (which may land before the first byte, mid-prefill or mid-decode); "chunks" drops a streamed response after
    # abort_after_chunks data chunks.
    abort: str | None = None
    abort_after_s: float = 0.0
    abort_after_chunks: int = 0


@dataclass
class Outcome:
    spec: Spec
    kind: str  # "ok" | "aborted" | "rejected" | "error"
    status: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    text: str = ""
    error: str = ""
    chunks: int = 0


def make_specs(n: int, seed: int, n_too_long: int) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        long_prompt = rng.random() < 0.2
        length = rng.randint(200, 300) if long_prompt else rng.randint(8, 200)
        if rng.random() < 0.6:
            prompt: list[int] | str = [rng.randrange(*TOKEN_IDS) for _ in range(length)]
        else:
            # A text prompt: at most ``length`` characters, so at most ``length`` tokens (byte-level BPE).
            words, size = [], 0
            while True:
                word = rng.choice(WORDS)
                if size + len(word) + 1 > length:
                    break
                words.append(word)
                size += len(word) + 1
            prompt = " ".join(words) or "Hello"
        spec = Spec(i, prompt, max_tokens=rng.randint(4, 32), stream=rng.random() < 0.5,
                    ignore_eos=rng.random() < 0.5)
        if rng.random() < ABORT_FRACTION:
            if spec.stream and rng.random() < 0.4:
                spec.abort, spec.abort_after_chunks = "chunks", rng.randint(1, max(1, spec.max_tokens // 2))
            elif long_prompt and rng.random() < 0.5:
                spec.abort, spec.abort_after_s = "delay", rng.uniform(0.0, 0.05)  # early: likely in prefill
            else:
                # Mostly while it waits in the overloaded engine or runs; some before it even gets there.
                when = rng.random()
                spec.abort = "delay"
                spec.abort_after_s = (rng.uniform(0.0, 0.01) if when < 0.25 else rng.uniform(0.01, 0.3) if when < 0.75
                                      else rng.uniform(0.3, 3.0))
        specs.append(spec)
    # A few prompts over --max-model-len, spread through the load.
    for k in range(n_too_long):
        length = rng.randint(MAX_MODEL_LEN + 1, MAX_MODEL_LEN + 400)
        prompt = [rng.randrange(*TOKEN_IDS) for _ in range(length)] if k % 2 == 0 else "Hello world ! " * length
        spec = Spec(-1, prompt, max_tokens=rng.randint(4, 32), stream=k % 3 == 0, ignore_eos=k % 2 == 1,
                    too_long=True)
        specs.insert(rng.randrange(len(specs)), spec)
    for i, spec in enumerate(specs):
        spec.index = i
    return specs


async def _send(session, model: str, spec: Spec) -> Outcome:
    body = {"model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0.0,
            "stream": spec.stream, "ignore_eos": spec.ignore_eos}
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    async with session.post("/v1/completions", json=body) as response:
        if response.status != 200:
            text = await response.text()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                text = json.loads(text)["error"]["message"]
            return Outcome(spec, "rejected", status=response.status, error=text)
        if not spec.stream:
            data = await response.json()
            choice = data["choices"][0]
            return Outcome(spec, "ok", status=200, finish_reason=choice["finish_reason"], text=choice["text"],
                           prompt_tokens=data["usage"]["prompt_tokens"],
                           completion_tokens=data["usage"]["completion_tokens"])
        out = Outcome(spec, "ok", status=200)
        done = False
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                return Outcome(spec, "error", status=200, error=str(chunk["error"]))
            for choice in chunk.get("choices") or []:
                out.text += choice.get("text") or ""
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
            if chunk.get("usage"):
                out.prompt_tokens = chunk["usage"]["prompt_tokens"]
                out.completion_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                out.chunks += 1
                if spec.abort == "chunks" and out.chunks >= spec.abort_after_chunks and not out.finish_reason:
                    response.close()  # drop the connection mid-stream
                    return Outcome(spec, "aborted", status=200, chunks=out.chunks)
        if not done:
            return Outcome(spec, "error", status=200, error="stream ended without [DONE]", chunks=out.chunks)
        return out


async def _one(session, model: str, spec: Spec) -> Outcome:
    try:
        task = asyncio.ensure_future(_send(session, model, spec))
        if spec.abort != "delay":
            return await task
        done, _ = await asyncio.wait({task}, timeout=spec.abort_after_s)
        if done:
            return task.result()  # finished before its cancel: a normal request
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Outcome(spec, "aborted")
    except asyncio.TimeoutError:
        return Outcome(spec, "error", error=f"no answer within {REQUEST_TIMEOUT_S} s")
    except Exception as exc:  # noqa: BLE001 - every failure is reported with its request
        return Outcome(spec, "error", error=f"{type(exc).__name__}: {exc}")


async def _load(url: str, model: str, specs: list[Spec]) -> list[Outcome]:
    import aiohttp

    semaphore = asyncio.Semaphore(MAX_IN_FLIGHT)
    connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT + 8)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)

    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        async def paced(spec: Spec) -> Outcome:
            try:
                return await _one(session, model, spec)
            finally:
                semaphore.release()

        async def sample_peaks(stop: asyncio.Event) -> None:
            """Most requests seen running / waiting in the engine (printed only: shows the load overran it)."""
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    async with session.get("/metrics") as response:
                        values = parse_metrics(await response.text())
                    for key in ("running", "waiting"):
                        PEAKS[key] = max(PEAKS.get(key, 0), metric(values, f"vllm:num_requests_{key}"))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

        PEAKS.clear()
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample_peaks(stop))
        tasks = []
        t0 = time.monotonic()
        for i, spec in enumerate(specs):
            delay = t0 + i / OFFERED_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await semaphore.acquire()
            tasks.append(asyncio.ensure_future(paced(spec)))
        try:
            return await asyncio.gather(*tasks)
        finally:
            stop.set()
            await sampler


def run_load(server: Server, specs: list[Spec]) -> list[Outcome]:
    async def bounded():
        return await asyncio.wait_for(_load(server.url, server.model, specs), LOAD_TIMEOUT_S)

    try:
        outcomes = asyncio.run(bounded())
    except asyncio.TimeoutError:
        pytest.fail(f"load of {len(specs)} requests not done after {LOAD_TIMEOUT_S} s (server hung?):\n"
                    f"{server.log_tail()}\nmetrics: {engine_state(server)}")
    assert server.proc.poll() is None, f"server died under load:\n{server.log_tail()}"
    return outcomes


# ---------------------------------------------------------------------------------------------------------------
# Checks


def check_outcomes(server: Server, outcomes: list[Outcome]) -> Counter:
    problems = []
    kinds = Counter()
    for out in outcomes:
        spec = out.spec
        kinds[out.kind] += 1
        if spec.too_long:
            if out.kind != "rejected" or out.status != 400 or "maximum context length" not in out.error:
                problems.append(f"#{spec.index} over max-model-len: {out}")
            continue
        if out.kind == "aborted":
            if spec.abort is None:
                problems.append(f"#{spec.index} aborted without being cancelled: {out}")
            continue
        if out.kind != "ok":
            problems.append(f"#{spec.index} {out.kind} (status {out.status}): {out.error}")
            continue
        if isinstance(spec.prompt, list) and out.prompt_tokens != len(spec.prompt):
            problems.append(f"#{spec.index} prompt_tokens {out.prompt_tokens} != {len(spec.prompt)}")
        if not isinstance(spec.prompt, list) and not (0 < (out.prompt_tokens or 0) <= len(spec.prompt)):
            problems.append(f"#{spec.index} prompt_tokens {out.prompt_tokens} for {len(spec.prompt)} chars")
        if spec.ignore_eos:
            if out.finish_reason != "length" or out.completion_tokens != spec.max_tokens:
                problems.append(f"#{spec.index} ignore_eos: finish_reason {out.finish_reason!r}, "
                                f"{out.completion_tokens} of {spec.max_tokens} tokens")
        elif out.finish_reason == "length":
            if out.completion_tokens != spec.max_tokens:
                problems.append(f"#{spec.index} length after {out.completion_tokens} of {spec.max_tokens} tokens")
        elif out.finish_reason == "stop":
            if not 1 <= (out.completion_tokens or 0) <= spec.max_tokens:
                problems.append(f"#{spec.index} stop after {out.completion_tokens} of {spec.max_tokens} tokens")
        else:
            problems.append(f"#{spec.index} finish_reason {out.finish_reason!r}")
    assert not problems, (f"{len(problems)} bad requests of {len(outcomes)} ({dict(kinds)}):\n"
                          + "\n".join(problems[:30]) + "\n--- server log ---\n" + server.log_tail())
    return kinds


def engine_state(server: Server) -> dict[str, float]:
    values = server.metrics()
    return {
        "running": metric(values, "vllm:num_requests_running"),
        "waiting": metric(values, "vllm:num_requests_waiting"),
        "kv_cache_usage": metric(values, "vllm:kv_cache_usage_perc"),
        "length": metric(values, "vllm:request_success_total", finished_reason="length"),
        "stop": metric(values, "vllm:request_success_total", finished_reason="stop"),
        "error": metric(values, "vllm:request_success_total", finished_reason="error"),
        "preemptions": metric(values, "vllm:num_preemptions_total"),
    }


def wait_idle(server: Server) -> dict[str, float]:
    """Poll /metrics (bounded) until nothing runs or waits and the KV cache is empty; fail with the state if not."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        state = engine_state(server)
        if state["running"] == 0 and state["waiting"] == 0 and state["kv_cache_usage"] == 0:
            return state
        if time.monotonic() > deadline or server.proc.poll() is not None:
            pytest.fail(f"server not idle {IDLE_TIMEOUT_S} s after the load (leaked request or KV blocks?): "
                        f"{state}\n{server.log_tail()}")
        time.sleep(1.0)


def sanity_request(server: Server) -> None:
    body = {"model": server.model, "prompt": [5, 6, 7, 8, 9, 10, 11, 12], "max_tokens": 8, "temperature": 0.0,
            "ignore_eos": True}
    request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        data = json.loads(response.read())
    assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 8


# ---------------------------------------------------------------------------------------------------------------
# Tests

FIRST_LOAD = 2200
SECOND_LOAD = 1100
RSS: dict[str, int] = {}


def _load_and_check(server: Server, n: int, seed: int, n_too_long: int) -> tuple[Counter, dict[str, float]]:
    before, aborted_before = engine_state(server), aborted_in_log(server)
    specs = make_specs(n, seed, n_too_long)
    outcomes = run_load(server, specs)
    kinds = check_outcomes(server, outcomes)
    after = wait_idle(server)
    sanity_request(server)  # the server still answers after the load
    after = wait_idle(server)
    assert server.proc.poll() is None and server.healthy(), server.log_tail()
    assert after["error"] == before["error"], (before, after, server.log_tail())
    # Client-side cancels reached the engine as aborts (some cancels land after the request finished or before it
    # reached the server, so not all of them).
    aborted_in_engine = aborted_in_log(server) - aborted_before
    planned = sum(spec.abort is not None for spec in specs)
    assert kinds["aborted"] >= 0.5 * planned, (kinds, planned)  # the rest finished before their cancel
    assert 0.3 * kinds["aborted"] <= aborted_in_engine <= kinds["aborted"], (kinds, aborted_in_engine)
    after["aborted_by_server"] = aborted_in_engine
    return kinds, after


def test_overload_with_random_aborts(server):
    """>= 2,000 completions at ~2x capacity with ~15% client cancels and some over-long prompts."""
    kinds, state = _load_and_check(server, FIRST_LOAD, seed=1, n_too_long=12)
    assert kinds["ok"] >= 0.8 * FIRST_LOAD and kinds["rejected"] == 12, kinds
    print(f"\nload 1: {dict(kinds)}; engine: {state}; peaks: {PEAKS}")
    RSS["after_load_1"] = tree_rss(server)


def test_idle_and_memory_flat_after_second_load(server):
    """The same mix again, smaller: the server goes idle again and its process tree's memory does not grow."""
    if "after_load_1" not in RSS:  # run on its own: do the first load here
        _load_and_check(server, FIRST_LOAD, seed=1, n_too_long=12)
        RSS["after_load_1"] = tree_rss(server)
    kinds, state = _load_and_check(server, SECOND_LOAD, seed=2, n_too_long=6)
    rss_1, rss_2 = RSS["after_load_1"], tree_rss(server)
    growth = rss_2 - rss_1
    print(f"\nload 2: {dict(kinds)}; engine: {state}; peaks: {PEAKS}; "
          f"RSS {rss_1 / 2**20:.0f} -> {rss_2 / 2**20:.0f} MiB")
    assert growth < 0.10 * rss_1 or growth < 200 * 2**20, (
        f"server process tree RSS grew {growth / 2**20:.0f} MiB ({rss_1 / 2**20:.0f} -> {rss_2 / 2**20:.0f} MiB)")
