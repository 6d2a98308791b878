"""The ``vllm-rapid`` command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vllm_rapid.tools.profile import main as profile_main

    return profile_main(argv if argv is not None else sys.argv[1:])
