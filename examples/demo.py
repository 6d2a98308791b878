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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 240.0
KV_CACHE_BYTES = 256 << 20

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ---- the server -------------------------------------------------------------------------------------------------


class Server:
    """``vllm serve`` in its own process group; ``stop()`` ends the whole group (API server, engine, workers)."""

    def __init__(self, model: Path, scheduler: str, port: int, log_path: Path) -> None:
        self.model, self.port, self.log_path = model, port, log_path
        self.url = f"http://{HOST}:{port}"
        cmd = [
            "vllm", "serve", str(model),
            "--scheduler", scheduler,
            "--dtype", "float32",
            "--max-model-len", "4096",
            "--max-num-batched-tokens", "4096",
            "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
            "--enforce-eager",
            "--host", HOST,
            "--port", str(port),
            "--disable-uvicorn-access-log",
        ]
        if scheduler == "rapid":
            cmd += ["--additional-config", json.dumps({"rapid": {"record_lane_events": True}})]
        env = dict(os.environ)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the engine runs in its own processes, as in production
        env["VLLM_SERVER_DEV_MODE"] = "1"  # exposes /collective_rpc, which reads the lane records
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        with open(log_path, "wb") as log:  # the server keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode} during start-up")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vllm serve was not healthy after {timeout_s:.0f} s")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def collective_rpc(self, method: str, **kwargs: str):
        """Call a worker method through vLLM's dev-mode endpoint; None when unavailable."""
        body = json.dumps({"method": method, "kwargs": kwargs, "timeout": 30}).encode()
        request = urllib.request.Request(
            self.url + "/collective_rpc", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read() or b"null").get("results")
        except (urllib.error.URLError, OSError, ValueError, AttributeError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Stragglers of the group (workers whose parent died first).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


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
    print()
    print(f"=== vllm-rapid demo: --scheduler {scheduler} ===")
    print(f"  requests: {len(results)} ({n_long} long ~{max((r.prompt_tokens for r in results if r.kind == 'long'), default=0)}"
          f" tokens, {len(results) - n_long} short), completed {len(ok)}, failed {len(failed)}")
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


def report_metrics(metrics_text: str) -> None:
    """A few of RAPID's Prometheus metrics, as any scraper of the server's /metrics sees them."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name.startswith("vllm_rapid:"):
                label = s.labels.get("lane") or s.labels.get("result") or s.labels.get("reason") or ""
                values[(s.name.removeprefix("vllm_rapid:"), label)] = s.value
    if not values:
        print("  (no vllm_rapid: metrics on /metrics)")
        return
    print()
    print("RAPID metrics on /metrics (Prometheus, vllm_rapid:*)")

    def share(name: str) -> str:
        met, missed = values.get((name, "met"), 0), values.get((name, "missed"), 0)
        return f"{100 * met / (met + missed):.0f}% of {met + missed:.0f}" if met + missed else "n/a"

    print(f"  within the TTFT SLO: {share('ttft_slo_requests_total')} first tokens; within the ITL SLO: "
          f"{share('itl_slo_tokens_total')} gaps; completed within both: {share('slo_requests_total')} requests")
    for lane in ("decode", "prefill"):
        count, total = values.get(("lane_step_seconds_count", lane), 0), values.get(("lane_step_seconds_sum", lane), 0)
        mean = f", mean {1000 * total / count:.1f} ms" if count else ""
        print(f"  {lane} lane: {values.get(('partition_units', lane), 0):.0f} of "
              f"{values.get(('partition_total_units', ''), 0):.0f} compute units, {count:.0f} batches{mean}")
    reason = next((r for (name, r), v in values.items() if name == "arm_reason" and v == 1), "n/a")
    print(f"  ARM's current reason: {reason}; requests failed by a lane: "
          f"{values.get(('lane_failed_requests_total', ''), 0):.0f}")


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
        port = args.port or free_port()
        print(f"Starting vllm serve {model.name} --scheduler {args.scheduler} on {HOST}:{port} ...", flush=True)
        server = Server(model, args.scheduler, port, Path(tmp) / "server.log")
        try:
            try:
                startup_s = server.wait_healthy()
            except RuntimeError as exc:
                print(f"error: {exc}\n--- server log (tail) ---\n{server.log_tail()}", file=sys.stderr)
                return 1
            print(f"Server healthy after {startup_s:.0f} s; warming up ...", flush=True)
            warmup = make_workload(2, 2, args.long_prompt_tokens, vocab_size, args.seed + 1)
            asyncio.run(run_load(server.url, str(model), warmup))
            server.collective_rpc("rapid_lane_events", clear="1")  # drop warm-up records

            workload = make_workload(args.num_requests, args.long_every, args.long_prompt_tokens, vocab_size,
                                     args.seed)
            print(f"Sending {len(workload)} concurrent streaming requests ...", flush=True)
            started = time.perf_counter()
            results = asyncio.run(run_load(server.url, str(model), workload))
            wall_s = time.perf_counter() - started
            lane_events = None
            if args.scheduler == "rapid":
                answer = server.collective_rpc("rapid_lane_events")
                if isinstance(answer, list) and answer and isinstance(answer[0], list):
                    lane_events = answer[0]
            report(args.scheduler, results, wall_s, lane_events)
            if args.scheduler == "rapid":
                with contextlib.suppress(OSError), urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
                    report_metrics(r.read().decode())
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
