"""Run the selected vLLM tests against RAPID: ``python -m vllm_rapid.testing.vllm_suite [--baseline] [PYTEST ARGS]``.

Fetches the pinned sdist's ``tests/`` of the installed vLLM (each release has its selection) into the cache
directory, lays out the offline model hub, and runs pytest there with this package's plugin. The exit status is
pytest's: non-zero on any unexpected failure, any unexpected pass of a by-design or known-bug entry, a selected test
that skips, or a selected engine-test file that configured no RAPID engine. ``--baseline`` runs the same selection on
vLLM's own scheduler, which is how a test is checked to pass offline on the tiny model before it is selected.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from vllm_rapid.patch.versions import release, vllm_version
from vllm_rapid.testing.vllm_suite import selection
from vllm_rapid.testing.vllm_suite.hub import build_offline_hub
from vllm_rapid.testing.vllm_suite.sdist import vllm_tests

DEFAULT_CACHE = Path.home() / ".cache" / "vllm-rapid" / "vllm-suite"
TEST_TIMEOUT_S = 600


def suite_environment(hub: Path, version: str) -> dict[str, str]:
    """The environment vLLM's tests run in: offline, the tiny model's hub, settings RAPID and 2 CPU cores need."""
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub),
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: an explicit KV size, not a share of a shared machine's memory
        "VLLM_CPU_CI_ENV": "1",  # as vLLM's CPU CI: eager compilation, no warm-up run
    }
    if release(version) < release("0.34"):
        # RAPID runs the V1 model runner there; vLLM's test helpers read this too. 0.34 has V2 only (0 is an error).
        env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("VLLM_RAPID_SUITE_CACHE", DEFAULT_CACHE)))
    parser.add_argument("--baseline", action="store_true", help="run the selection on vLLM's own scheduler")
    args, pytest_args = parser.parse_known_args(argv)
    started = time.monotonic()
    version = vllm_version()
    chosen = selection.for_version(version)
    root = vllm_tests(args.cache_dir, version)
    hub = build_offline_hub(args.cache_dir, chosen.models)
    command = [
        sys.executable, "-m", "pytest", "-p", "vllm_rapid.testing.vllm_suite.plugin", "-p", "no:cacheprovider",
        "--rootdir", str(root), "-c", os.devnull, "-q", "-rfEX", f"--timeout={TEST_TIMEOUT_S}", "--durations=25",
        "-W", "ignore::pytest.PytestUnknownMarkWarning",
        *(["--rapid-baseline"] if args.baseline else []), *pytest_args, *chosen.files_to_collect(),
    ]
    print("vLLM suite:", " ".join(command), flush=True)
    returncode = subprocess.run(command, cwd=root, env=suite_environment(hub, version)).returncode
    print(f"vLLM suite (vLLM {version}): exit {returncode} after {time.monotonic() - started:.0f} s", flush=True)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
