"""Decode CUDA graphs per SM partition, so that a decode step on a partition really runs inside it.

A CUDA graph keeps the SM partition of the stream it was captured on. vLLM captures its graphs once, on a
whole-device stream: replayed by the decode lane inside a green-context partition they would still run on every SM,
while the ARM and the metrics describe a split. As SGLang's PD multiplexing does, the decode graphs are captured once
more per decode partition, on that partition's decode stream, after vLLM's own capture:

* keying: vLLM's FULL wrapper keys its graph entries by ``BatchDescriptor``; RAPID keeps one such dict per split and
  installs it in the wrapper for each decode step on that split (``vllm_rapid.patch.decode_graph_entries``);
* what: the FULL descriptors vLLM captured that a decode batch dispatches to (at most ``max_num_seqs`` requests), the
  same on every partition;
* selection: each step asks vLLM's runner which graph its batch will dispatch to; a partition without that graph (a
  batch above vLLM's capture sizes, a PIECEWISE or eager dispatch) runs the step on the full split with vLLM's own
  graphs, never capturing lazily, and the ARM state says so;
* offer: the ARM chooses only among the captured partitions and the full split; without FULL decode graphs a GPU's
  partitions are offered only with ``rapid.eager_decode_partitions``. CPU thread splits run no graphs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from vllm.compilation.cuda_graph import CUDAGraphWrapper
from vllm.config import CUDAGraphMode
from vllm.forward_context import BatchDescriptor
from vllm.v1.core.sched.output import SchedulerOutput

from vllm_rapid.lanes.arm import ArmDecision, ArmReason
from vllm_rapid.lanes.lane import ContextFactory
from vllm_rapid.lanes.partition import PartitionBackend, Split
from vllm_rapid.patch.decode_graph_entries import graph_entries
from vllm_rapid.worker.runners import is_v2

logger = logging.getLogger(__name__)

# vLLM's floor for one graph in its own estimate (GPUModelRunner.profile_cudagraph_memory).
MIN_GRAPH_BYTES = 1 << 20

GraphEntries = dict[BatchDescriptor, Any]  # vLLM's CUDAGraphEntry by descriptor, as CUDAGraphWrapper keeps them


def decode_partitions(backend: PartitionBackend, device: torch.device) -> list[Split]:
    """The backend's splits whose decode needs graphs of its own: a GPU's partitions (CPU thread splits run none)."""
    if device.type == "cpu":
        return []
    return [s for s in backend.splits() if not s.full_overlap]


def full_graph_wrapper(runner: Any) -> CUDAGraphWrapper | None:
    """vLLM's FULL-graph wrapper around the runner's model; None where decode runs without FULL graphs, and on the V2
    runner, whose graphs its own manager keeps (per-partition graphs are not built for it yet)."""
    if is_v2(runner):
        return None
    model = getattr(runner, "model", None)
    if runner.model_config.enforce_eager or not isinstance(model, CUDAGraphWrapper):
        return None
    return model if model.runtime_mode == CUDAGraphMode.FULL else None


def decode_descriptors(dispatcher: Any, max_num_seqs: int) -> list[BatchDescriptor]:
    """The FULL graphs of ``dispatcher`` that a decode-lane batch can dispatch to, largest first (vLLM's order)."""
    max_tokens = max_num_seqs * dispatcher.uniform_decode_query_len
    full = dict(dispatcher.get_capture_descs()).get(CUDAGraphMode.FULL, [])
    return [d for d in full if d.num_tokens <= max_tokens and not d.has_lora]


def graph_reserve_bytes(vllm_estimate: int, vllm_graphs: int, partition_graphs: int) -> int:
    """Memory for ``partition_graphs`` more graphs in vLLM's graph pool, at vLLM's average per graph (at least its
    floor).

    The pool overlays the transient memory of graphs that never run at once (only the decode lane replays, one step
    at a time, and each step ends in a host sync), so one more graph costs at most the average, which also carries the
    first capture's shared part.
    """
    if vllm_graphs == 0 or partition_graphs == 0:
        return 0
    return partition_graphs * max(math.ceil(vllm_estimate / vllm_graphs), MIN_GRAPH_BYTES)


def partition_graph_bytes(vllm_config: Any, backend: PartitionBackend, device: torch.device, vllm_estimate: int) -> int:
    """What the partitions' decode graphs will take, from vLLM's estimate for its own (0: none will be captured, or
    vLLM did not profile its graphs). V1 runner only: V2 gets no per-partition graphs yet."""
    partitions = decode_partitions(backend, device)
    if vllm_config.model_config.enforce_eager or not partitions or vllm_estimate <= 0:
        return 0
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher  # V1 (vLLM 0.34 has no V1 runner)

    dispatcher = CudagraphDispatcher(vllm_config)  # vLLM's keys for this config (the runner's are reset by then)
    dispatcher.initialize_cudagraph_keys(
        vllm_config.compilation_config.cudagraph_mode, dispatcher.uniform_decode_query_len
    )
    vllm_graphs = sum(len(descs) for _, descs in dispatcher.get_capture_descs())
    decode_graphs = len(decode_descriptors(dispatcher, vllm_config.scheduler_config.max_num_seqs))
    return graph_reserve_bytes(vllm_estimate, vllm_graphs, decode_graphs * len(partitions))


class DecodeGraphs:
    """The primary runner's FULL decode graphs once more per decode partition, and the split each decode step runs
    on."""

    def __init__(self, runner: Any, backend: PartitionBackend, eager_partitions: bool) -> None:
        self.runner = runner
        self.backend = backend
        self.eager_partitions = eager_partitions
        self.wrapper = full_graph_wrapper(runner)
        self.partitions = decode_partitions(backend, runner.device)
        self.descriptors = (
            decode_descriptors(runner.cudagraph_dispatcher, runner.max_num_reqs) if self.wrapper is not None else []
        )
        self._entries: dict[Split, GraphEntries] = {}
        self._fallbacks_logged: set[Split] = set()

    # ---- start-up ---------------------------------------------------------------------------------------------

    def capture(self, reserved_bytes: int) -> None:
        """After vLLM's own capture: every decode graph on every partition's decode stream, then each replayed once
        (a graph's first launch uploads it)."""
        if not (self.descriptors and self.partitions):
            return
        start, free = time.monotonic(), _free_device_memory()
        with _capture_scope(self.runner):
            for split in self.partitions:
                entries: GraphEntries = {}
                with self._partition(split, entries)():
                    self.runner._capture_cudagraphs(self.descriptors, CUDAGraphMode.FULL)
                self._entries[split] = entries
        for split, entries in self._entries.items():
            with self._partition(split, entries)():
                for descriptor in self.descriptors:
                    self.runner._dummy_run(descriptor.num_tokens, cudagraph_runtime_mode=CUDAGraphMode.FULL,
                                           uniform_decode=descriptor.uniform, skip_eplb=True)
        used = 0
        if free is not None:
            torch.cuda.synchronize()
            used = free - torch.cuda.mem_get_info()[0]
        logger.info(
            "RAPID: captured %d decode graphs (%d..%d tokens) on each of %d partitions (%s) in %.1f s: %.1f MiB "
            "(%.1f MiB reserved)", len(self.descriptors), self.descriptors[-1].num_tokens,
            self.descriptors[0].num_tokens, len(self._entries), ", ".join(s.label for s in self._entries),
            time.monotonic() - start, used / 2**20, reserved_bytes / 2**20,
        )

    def offered_splits(self) -> list[Split]:
        """The splits the ARM may choose: all of them on CPU; on a GPU the full split and the captured partitions,
        or every partition with ``rapid.eager_decode_partitions`` where decode has no FULL graphs."""
        if not self.partitions:
            return self.backend.splits()
        if self._entries:
            return [s for s in self.backend.splits() if s.full_overlap or s in self._entries]
        labels = ", ".join(s.label for s in self.partitions)
        if is_v2(self.runner) and not self.runner.model_config.enforce_eager:
            # vLLM's own graphs were captured on a whole-device stream: replayed on a partition they would still run
            # on every SM, so they are never replayed there.
            logger.warning(
                "RAPID: per-partition decode graphs are not built for vLLM's V2 model runner yet, so the ARM is "
                "offered the whole device only (partitions %s need --enforce-eager and "
                "rapid.eager_decode_partitions=true)", labels,
            )
            return [self.backend.full_split()]
        if self.eager_partitions:
            logger.warning(
                "RAPID: decode runs without FULL CUDA graphs; rapid.eager_decode_partitions offers the SM partitions "
                "(%s) anyway: eager decode on a small partition can starve behind its kernel launches", labels,
            )
            return self.backend.splits()
        logger.warning(
            "RAPID: decode runs without FULL CUDA graphs (--enforce-eager, or a cudagraph mode without them), so the "
            "ARM is offered the whole device only: eager decode on a small partition starves behind its kernel "
            "launches. rapid.eager_decode_partitions=true offers the partitions (%s) anyway", labels,
        )
        return [self.backend.full_split()]

    # ---- each step ----------------------------------------------------------------------------------------------

    def decode_lane(self, decision: ArmDecision, step: SchedulerOutput) -> tuple[ArmDecision, ContextFactory]:
        """The split decode really runs ``step`` on (the decision's, or the full split where the decision's partition
        has no graph for the batch), and the decode lane's context for it."""
        entries = self._entries.get(decision.split)
        if entries is None or step.total_num_scheduled_tokens == 0:
            return decision, self.backend.lane_contexts(decision.split)[0]
        descriptor = self.descriptor(step)
        if descriptor is not None and _captured(entries, descriptor):
            return decision, self._partition(decision.split, entries)
        full = self.backend.full_split()
        detail = (f"no decode graph for {step.total_num_scheduled_tokens} tokens on {decision.split.label}: decode "
                  f"on the whole device ({decision.detail})")
        if decision.split not in self._fallbacks_logged:
            self._fallbacks_logged.add(decision.split)
            logger.info("RAPID: %s (logged once per partition)", detail)
        return ArmDecision(full, ArmReason.NO_DECODE_GRAPH, detail), self.backend.lane_contexts(full)[0]

    def descriptor(self, step: SchedulerOutput) -> BatchDescriptor | None:
        """The FULL graph the runner will dispatch ``step``'s batch to (None: PIECEWISE or eager), asked as
        ``execute_model`` asks it."""
        tokens = np.fromiter(step.num_scheduled_tokens.values(), dtype=np.int32)
        mode, descriptor, *_ = self.runner._determine_batch_execution_and_padding(
            num_tokens=int(tokens.sum()), num_reqs=len(tokens), num_scheduled_tokens_np=tokens,
            max_num_scheduled_tokens=int(tokens.max()),
        )
        return descriptor if mode == CUDAGraphMode.FULL else None

    def _partition(self, split: Split, entries: GraphEntries) -> ContextFactory:
        """The decode lane's context on ``split`` with that partition's graphs in vLLM's wrapper."""
        return functools.partial(_on_partition, self.backend.lane_contexts(split)[0], self.wrapper, entries)


@contextlib.contextmanager
def _on_partition(stream: ContextFactory, wrapper: Any, entries: GraphEntries) -> Iterator[None]:
    with stream(), graph_entries(wrapper, entries):
        yield


def _captured(entries: GraphEntries, descriptor: BatchDescriptor) -> bool:
    entry = entries.get(descriptor)
    return entry is not None and entry.cudagraph is not None


@contextlib.contextmanager
def _capture_scope(runner: Any) -> Iterator[None]:
    """What vLLM's capture_model puts around its captures: capturing allowed (vLLM forbids it after its own), the
    collector frozen, and the TP group's capture context (custom all-reduce registers the graphs' buffers as it
    closes). The partitions' streams are entered inside it, so the graphs are captured on them."""
    from vllm.compilation.monitor import set_cudagraph_capturing_enabled
    from vllm.distributed.parallel_state import graph_capture

    set_cudagraph_capturing_enabled(True)
    try:
        with runner._freeze_gc(), graph_capture(device=runner.device):
            torch.accelerator.synchronize()  # a partition's stream does not wait for earlier work on other streams
            yield
            torch.accelerator.synchronize()
    finally:
        set_cudagraph_capturing_enabled(False)


def _free_device_memory() -> int | None:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
