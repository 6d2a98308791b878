"""An offline Hugging Face cache in which every model name vLLM's selected tests use is the tiny Llama.

vLLM's tests name hub models ("facebook/opt-125m", ...). No hub is reachable in CI, so the suite runs with
``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing at a cache laid out as ``huggingface_hub`` writes it
(``models--ORG--NAME/refs/main`` and ``snapshots/COMMIT/``), whose snapshots link to one tiny model's files: config,
tokenizer and seeded random weights, which transformers can load too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from vllm_rapid.testing.tiny_model import make_tiny_llama


def build_offline_hub(cache_dir: Path, model_names: Iterable[str]) -> Path:
    """Write (or complete) the cache under ``cache_dir``; returns the directory for ``HF_HUB_CACHE``."""
    model_dir = cache_dir / "tiny-llama"
    if not (model_dir / "model.safetensors").exists():
        make_tiny_llama(model_dir)
    hub = cache_dir / "hub"
    for name in model_names:
        repo = hub / f"models--{name.replace('/', '--')}"
        commit = hashlib.sha1(name.encode()).hexdigest()  # any fixed 40-hex revision
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in model_dir.iterdir():
            link = snapshot / file.name
            if not link.is_symlink():
                link.symlink_to(file.resolve())
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return hub
