"""The fake CUDA driver (``fake_libcuda.c``) under the real ``cuda-bindings``, for tests without a GPU.

:func:`build_driver` compiles it into a folder; :func:`run_with_driver` runs a snippet in a fresh Python whose
``LD_LIBRARY_PATH`` starts with that folder, so ``cuda.bindings.driver`` loads the fake as ``libcuda.so.1``. A fresh
process matters: no CUDA context is current there, as in a server's worker. Inside it, :func:`fake_torch_cuda`
stands in for the few ``torch.cuda`` pieces a backend touches (CPU torch has no CUDA), :func:`driver_state` reads
the fake's record, and :func:`emit` hands a result back.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("fake_libcuda.c")
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
H200_SMS = 132
_RESULT = "FAKE_CUDA_RESULT "


def build_driver(directory: Path) -> Path:
    """Compile the fake into ``directory/libcuda.so.1``; returns ``directory``."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("the fake CUDA driver needs a C compiler (gcc or cc) on PATH")
    subprocess.run(
        [gcc, "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(directory / "libcuda.so.1"),
         str(SOURCE)],
        check=True, capture_output=True, text=True,
    )
    return directory


def run_with_driver(code: str, driver_dir: Path | None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``code`` in a fresh Python with the fake driver (``driver_dir``; None: no driver at all) first on the
    library path; returns what it passed to :func:`emit`. A crash or a missing result fails with the output."""
    library_path = [str(driver_dir)] if driver_dir is not None else []
    full_env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join([*library_path, os.environ.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep),
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
        "VLLM_RAPID_AUTOLOAD": "0",
        **(env or {}),
    }
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=full_env,
                          cwd=REPO)
    results = [line[len(_RESULT):] for line in done.stdout.splitlines() if line.startswith(_RESULT)]
    if done.returncode != 0 or not results:
        raise AssertionError(f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}")
    return json.loads(results[-1])


# --- used inside the subprocess ---


def fake_torch_cuda() -> list[tuple]:
    """Replace the torch.cuda calls a GPU backend makes; returns the list that records the streams it wraps."""
    import torch

    streams: list[tuple] = []

    def external(handle: int, device: int | None = None) -> tuple:
        streams.append(("external", handle, device))
        return streams[-1]

    def plain(device: int | None = None, priority: int = 0) -> tuple:
        streams.append(("stream", device, priority))
        return streams[-1]

    torch.cuda.init = lambda: None
    torch.cuda.set_device = lambda index: None
    torch.cuda.is_available = lambda: True
    torch.cuda.ExternalStream = external
    torch.cuda.Stream = plain
    torch.cuda.stream = contextlib.nullcontext
    torch.cuda.get_device_properties = lambda index: types.SimpleNamespace(multi_processor_count=H200_SMS)
    torch.version.cuda, torch.version.hip = "13.0", None
    return streams


def driver_state() -> dict[str, Any]:
    """The fake driver's record: calls, events, violations, live objects, primary-context references."""
    buffer = ctypes.create_string_buffer(1 << 18)
    ctypes.CDLL("libcuda.so.1").fake_cuda_report(buffer, len(buffer))
    return json.loads(buffer.value)


def emit(**values: Any) -> None:
    print(_RESULT + json.dumps(values), flush=True)
