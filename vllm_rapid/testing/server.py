"""A real ``vllm serve`` for the tests, the serving benchmark and the demo: its own process group, a log file,
start-up polling, a certain stop of the whole group, ``/metrics`` and dev-mode ``/collective_rpc``.

No pytest here (the benchmark and the demo use it too): a server that never gets healthy raises
``ServerStartError``, with the end of its log, which fails a test like any other exception.
"""

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
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 300.0
POLLING = ('"GET /metrics HTTP', '"GET /health HTTP')  # uvicorn's access lines for the harness's own requests


class ServerStartError(RuntimeError):
    """``vllm serve`` exited, or did not answer ``/health`` in time, during start-up."""

    def __init__(self, reason: str, log_tail: str) -> None:
        super().__init__(f"{reason}; the end of its log:\n{log_tail}")
        self.reason = reason


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def vllm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``vllm`` subprocess: conftest runs test engines' cores in-process, a real server not."""
    return {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"} | (extra or {})


class Server:
    """``vllm serve model --host HOST --port port *args``, output to ``log_path``; as a context manager, started
    (healthy) on entry and stopped on exit."""

    def __init__(self, model: str, args: list[str], log_path: Path, *, port: int = 0,
                 env: dict[str, str] | None = None, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.model, self.log_path, self.env, self.startup_timeout_s = model, log_path, env, startup_timeout_s
        self.port = port or free_port()
        self.command = ["vllm", "serve", model, "--host", HOST, "--port", str(self.port), *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0  # start to healthy

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        """Start it in its own session and wait for ``/health``; on any failure stop what started, then raise."""
        started = time.monotonic()
        with open(self.log_path, "wb") as log:  # the server keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=vllm_env(self.env), start_new_session=True)
        try:
            while not self.healthy():
                if self.proc.poll() is not None:
                    raise ServerStartError(f"vllm serve exited with code {self.proc.returncode} during start-up",
                                           self.log_tail())
                if time.monotonic() - started > self.startup_timeout_s:
                    raise ServerStartError(f"vllm serve not healthy after {self.startup_timeout_s:.0f} s",
                                           self.log_tail())
                time.sleep(0.5)
        except BaseException:  # also Ctrl-C or a benchmark's signal handler: no server is left behind
            self.stop()
            raise
        self.startup_s = time.monotonic() - started

    def stop(self) -> None:
        """Stop ``vllm serve`` and every process it started: SIGINT (vLLM's clean shutdown), then SIGTERM, then
        SIGKILL to the group; at last SIGKILL to what is left of it (workers whose parent died first)."""
        if self.proc is None:
            return
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        """The last ``lines`` of the log, without the access lines of the harness's own polling."""
        with contextlib.suppress(OSError):
            kept = [line for line in self.log().splitlines() if not any(poll in line for poll in POLLING)]
            return "\n".join(kept[-lines:])
        return "(no server log)"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

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

    def collective_rpc(self, method: str, timeout_s: float = 30, **kwargs: str) -> list[Any]:
        """Every worker's answer to ``method`` through vLLM's dev-mode endpoint (start the server with
        ``VLLM_SERVER_DEV_MODE=1``); vLLM passes keyword arguments only as strings."""
        body = {"method": method, "kwargs": kwargs, "timeout": timeout_s}
        return self.post("/collective_rpc", body, timeout=2 * timeout_s)["results"]


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


def metric(values: dict[str, float], name: str, default: float | None = None, **labels: str) -> float:
    """Sum of ``name`` over the series whose labels include ``labels``; ``default`` (or LookupError) when none."""
    found = [v for k, v in values.items()
             if k.split("{", 1)[0] == name and all(f'{lk}="{lv}"' in k for lk, lv in labels.items())]
    if found:
        return sum(found)
    if default is None:
        raise LookupError(f"no metric {name} {labels} in /metrics")
    return default
