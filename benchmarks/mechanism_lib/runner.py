"""Executes one engine step of the Llama stack over the paged KV cache, inside the calling lane's context.

A step is any mix of decode tokens (one per running sequence) and prefill chunks. Decode-only steps on CUDA replay a
CUDA graph captured per (batch bucket, split) on that split's decode stream, as a server does; steps with prefill
run eagerly (their shapes vary). The step ends with a synchronize, so the caller sees the real completion time.
"""

from __future__ import annotations

import bisect
import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.mechanism_lib.paged import SCRATCH_BLOCK, PagedKVCache, paged_decode_attention
from vllm_rapid.lanes.partition import PartitionBackend, Split
from vllm_rapid.tools.layer_stack import LlamaStack, capture_graph, causal_attention, frozen_gc

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Graph batch sizes: the defaults below ``max_num_seqs``, then ``max_num_seqs`` itself."""
    return [b for b in DEFAULT_BUCKETS if b < max_num_seqs] + [max_num_seqs]


def slots_of(blocks: list[int], start: int, stop: int, block_size: int) -> np.ndarray:
    """Cache slots of positions ``start .. stop-1`` of a sequence stored in ``blocks``."""
    pos = np.arange(start, stop)
    return np.asarray(blocks, dtype=np.int64)[pos // block_size] * block_size + pos % block_size


@dataclass
class DecodeInputs:
    """One new token per sequence: its slot, each sequence's length after it, and block table."""

    block_tables: Any  # [batch, width] int32
    seq_lens: Any  # [batch] int32
    slots: Any  # [batch] int64

    @classmethod
    def build(cls, blocks: list[list[int]], seq_lens: list[int], block_size: int) -> DecodeInputs:
        lens = np.asarray(seq_lens)
        used = -(-lens // block_size)
        table = np.full((len(blocks), used.max()), SCRATCH_BLOCK, dtype=np.int32)
        for row, (b, n) in enumerate(zip(blocks, used)):
            table[row, :n] = b[:n]
        slots = table[np.arange(len(lens)), (lens - 1) // block_size].astype(np.int64) * block_size
        slots += (lens - 1) % block_size
        return cls(torch.from_numpy(table), torch.from_numpy(lens.astype(np.int32)), torch.from_numpy(slots))

    def to(self, device: Any) -> DecodeInputs:
        return DecodeInputs(*(t.to(device) for t in (self.block_tables, self.seq_lens, self.slots)))


@dataclass
class ChunkInputs:
    """Prompt positions ``past .. past+len(slots)-1`` of one sequence; ``past_slots`` covers 0 .. the chunk's end."""

    slots: Any  # [tokens] int64
    past: int
    past_slots: Any | None = None

    @classmethod
    def build(cls, blocks: list[int], start: int, tokens: int, block_size: int) -> ChunkInputs:
        past_slots = torch.from_numpy(slots_of(blocks, 0, start + tokens, block_size)) if start else None
        return cls(torch.from_numpy(slots_of(blocks, start, start + tokens, block_size)), start, past_slots)

    def to(self, device: Any) -> ChunkInputs:
        past = None if self.past_slots is None else self.past_slots.to(device)
        return ChunkInputs(self.slots.to(device), self.past, past)


@dataclass
class StepInputs:
    decode: DecodeInputs | None
    chunks: list[ChunkInputs]

    @property
    def num_decodes(self) -> int:
        return 0 if self.decode is None else len(self.decode.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.num_decodes + sum(len(c.slots) for c in self.chunks)


@dataclass
class _Graph:
    """Static inputs of one batch bucket (shared by its graphs on every split) and the graphs by split."""

    inputs: DecodeInputs
    graphs: dict[Split, Any]


class StackRunner:
    """The stack, its paged cache, random input activations, and (on CUDA) the decode graphs."""

    def __init__(
        self, stack: LlamaStack, cache: PagedKVCache, max_tokens: int, max_num_seqs: int, max_seq_len: int
    ) -> None:
        self.stack, self.cache = stack, cache
        self.max_blocks_per_seq = -(-max_seq_len // cache.block_size)
        self.device = stack.lm_head.device
        # Inputs are hidden states; their values do not matter, only that they stay finite.
        self.x = torch.randn(max_tokens, stack.dims.hidden_size, device=self.device, dtype=stack.lm_head.dtype)
        self.buckets = batch_buckets(max_num_seqs)
        self._graphs: dict[int, _Graph] = {}

    def capture(self, backend: PartitionBackend, splits: list[Split]) -> int:
        """CUDA graphs of the decode step for every bucket on every split's decode stream (largest first), with the
        garbage collector frozen once for all of them; a split already captured (the full split of a second backend)
        keeps its graphs. Returns how many were captured."""
        captured = 0
        with frozen_gc():
            for bucket in reversed(self.buckets):
                inputs = _scratch_inputs(bucket, self.max_blocks_per_seq, self.device)
                entry = self._graphs.setdefault(bucket, _Graph(inputs, {}))
                for split in splits:
                    if split in entry.graphs:
                        continue
                    decode_ctx, _ = backend.lane_contexts(split)
                    step = functools.partial(self._greedy_decode, bucket, entry.inputs)
                    entry.graphs[split] = capture_graph(step, decode_ctx)
                    captured += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return captured

    def release_graphs(self) -> None:
        """Destroy every decode graph; before the backend closes the streams (green contexts) they were captured on."""
        for entry in self._graphs.values():
            for graph in entry.graphs.values():
                graph.reset()
        self._graphs.clear()

    def _greedy_decode(self, batch: int, inputs: DecodeInputs) -> Any:
        return self.forward(self.x[:batch], inputs, []).argmax(dim=-1)

    def execute(self, step: StepInputs, split: Split) -> tuple[float, float]:
        """Run ``step`` in the current lane context; returns its (start, end) on the ``perf_counter`` clock."""
        start = time.perf_counter()
        with torch.inference_mode():
            if not step.chunks and step.decode is not None and self._graphs:
                self._replay(step.decode, split)
            else:
                decode = None if step.decode is None else step.decode.to(self.device)
                chunks = [c.to(self.device) for c in step.chunks]
                self.forward(self.x[: step.num_tokens], decode, chunks).argmax(dim=-1)  # greedy sampling
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return start, time.perf_counter()

    def _replay(self, decode: DecodeInputs, split: Split) -> None:
        n = len(decode.seq_lens)
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        entry = self._graphs[bucket]
        padded = _scratch_inputs(bucket, decode.block_tables.shape[1], "cpu")
        padded.block_tables[:n], padded.seq_lens[:n], padded.slots[:n] = (
            decode.block_tables, decode.seq_lens, decode.slots
        )
        # Copies on the lane's stream, before the replay that reads them; table columns past the longest sequence
        # keep stale entries that no sequence reads.
        entry.inputs.block_tables[:, : padded.block_tables.shape[1]].copy_(padded.block_tables)
        entry.inputs.seq_lens.copy_(padded.seq_lens)
        entry.inputs.slots.copy_(padded.slots)
        entry.graphs[split].replay()

    def forward(self, x: Any, decode: DecodeInputs | None, chunks: list[ChunkInputs]) -> Any:
        """Logits of every decode row and of each chunk's last token; ``x`` holds the decode rows, then the chunks.
        Each layer writes the step's K/V to the cache, then attends per part."""
        cache, block_size = self.cache, self.cache.block_size
        num_decodes = 0 if decode is None else len(decode.seq_lens)
        slot_parts = ([decode.slots] if decode is not None else []) + [c.slots for c in chunks]
        slots = slot_parts[0] if len(slot_parts) == 1 else torch.cat(slot_parts)

        def attend(layer: int, q: Any, k: Any, v: Any) -> Any:
            k_cache, v_cache = cache.k[layer], cache.v[layer]
            k_cache.index_copy_(0, slots, k)
            v_cache.index_copy_(0, slots, v)
            parts = []
            if decode is not None:
                parts.append(paged_decode_attention(
                    q[:num_decodes], k_cache, v_cache, decode.block_tables, decode.seq_lens, block_size
                ))
            offset = num_decodes
            for chunk in chunks:
                end = offset + len(chunk.slots)
                if chunk.past:
                    keys, values = k_cache[chunk.past_slots], v_cache[chunk.past_slots]
                else:
                    keys, values = k[offset:end], v[offset:end]
                parts.append(causal_attention(q[offset:end], keys, values, chunk.past))
                offset = end
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        if chunks:
            ends = np.cumsum([num_decodes] + [len(c.slots) for c in chunks])[1:] - 1
            rows = torch.from_numpy(np.concatenate([np.arange(num_decodes), ends])).to(x.device)
        else:
            rows = slice(None)
        return self.stack.forward(x, attend, rows)


def _scratch_inputs(batch: int, width: int, device: Any) -> DecodeInputs:
    """Decode inputs with every row on the scratch block: a length-1 sequence, what padded graph rows hold."""
    return DecodeInputs(
        torch.full((batch, width), SCRATCH_BLOCK, dtype=torch.int32, device=device),
        torch.ones(batch, dtype=torch.int32, device=device),
        torch.zeros(batch, dtype=torch.int64, device=device),  # slot 0 lies in the scratch block
    )
