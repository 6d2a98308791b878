"""scripts/gpu_evidence.sh, the one prepared run for the lent H200: its dry run on CPU (as there: no vLLM), and its
stage budget against the device's limits (at most 9 minutes, at most 7 files directly under $OUT)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_evidence.sh"
MAX_FILES = 7
MAX_RUN_S = 9 * 60


def test_stage_budget_in_the_header_matches_the_script_and_fits_nine_minutes():
    text = SCRIPT.read_text()
    header = dict(re.findall(r"^#   (\w+) +(\d+)  ", text, flags=re.M))
    total = int(header.pop("total"))
    calls = {name: int(budget) for name, budget in re.findall(r"^\s*stage (\w+) (\d+) ", text, flags=re.M)}
    assert calls == {name: int(budget) for name, budget in header.items()}
    assert sum(calls.values()) == total
    overall = int(re.search(r"TOTAL_BUDGET_S=\$\{TOTAL_BUDGET_S:-(\d+)\}", text)[1])
    assert total <= overall < MAX_RUN_S - 10


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The script on this machine (no GPU), with vLLM made unimportable as on the GPU machine."""
    root = tmp_path_factory.mktemp("evidence")
    stub = root / "no-vllm" / "vllm"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('vLLM is not installed on the GPU machine')\n")
    out = root / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(stub.parent)}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600, env=env, cwd=root)
    return done, out


def test_dry_run_skips_the_cuda_stages_with_a_clear_line_and_exits_0(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "no CUDA device (torch.cuda.is_available() is False): dry run" in log
    assert "SKIP sm_probe: no CUDA device" in log
    assert "profile: arguments parsed; it needs a GPU" in log
    assert "== summary" in done.stdout and "Traceback" not in done.stdout


def test_dry_run_writes_few_flat_files_and_no_vllm_was_needed(dry_run):
    _, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert all((out / name).is_file() for name in files) and len(files) <= MAX_FILES
    assert files == ["env.txt", "gpu_tests.txt", "log.txt", "mechanism.json", "partition.png"]
    env = (out / "env.txt").read_text()
    assert "vllm: not importable" in env
    assert re.search(r"^cuda-bindings: \d+\.\d+", env, flags=re.M) and re.search(r"^triton: \d", env, flags=re.M)
    tests = (out / "gpu_tests.txt").read_text()
    assert re.search(r"\b7 skipped\b", tests) and " failed" not in tests and " error" not in tests


def test_dry_run_exercises_the_mechanism_fallback(dry_run):
    """green_context cannot run on CPU: the first attempt fails at once, loudly, and the fallback's results land."""
    _, out = dry_run
    log = (out / "log.txt").read_text()
    assert "partition_backend='green_context' cannot run on this device (cpu)" in log
    assert "the first attempt died early" in log
    report = json.loads((out / "mechanism.json").read_text())
    assert report["backend"] == "threads" and report["args"]["itl_slo_ms"] == "auto" and report["itl_slo_ms"] > 0
    assert {r["policy"] for r in report["runs"]} == {"serial", "hybrid-512", "lanes"}
    assert {r["rate"] for r in report["runs"]} == {4.0, 10.0, 16.0}
    assert all(r["finished"] == r["num_requests"] for r in report["runs"])
