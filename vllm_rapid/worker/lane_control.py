"""The Adaptive Resource Manager's seat in the worker: each step, pick the split and give each lane its partition.

The partition backend (green contexts, CU masks, streams or CPU threads) pre-creates the splits; the ARM chooses
one per engine step from the inputs the scheduler ships with the step, and learns from the decode step the output
rank measured (also shipped by the scheduler), so every tensor-parallel rank decides the same split. A prefill batch
keeps the partition it was launched on (a running batch cannot move). On a GPU the ARM is offered only the partitions
the decode lane has CUDA graphs for, and a step whose batch has no graph on the chosen partition decodes on the whole
device (``vllm_rapid.worker.decode_graphs``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from vllm import envs
from vllm.config import ParallelConfig

from vllm_rapid.config import RapidConfig
from vllm_rapid.lanes.arm import AdaptiveResourceManager, ArmDecision, ArmReason
from vllm_rapid.lanes.lane import ContextFactory
from vllm_rapid.lanes.partition import PartitionBackend, create_partition_backend
from vllm_rapid.lanes.partition.offered import OfferedSplits
from vllm_rapid.lanes.step_time import RooflineEstimate
from vllm_rapid.protocol import ArmState, RapidSchedulerOutput
from vllm_rapid.worker.decode_graphs import DecodeGraphs


def worker_cpu_cores(parallel_config: ParallelConfig, allowed_cores: int | None = None) -> int:
    """The cores one CPU worker's lanes share: the share vLLM's own CPU binding gives a rank (``OMPProcessManager``
    with ``VLLM_CPU_OMP_THREADS_BIND=auto``, which RAPID turns off to run two OpenMP teams).

    With the multiprocessing executor vLLM keeps cores for the engine-core process, which busy-polls its workers
    (one per local rank, or ``VLLM_CPU_NUM_OF_RESERVED_CPU``): a decode team that also takes those cores waits at
    every OpenMP barrier for a thread the poller preempted (2 cores, a 4-request decode step: 3.5 ms on one core,
    5.3 ms on both; benchmarks/results/cpu-decode-step-cores). In-process (the uniprocessing executor) nothing polls.
    """
    allowed = allowed_cores or len(os.sched_getaffinity(0))
    if parallel_config.distributed_executor_backend != "mp":
        return allowed
    world = parallel_config.local_world_size
    reserved = world if envs.VLLM_CPU_NUM_OF_RESERVED_CPU is None else envs.VLLM_CPU_NUM_OF_RESERVED_CPU
    return max(1, (allowed - reserved) // world)


@dataclass(frozen=True)
class LaneContexts:
    """The decision for one step and the context each lane enters for it."""

    decision: ArmDecision
    decode: ContextFactory
    prefill: ContextFactory


class LaneController:
    """Owns the partition backend and the ARM of one worker."""

    def __init__(self, config: RapidConfig, device: torch.device, cpu_cores: int | None = None) -> None:
        self.config = config
        self.device = device
        kind = "cpu" if device.type == "cpu" else "cuda"
        self.backend: PartitionBackend = create_partition_backend(
            config.partition_backend, kind, device_index=device.index or 0, cpu_cores=cpu_cores,
            layout=config.partition_layout, shared_pool_fraction=config.shared_pool_fraction,
        )
        self.arm: AdaptiveResourceManager | None = None
        self.roofline: RooflineEstimate | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.last_decision = ArmDecision(self.backend.full_split(), ArmReason.START_UP, "start-up")

    def attach_model(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], num_kv_tokens: int) -> None:
        """Size the ARM's roofline estimate once weights and KV are known."""
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        kv_bytes = sum(t.numel() * t.element_size() for t in kv_caches)
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.roofline = RooflineEstimate.for_device(
            device_name, weight_bytes, kv_bytes / max(num_kv_tokens, 1), self.backend.total_units
        )

    def attach_decode_graphs(self, graphs: DecodeGraphs) -> None:
        """Build the ARM over the splits the decode lane can run on, once its graphs are captured."""
        self.decode_graphs = graphs
        offered = OfferedSplits(self.backend, graphs.offered_splits())
        self.arm = AdaptiveResourceManager(self.config, offered, roofline=self.roofline)

    def contexts_for(self, step: RapidSchedulerOutput) -> LaneContexts:
        if self.arm is None or self.decode_graphs is None:
            raise RuntimeError("attach_model() and attach_decode_graphs() must run before the first step")
        if step.decode_observation is not None:
            self.arm.observe(step.decode_observation)
        decision = self.arm.decide(step.arm_inputs)
        _, prefill = self.backend.lane_contexts(decision.split)
        decision, decode = self.decode_graphs.decode_lane(decision, step)
        self.last_decision = decision
        return LaneContexts(decision, decode, prefill)

    def state(self) -> ArmState:
        """The split in use and why."""
        decision = self.last_decision
        return ArmState(
            backend=self.backend.name,
            split=decision.split,
            reason=decision.reason.value,
            detail=decision.detail,
            predicted_decode_ms=decision.predicted_decode_ms,
        )

    def close(self) -> None:
        self.backend.close()
