"""``python -m benchmarks.serve_sweep`` end to end at a tiny scale on CPU: the pipeline (servers, `vllm bench serve`,
the combined JSON, the table and the plots), not speed: nothing here looks at timings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCHEDULERS, RATES = ("default", "rapid"), (2.0, 8.0)
TIMEOUT_S = 420


def run_sweep(out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "benchmarks.serve_sweep", "--out", str(out),
        "--schedulers", ",".join(SCHEDULERS), "--rates", ",".join(f"{r:g}" for r in RATES),
        "--num-prompts", "20", "--input-len", "128", "--output-len", "16",
        "--", "--max-model-len", "1024", "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20),
    ]
    # Own session: if the sweep overruns, SIGTERM lets it stop its servers; SIGKILL to the group is the last resort.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, _ = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pytest.fail(f"benchmarks.serve_sweep did not finish within {TIMEOUT_S} s:\n{stdout[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, None)


def test_serve_sweep_pipeline_on_cpu(tmp_path):
    out = tmp_path / "sweep"
    proc = run_sweep(out)
    logs = "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
                     for p in sorted((out / "logs").glob("*.log"))) if (out / "logs").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + logs

    sweep = json.loads((out / "sweep.json").read_text())
    by_key = {(r["scheduler"], r["rate"]): r for r in sweep["results"]}
    assert set(by_key) == {(s, r) for s in SCHEDULERS for r in RATES}
    for (scheduler, rate), r in by_key.items():
        assert r["error"] is None, (scheduler, rate, r["error"])
        assert r["completed"] == 20 and r["failed"] == 0, r
        for key in ("request_throughput", "output_throughput", "request_goodput", "p50_ttft_ms", "p99_ttft_ms",
                    "p50_itl_ms", "p99_itl_ms", "p50_tpot_ms", "p99_tpot_ms"):
            assert isinstance(r[key], (int, float)) and r[key] >= 0, (key, r)
        raw = json.loads((out / r["raw_file"]).read_text())  # the file vllm bench serve saved
        assert raw["request_rate"] == rate and raw["num_prompts"] == 20

    # Provenance: every command run, the vLLM version and the hardware.
    kinds = [(c["scheduler"], c["kind"]) for c in sweep["commands"]]
    assert kinds == [(s, k) for s in SCHEDULERS for k in ("serve", "bench", "bench")]
    assert all(f"--scheduler {c['scheduler']}" in c["command"] for c in sweep["commands"] if c["kind"] == "serve")
    assert all("--goodput ttft:" in c["command"] for c in sweep["commands"] if c["kind"] == "bench")
    assert sweep["vllm_version"].startswith("vllm")
    assert sweep["hardware"] and all(isinstance(h, str) and h for h in sweep["hardware"])

    table = (out / "sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| default |", "| rapid |"))]
    assert len(rows) == len(SCHEDULERS) * len(RATES) and not any("error" in row for row in rows)

    import matplotlib.image

    for name in ("goodput.png", "p99_itl.png"):
        height, width, _ = matplotlib.image.imread(out / name).shape  # a PNG that decodes
        assert height > 100 and width > 100, name
