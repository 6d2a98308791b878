"""A Llama-shaped decoder stack of plain torch ops with random weights, for measuring step times.

Step times depend on shapes, not values, so the profiler (``vllm-rapid profile``) and the GPU mechanism benchmark
(``benchmarks/mechanism.py``) share this stack instead of loading a model. Attention is pluggable: the profiler
attends over a contiguous cache, the benchmark over a paged one. Imports nothing from vLLM.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_rapid.lanes.lane import ContextFactory

# attend(layer_index, q [tokens, heads, head_dim], k, v [tokens, kv_heads, head_dim]) -> [tokens, heads, head_dim]
Attend = Callable[[int, Any, Any, Any], Any]


@dataclass(frozen=True)
class ModelDims:
    """The shapes that set a Llama decoder's step time (defaults: Llama-3-8B)."""

    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    intermediate_size: int = 14336
    vocab_size: int = 128256
    head_dim: int = 128

    @classmethod
    def from_hf_config(cls, path: str | Path, num_layers: int | None = None) -> ModelDims:
        """Read a Hugging Face ``config.json`` (or the directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        config = json.loads(path.read_text())
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            num_layers=num_layers or config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads", heads),
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        )

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one token in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes a decode step streams for the weights (layers and LM head; no embedding, as in the stack)."""
        d, hd = self, self.head_dim
        per_layer = d.hidden_size * (d.num_heads + 2 * d.num_kv_heads) * hd + d.num_heads * hd * d.hidden_size
        per_layer += 3 * d.hidden_size * d.intermediate_size + 2 * d.hidden_size
        return dtype_bytes * (d.num_layers * per_layer + d.hidden_size * (d.vocab_size + 1))

    def describe(self) -> str:
        return (
            f"llama hidden={self.hidden_size} layers={self.num_layers} heads={self.num_heads} "
            f"kv_heads={self.num_kv_heads} intermediate={self.intermediate_size} vocab={self.vocab_size} bf16"
        )


class LlamaStack:
    """Random-weight Llama decoder layers, final norm and LM head (inputs are hidden states, no embedding)."""

    def __init__(self, dims: ModelDims, device: Any, dtype: Any) -> None:
        import torch

        def weight(*shape: int) -> Any:
            return torch.randn(*shape, device=device, dtype=dtype) * 0.02

        self.dims = dims
        d, hd = dims, dims.head_dim
        qkv_out = (d.num_heads + 2 * d.num_kv_heads) * hd
        self.layers = [
            {
                "norm1": torch.ones(d.hidden_size, device=device, dtype=dtype),
                "qkv": weight(d.hidden_size, qkv_out),
                "o": weight(d.num_heads * hd, d.hidden_size),
                "norm2": torch.ones(d.hidden_size, device=device, dtype=dtype),
                "gate_up": weight(d.hidden_size, 2 * d.intermediate_size),
                "down": weight(d.intermediate_size, d.hidden_size),
            }
            for _ in range(d.num_layers)
        ]
        self.final_norm = torch.ones(d.hidden_size, device=device, dtype=dtype)
        self.lm_head = weight(d.hidden_size, d.vocab_size)

    def forward(self, x: Any, attend: Attend, logit_rows: Any = slice(None)) -> Any:
        """All layers over the flat tokens ``x`` [tokens, hidden]; logits of ``logit_rows`` only."""
        import torch.nn.functional as F

        d, n = self.dims, x.shape[0]
        for i, layer in enumerate(self.layers):
            qkv = F.rms_norm(x, (d.hidden_size,), layer["norm1"]) @ layer["qkv"]
            q, k, v = qkv.view(n, -1, d.head_dim).split([d.num_heads, d.num_kv_heads, d.num_kv_heads], dim=1)
            attn = attend(i, q, k, v).reshape(n, d.num_heads * d.head_dim)
            x = x + attn @ layer["o"]
            gate, up = (F.rms_norm(x, (d.hidden_size,), layer["norm2"]) @ layer["gate_up"]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer["down"]
        return F.rms_norm(x[logit_rows], (d.hidden_size,), self.final_norm) @ self.lm_head

    def decode(self, x: Any, k_cache: Any, v_cache: Any) -> Any:
        """One decode step: ``x`` [batch, hidden]; caches [batch, kv_heads, context, head_dim].

        All layers read the same cache tensors (it keeps the memory for large grids affordable; a cache far larger
        than L2 costs the same bandwidth whichever layer reads it). The new token's K/V overwrite the last slot.
        """

        def attend(_: int, q: Any, k: Any, v: Any) -> Any:
            k_cache[:, :, -1].copy_(k)
            v_cache[:, :, -1].copy_(v)
            return gqa_decode_attention(q, k_cache, v_cache)

        return self.forward(x, attend)

    def prefill(self, x: Any) -> Any:
        """One prompt: ``x`` [tokens, hidden], causal attention; logits of the last token only."""
        return self.forward(x, lambda _, q, k, v: causal_attention(q, k, v), slice(-1, None))


def gqa_decode_attention(q: Any, k: Any, v: Any, mask: Any = None) -> Any:
    """One query token per sequence: ``q`` [batch, heads, hd] over ``k``/``v`` [batch, kv_heads, context, hd].

    Each KV head's group of query heads is passed as a short query sequence: plain attention that reads the cache
    once, with no need for GQA support in the fused kernels. ``mask`` [batch, context] (True: attend) or None.
    """
    import torch.nn.functional as F

    b, heads, hd = q.shape
    kv_heads = k.shape[1]
    if mask is not None:
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, heads // kv_heads, hd), k, v, attn_mask=mask)
    return out.reshape(b, heads, hd)


def causal_attention(q: Any, k: Any, v: Any, past: int = 0) -> Any:
    """Causal attention of ``q`` [tokens, heads, hd], the last tokens of a sequence, over ``k``/``v``
    [past + tokens, kv_heads, hd]: query ``j`` sees keys up to position ``past + j``."""
    import torch
    import torch.nn.functional as F

    t, heads, _ = q.shape
    group = heads // k.shape[1]
    # Expanding K/V costs a few MB; it keeps the fused causal kernels usable whatever their GQA support.
    k, v = (z.transpose(0, 1).repeat_interleave(group, dim=0)[None] for z in (k, v))
    mask = None
    if past:
        keys = torch.arange(past + t, device=q.device)
        mask = keys[None, :] <= past + torch.arange(t, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask, is_causal=not past)
    return out[0].transpose(0, 1)


_gc_frozen_depth = 0


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Collect once, then keep the collector away from every existing object until the outermost exit.

    Since torch 2.9 ``torch.cuda.graph`` no longer collects before a capture, so a collection can start in the
    middle of one: it walks every object (slow, once per graph) and runs finalizers that may make CUDA calls a
    capturing stream forbids. vLLM freezes the collector around its captures too. Nested uses collect only once.
    """
    global _gc_frozen_depth
    if _gc_frozen_depth == 0:
        gc.collect()
        gc.freeze()
    _gc_frozen_depth += 1
    try:
        yield
    finally:
        _gc_frozen_depth -= 1
        if _gc_frozen_depth == 0:
            gc.unfreeze()


def capture_graph(fn: Callable[[], Any], context: ContextFactory, pool: Any = None) -> Any:
    """A CUDA graph of ``fn`` captured on the lane stream of ``context`` (so it stays on that partition).

    The caller owns the graph and must ``reset()`` it (or drop it) before the partition backend closes: a graph
    outliving the green context it was captured on would be destroyed after its context.
    """
    import torch

    # Weights, caches and inputs were made on the default stream, and a non-blocking lane stream does not wait for
    # it: without this the warm-up could read them before they are written.
    torch.cuda.synchronize()
    with context():
        stream = torch.cuda.current_stream()
        fn()  # warm-up on the same stream: library handles, kernel selection, Triton compiles
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with frozen_gc(), torch.cuda.graph(graph, pool=pool, stream=stream):
            fn()
    return graph
