"""A paged KV cache (vLLM-style fixed-size blocks) and decode attention over it.

Decode attention must read only each sequence's own tokens (its cost is the decode step's memory traffic) and
keep fixed shapes for CUDA-graph replay: on CUDA a small Triton kernel reads the block table and sequence lengths
from device memory; elsewhere (CPU, or no Triton) a gather + masked SDPA does the same arithmetic.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from vllm_rapid.tools.layer_stack import ModelDims, gqa_decode_attention

# Block 0 is never handed out: padded rows of a graph's batch point there.
SCRATCH_BLOCK = 0


class PagedKVCache:
    """K and V of every layer as flat slots, ``[layers, num_blocks * block_size, kv_heads, head_dim]``."""

    def __init__(self, dims: ModelDims, num_blocks: int, block_size: int, device: Any, dtype: Any) -> None:
        shape = (dims.num_layers, num_blocks * block_size, dims.num_kv_heads, dims.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks = num_blocks
        self.block_size = block_size


class BlockFreeList:
    """Free list of cache blocks; block 0 stays reserved as scratch."""

    def __init__(self, num_blocks: int) -> None:
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"{n} KV blocks requested, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


def paged_decode_attention(q: Any, k: Any, v: Any, block_tables: Any, seq_lens: Any, block_size: int) -> Any:
    """One query per sequence: ``q`` [batch, heads, hd] over the layer's slots ``k``/``v`` [slots, kv_heads, hd];
    sequence ``b`` holds ``seq_lens[b]`` tokens in blocks ``block_tables[b]``."""
    if q.is_cuda and _triton_kernel() is not None:
        return _triton_decode(q, k, v, block_tables, seq_lens, block_size)
    return torch_paged_decode_attention(q, k, v, block_tables, seq_lens, block_size)


def torch_paged_decode_attention(q: Any, k: Any, v: Any, block_tables: Any, seq_lens: Any, block_size: int) -> Any:
    """Reference: gather every sequence's blocks (padded to the table's width), mask past its length. A row with no
    tokens (``seq_len`` 0, a padded row) attends to nothing and yields zeros, as the Triton kernel does."""
    pos = torch.arange(block_tables.shape[1] * block_size, device=q.device)
    slots = block_tables.long()[:, pos // block_size] * block_size + pos % block_size  # [batch, context]
    keys, values = (z[slots].transpose(1, 2) for z in (k, v))  # [batch, kv_heads, context, hd]
    out = gqa_decode_attention(q, keys, values, pos[None, :] < seq_lens[:, None])
    return torch.where((seq_lens > 0)[:, None, None], out, 0.0)


def _triton_decode(q: Any, k: Any, v: Any, block_tables: Any, seq_lens: Any, block_size: int) -> Any:
    batch, heads, hd = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    _triton_kernel()[(batch, kv_heads)](
        q, k, v, block_tables, seq_lens, out, hd**-0.5, block_tables.stride(0),
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, 1 << (group - 1).bit_length()), HEAD_DIM=hd,
        BLOCK_SIZE=block_size, TILE=64,
    )
    return out


@functools.cache
def _triton_kernel() -> Any:
    """The Triton kernel, compiled lazily (None without Triton): one program per (sequence, KV head), online
    softmax over tiles of the sequence's tokens, the KV head's query group as the rows of one small matmul."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # The table's row stride changes with the batch's longest sequence in eager steps: no recompile for it.
    @triton.jit(do_not_specialize=["bt_stride"])
    def kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, scale, bt_stride,
               KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        seq_len = tl.load(lens_ptr + seq)
        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        q_rows = (seq * KV_HEADS * GROUP + head * GROUP + rows).to(tl.int64)
        q_offsets = q_rows[:, None] * HEAD_DIM + dims[None, :]
        q = tl.load(q_ptr + q_offsets, mask=(rows < GROUP)[:, None], other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        norm = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for start in range(0, seq_len, TILE):
            pos = start + tl.arange(0, TILE)
            valid = pos < seq_len
            block = tl.load(bt_ptr + seq * bt_stride + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_offsets = (slot * KV_HEADS + head)[:, None] * HEAD_DIM + dims[None, :]
            keys = tl.load(k_ptr + kv_offsets, mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(keys)) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            norm = norm * alpha + tl.sum(p, 1)
            values = tl.load(v_ptr + kv_offsets, mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
            m = m_new
        # A row with no tokens (seq_len 0) never enters the loop: norm stays 0, and 0/0 would store NaN.
        out = acc / tl.where(norm > 0, norm, 1.0)[:, None]
        tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=(rows < GROUP)[:, None])

    return kernel
