"""Run the selected vLLM tests against RAPID: ``python -m vllm_rapid.testing.vllm_suite [--baseline] [PYTEST ARGS]``.

Fetches the pinned vLLM sdist's ``tests/`` into the cache directory, lays out the offline model hub, and runs pytest
there with this package's plugin. The exit status is pytest's: non-zero on any unexpected failure, any unexpected
pass of a by-design or known-bug entry, a selected test that skips, or a selected engine-test file that configured
no RAPID engine. ``--baseline`` runs the same selection on vLLM's own scheduler, which is how a test is checked to
pass offline on the tiny model before it is selected.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from vllm_rapid.testing.vllm_suite import selection
from vllm_rapid.testing.vllm_suite.hub import build_offline_hub
from vllm_rapid.testing.vllm_suite.sdist import vllm_tests

DEFAULT_CACHE = Path.home() / ".cache" / "vllm-rapid" / "vllm-suite"
TEST_TIMEOUT_S = 600


def suite_environment(hub: Path) -> dict[str, str]:
    """The environment vLLM's tests run in: offline, the tiny model's hub, settings RAPID and 2 CPU cores need."""
    return os.environ | {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub),
        "VLLM_USE_V2_MODEL_RUNNER": "0",  # RAPID runs the V1 model runner; vLLM's test helpers read this too
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: an explicit KV size, not a share of a shared machine's memory
        "VLLM_CPU_CI_ENV": "1",  # as vLLM's CPU CI: eager compilation, no warm-up run
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("VLLM_RAPID_SUITE_CACHE", DEFAULT_CACHE)))
    parser.add_argument("--baseline", action="store_true", help="run the selection on vLLM's own scheduler")
    args, pytest_args = parser.parse_known_args(argv)
    started = time.monotonic()
    root = vllm_tests(args.cache_dir)
    hub = build_offline_hub(args.cache_dir, selection.MODELS)
    command = [
        sys.executable, "-m", "pytest", "-p", "vllm_rapid.testing.vllm_suite.plugin", "-p", "no:cacheprovider",
        "--rootdir", str(root), "-c", os.devnull, "-q", "-rfEX", f"--timeout={TEST_TIMEOUT_S}", "--durations=25",
        "-W", "ignore::pytest.PytestUnknownMarkWarning",
        *(["--rapid-baseline"] if args.baseline else []), *pytest_args, *selection.files_to_collect(),
    ]
    print("vLLM suite:", " ".join(command), flush=True)
    returncode = subprocess.run(command, cwd=root, env=suite_environment(hub)).returncode
    print(f"vLLM suite: exit {returncode} after {time.monotonic() - started:.0f} s", flush=True)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
