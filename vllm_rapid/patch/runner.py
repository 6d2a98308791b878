"""The prefill lane's model runner binds the KV tensors the primary runner allocated: one KV cache, no copy."""

from __future__ import annotations

from typing import Any

import torch


def share_kv_tensors(prefill_runner: Any, primary: Any) -> None:
    """Make ``prefill_runner.initialize_kv_cache`` build its own backends, metadata builders and block tables over
    the tensors the primary runner allocated and bound to the (shared) attention layers, instead of allocating."""

    def primary_kv_tensors(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        layers = primary.compilation_config.static_forward_context
        return {name: layer.kv_cache for name, layer in layers.items()
                if isinstance(getattr(layer, "kv_cache", None), torch.Tensor)}

    prefill_runner.initialize_kv_cache_tensors = primary_kv_tensors
