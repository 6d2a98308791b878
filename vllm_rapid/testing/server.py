"""A real ``vllm serve`` for tests: its own process group, a log file, start-up polling and a certain stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    model: str
    port: int
    log_path: Path
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def get(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read().decode()

    def post(self, path: str, body: dict, timeout: float = 60) -> dict:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def metrics(self) -> dict[str, float]:
        """The server's /metrics (see ``parse_metrics``)."""
        return parse_metrics(self.get("/metrics"))

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False


def vllm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``vllm`` subprocess: conftest runs test engines' cores in-process, a real server not."""
    return {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"} | (extra or {})


@contextlib.contextmanager
def serve(model: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``vllm serve model *args`` on a free port until the block ends; fails the test if it never gets healthy."""
    port = free_port()
    cmd = ["vllm", "serve", model, "--host", HOST, "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=vllm_env(env), start_new_session=True)
    server = Server(model, port, log_path, proc)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.healthy():
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode} during start-up:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop ``vllm serve`` and every process it started (its own session): SIGINT, then SIGTERM, then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a parent that died first


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value from the Prometheus text (labels kept verbatim)."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[key] = float(value)
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of ``name`` over the series whose labels include ``labels``."""
    found = [v for k, v in values.items()
             if k.split("{", 1)[0] == name and all(f'{lk}="{lv}"' in k for lk, lv in labels.items())]
    assert found, f"no metric {name} {labels} in /metrics"
    return sum(found)
