"""RAPID's log lines through vLLM's own logging set-up.

vLLM configures only its ``vllm`` logger (handler, format, VLLM_LOGGING_LEVEL); records of ``vllm_rapid.*`` loggers
would otherwise fall to Python's last-resort handler, which drops everything below WARNING.
"""

from __future__ import annotations

import logging


def adopt_vllm_logging() -> None:
    """Give the ``vllm_rapid`` logger vLLM's handlers and level (idempotent; records still propagate)."""
    vllm_logger = logging.getLogger("vllm")
    ours = logging.getLogger("vllm_rapid")
    if ours.handlers or not vllm_logger.handlers:
        return
    for handler in vllm_logger.handlers:
        ours.addHandler(handler)
    ours.setLevel(vllm_logger.level)
