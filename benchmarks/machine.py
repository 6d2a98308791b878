"""What a benchmark ran on, for its report: numbers are never unlabelled."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware() -> list[str]:
    """GPUs from ``nvidia-smi -L``; without one, the CPU model and core count."""
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
            if out.strip():
                return out.strip().splitlines()
    return [f"CPU: {cpu_name()} ({os.cpu_count()} logical cores visible, no GPU)"]
