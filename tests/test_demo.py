"""The README's main job, ``python3 examples/demo.py``, at a small scale: it serves the tiny model with
``--scheduler rapid``, every request completes, and it prints the lane records and RAPID's /metrics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_rapid.testing.server import vllm_env

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def test_demo_runs_and_reports_both_lanes_and_metrics():
    proc = subprocess.run([sys.executable, str(DEMO), "--num-requests", "12", "--long-every", "4"],
                          capture_output=True, text=True, timeout=600, env=vllm_env(), stdin=subprocess.DEVNULL,
                          check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "completed 12, failed 0" in out
    assert "both lanes busy at once" in out
    assert "RAPID metrics on /metrics" in out and "requests failed by a lane: 0" in out
