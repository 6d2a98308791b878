"""vllm-rapid demo: serve a tiny model with ``--scheduler rapid`` and measure what clients see.

    python examples/demo.py                       # RAPID: prefill and decode as two concurrent lanes
    python examples/demo.py --scheduler default   # vLLM's own scheduler, for comparison

The demo builds a tiny random-weight Llama in a temporary directory, starts ``vllm serve`` on a free localhost port,
sends a mix of concurrent streaming requests (a few ~1500-token prompts among many short ones), and prints TTFT and
ITL percentiles measured client-side, plus per-lane numbers: the server's own lane records (fetched through vLLM's
dev-mode ``/collective_rpc`` endpoint from ``RapidWorker.rapid_lane_events``) and the client-side view of each lane
(TTFT is the prefill lane's latency, ITL the decode lane's). The server is stopped on every exit path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_rapid.testing.server import HOST, Server, ServerStartError, metric

KV_CACHE_BYTES = 256 << 20


# ---- the server -------------------------------------------------------------------------------------------------


def server_args(scheduler: str) -> list[str]:
    """``vllm serve`` options: the tiny model in fp32 with room for the long prompts; RAPID records its lanes."""
    args = [
        "--scheduler", scheduler,
        "--dtype", "float32",
        "--max-model-len", "4096",
        "--max-num-batched-tokens", "4096",
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
        "--enforce-eager",
        "--disable-uvicorn-access-log",
    ]
    if scheduler == "rapid":
        args += ["--additional-config", json.dumps({"rapid": {"record_lane_events": True}})]
    return args


def fetch_lane_events(server: Server, **kwargs: str) -> list[dict] | None:
    """The worker's lane records (``RapidWorker.rapid_lane_events``; ``clear="1"`` also empties them), read through
    vLLM's dev-mode ``/collective_rpc``; None when it does not answer."""
    try:
        return server.collective_rpc("rapid_lane_events", **kwargs)[0]
    except (OSError, ValueError, LookupError):
        return None


# ---- the load -----------------------------------------------------------------------------------------------------


@dataclass
class Result:
    kind: str  # "long" or "short"
    prompt_tokens: int
    sent: float = 0.0  # perf_counter() when sent
    token_times: list[float] = field(default_factory=list)  # perf_counter() of each streamed chunk
    num_chunks: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def make_workload(num_requests: int, long_every: int, long_tokens: int, vocab_size: int, seed: int):
    """(kind, prompt token ids, max_tokens, start offset s): every ``long_every``-th request has a long prompt."""
    rng = random.Random(seed)
    workload, offset = [], 0.0
    for i in range(num_requests):
        long = i % long_every == long_every // 2
        n = long_tokens if long else rng.randint(16, 96)
        prompt = [rng.randrange(2, vocab_size) for _ in range(n)]  # random ids: no prefix-cache hits
        workload.append(("long" if long else "short", prompt, 16 if long else 48, offset))
        offset += rng.expovariate(12.0)  # ~12 requests/s, Poisson arrivals
    return workload


async def run_load(base_url: str, model: str, workload) -> list[Result]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="EMPTY", timeout=120.0, max_retries=0)

    async def one(kind: str, prompt: list[int], max_tokens: int, offset: float, t_start: float) -> Result:
        await asyncio.sleep(max(0.0, t_start + offset - time.perf_counter()))
        result = Result(kind, len(prompt))
        result.sent = time.perf_counter()
        try:
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                if not chunk.choices:
                    continue
                result.token_times.append(time.perf_counter())
                result.num_chunks += 1
                result.finish_reason = chunk.choices[0].finish_reason or result.finish_reason
        except Exception as exc:  # noqa: BLE001 - report, do not abort the other requests
            result.error = f"{type(exc).__name__}: {exc}"
        return result

    try:
        t_start = time.perf_counter()
        return await asyncio.gather(*(one(*w, t_start) for w in workload))
    finally:
        await client.close()


# ---- the report ---------------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Percentile by linear interpolation (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def row(name: str, values_s: list[float]) -> str:
    ms = [v * 1000 for v in values_s]
    if not ms:
        return f"  {name:<34}{0:>7}{'-':>11}{'-':>11}{'-':>11}"
    return f"  {name:<34}{len(ms):>7}{pct(ms, 50):>11.1f}{pct(ms, 90):>11.1f}{statistics.fmean(ms):>11.1f}"


def header(title: str, count: str = "n") -> str:
    return f"{title}\n  {'':<34}{count:>7}{'p50 ms':>11}{'p90 ms':>11}{'mean ms':>11}"


def overlap_s(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total time during which an interval of ``a`` and an interval of ``b`` both run."""
    total, j = 0.0, 0
    a, b = sorted(a), sorted(b)
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            total += max(0.0, min(end, b[k][1]) - max(start, b[k][0]))
            k += 1
    return total


def report(scheduler: str, results: list[Result], wall_s: float, lane_events: list[dict] | None) -> None:
    ok = [r for r in results if r.error is None and r.ttft_s is not None]
    failed = [r for r in results if r not in ok]
    ttft = [r.ttft_s for r in ok]
    itl = [x for r in ok for x in r.itls_s]
    tokens = sum(r.num_chunks for r in ok)
    n_long = sum(r.kind == "long" for r in results)
    long_tokens = max((r.prompt_tokens for r in results if r.kind == "long"), default=0)
    print()
    print(f"=== vllm-rapid demo: --scheduler {scheduler} ===")
    print(f"  requests: {len(results)} ({n_long} long ~{long_tokens} tokens, {len(results) - n_long} short), "
          f"completed {len(ok)}, failed {len(failed)}")
    print(f"  wall time {wall_s:.1f} s, {tokens} streamed tokens, {tokens / wall_s:.0f} tokens/s")
    print()
    print(header("Client-side latency"))
    print(row("TTFT  all requests", ttft))
    print(row("TTFT  long prompts", [r.ttft_s for r in ok if r.kind == "long"]))
    print(row("TTFT  short prompts", [r.ttft_s for r in ok if r.kind == "short"]))
    print(row("ITL   all requests", itl))
    print(row("ITL   while long prompts prefill", _itls_during_long_prefills(ok)))
    print()
    if scheduler == "rapid":
        print(header("Per lane, client-side view (prefill lane: TTFT, decode lane: ITL)"))
        print(row("prefill lane: TTFT", ttft))
        print(row("decode lane:  ITL", itl))
    else:
        print(header("Per phase, client-side view (one shared batch: prefill = TTFT, decode = ITL)"))
        print(row("prefill: TTFT", ttft))
        print(row("decode:  ITL", itl))
    print()
    if lane_events:
        prefill = [e for e in lane_events if e["lane"] == "prefill"]
        decode = [e for e in lane_events if e["lane"] == "decode" and e["num_tokens"] > 0]
        print(header("Per lane, server-side batch records (RapidWorker.rapid_lane_events)", "batches"))
        print(row("prefill lane: batch time", [e["end"] - e["start"] for e in prefill]))
        print(row("decode lane:  batch time", [e["end"] - e["start"] for e in decode]))
        busy_p = sum(e["end"] - e["start"] for e in prefill)
        busy_d = sum(e["end"] - e["start"] for e in decode)
        both = overlap_s([(e["start"], e["end"]) for e in prefill], [(e["start"], e["end"]) for e in decode])
        print(f"  prefill lane: {sum(e['num_tokens'] for e in prefill)} tokens, busy {busy_p:.2f} s")
        print(f"  decode lane:  {sum(e['num_tokens'] for e in decode)} tokens, busy {busy_d:.2f} s")
        share = f" ({100 * both / busy_p:.0f}% of prefill time)" if busy_p else ""
        print(f"  both lanes busy at once: {both:.2f} s{share}")
    elif scheduler == "rapid":
        print("  (server-side lane records unavailable: /collective_rpc did not answer)")
    else:
        print("  (server-side lane records: n/a, vLLM's default scheduler runs prefill and decode in one batch)")
    if failed:
        print()
        for r in failed[:5]:
            print(f"  failed {r.kind} request: {r.error}")


def report_metrics(metrics: dict[str, float]) -> None:
    """A few of RAPID's Prometheus metrics, as any scraper of the server's /metrics sees them."""
    if not any(key.startswith("vllm_rapid:") for key in metrics):
        print("  (no vllm_rapid: metrics on /metrics)")
        return
    print()
    print("RAPID metrics on /metrics (Prometheus, vllm_rapid:*)")

    def value(name: str, **labels: str) -> float:
        return metric(metrics, f"vllm_rapid:{name}", default=0.0, **labels)

    def share(name: str) -> str:
        met, missed = value(name, result="met"), value(name, result="missed")
        return f"{100 * met / (met + missed):.0f}% of {met + missed:.0f}" if met + missed else "n/a"

    print(f"  within the TTFT SLO: {share('ttft_slo_requests_total')} first tokens; within the ITL SLO: "
          f"{share('itl_slo_tokens_total')} gaps; completed within both: {share('slo_requests_total')} requests")
    for lane in ("decode", "prefill"):
        count, total = value("lane_step_seconds_count", lane=lane), value("lane_step_seconds_sum", lane=lane)
        mean = f", mean {1000 * total / count:.1f} ms" if count else ""
        print(f"  {lane} lane: {value('partition_units', lane=lane):.0f} of "
              f"{value('partition_total_units'):.0f} compute units, {count:.0f} batches{mean}")
    current = [key for key, v in metrics.items() if key.startswith("vllm_rapid:arm_reason{") and v == 1]
    reason = re.search(r'reason="([^"]*)"', current[0])[1] if current else "n/a"
    print(f"  ARM's current reason: {reason}; requests failed by a lane: {value('lane_failed_requests_total'):.0f}")


def _itls_during_long_prefills(ok: list[Result]) -> list[float]:
    """ITLs of other requests' tokens that overlap a long request's wait for its first token (its prefill):
    where a one-lane scheduler stalls decoding."""
    windows = [(r.sent, r.token_times[0]) for r in ok if r.kind == "long" and r.token_times]
    gaps = [(a, b) for r in ok if r.kind == "short" for a, b in zip(r.token_times, r.token_times[1:])]
    return [b - a for a, b in gaps if any(a < w_end and b > w_start for w_start, w_end in windows)]


# ---- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheduler", choices=["rapid", "default"], default="rapid")
    parser.add_argument("--num-requests", type=int, default=48, help="requests to send (default 48)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--long-every", type=int, default=6, help="every N-th request has a long prompt (default 6)")
    parser.add_argument("--long-prompt-tokens", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_requests < 1:
        parser.error("--num-requests must be >= 1")
    if args.long_every < 1:
        parser.error("--long-every must be >= 1")
    if not 16 <= args.long_prompt_tokens <= 4000:
        parser.error("--long-prompt-tokens must be in [16, 4000] (the server runs --max-model-len 4096)")
    return args


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # runs the finally blocks, which stop the server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vllm_rapid.testing.tiny_model import make_tiny_llama

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="vllm-rapid-demo-") as tmp:
        model = make_tiny_llama(Path(tmp) / "tiny-llama")
        vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
        env = {"VLLM_SERVER_DEV_MODE": "1",  # exposes /collective_rpc, which reads the lane records
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        server = Server(str(model), server_args(args.scheduler), Path(tmp) / "server.log", port=args.port, env=env)
        print(f"Starting vllm serve {model.name} --scheduler {args.scheduler} on {HOST}:{server.port} ...", flush=True)
        try:
            server.start()
        except ServerStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            print(f"Server healthy after {server.startup_s:.0f} s; warming up ...", flush=True)
            warmup = make_workload(2, 2, args.long_prompt_tokens, vocab_size, args.seed + 1)
            asyncio.run(run_load(server.url, str(model), warmup))
            if args.scheduler == "rapid":
                fetch_lane_events(server, clear="1")  # drop warm-up records

            workload = make_workload(args.num_requests, args.long_every, args.long_prompt_tokens, vocab_size,
                                     args.seed)
            print(f"Sending {len(workload)} concurrent streaming requests ...", flush=True)
            started = time.perf_counter()
            results = asyncio.run(run_load(server.url, str(model), workload))
            wall_s = time.perf_counter() - started
            events = fetch_lane_events(server) if args.scheduler == "rapid" else None
            report(args.scheduler, results, wall_s, events)
            if args.scheduler == "rapid":
                with contextlib.suppress(OSError):
                    report_metrics(server.metrics())
            failed = sum(r.error is not None or r.ttft_s is None for r in results)
            if failed:
                print(f"--- server log (tail) ---\n{server.log_tail()}", file=sys.stderr)
                return 1
            return 0
        finally:
            print("Stopping the server ...", flush=True)
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
