"""The worker's ARM driver (LaneController): built on the worker's own device, and deciding each step only from what
the scheduler ships with it, so every tensor-parallel rank runs the same split (issue 11, defects 5 and 8)."""

from __future__ import annotations

import types

import pytest
import torch
from vllm.v1.core.sched.output import SchedulerOutput

from vllm_rapid.config import RapidConfig
from vllm_rapid.lanes.arm import ArmInputs, DecodeObservation
from vllm_rapid.lanes.partition import select
from vllm_rapid.lanes.partition.base import Split
from vllm_rapid.lanes.partition.threads import ThreadsBackend
from vllm_rapid.protocol import RapidSchedulerOutput
from vllm_rapid.worker.decode_graphs import DecodeGraphs
from vllm_rapid.worker.lane_control import LaneController, worker_cpu_cores

EIGHT_CORES = 8


def controller_on_eight_cores() -> LaneController:
    controller = LaneController(RapidConfig(arm_hysteresis_steps=1, itl_slo_ms=20.0), torch.device("cpu"))
    controller.backend.close()
    controller.backend = ThreadsBackend(cores=EIGHT_CORES)
    controller.attach_model(torch.nn.Linear(64, 64), [torch.zeros(1 << 16)], 1 << 12)
    runner = types.SimpleNamespace(device=torch.device("cpu"), model=None, cudagraph_dispatcher=None,
                                   max_num_reqs=8, model_config=types.SimpleNamespace(enforce_eager=True))
    controller.attach_decode_graphs(DecodeGraphs(runner, controller.backend, eager_partitions=False))
    return controller


def steps() -> list[RapidSchedulerOutput]:
    """Decode batches beside a prefill, each with the decode step the output rank measured the step before."""
    out, previous = [], None
    for i in range(12):
        inputs = ArmInputs(8 + i, 500.0 + 50 * i, 10.0 * i, prefill_inflight=i % 3 != 0)
        observed = None if previous is None else DecodeObservation(previous, 8 + i - 1, 500 + 50 * (i - 1), 3.0 * i)
        out.append(RapidSchedulerOutput.wrap(SchedulerOutput.make_empty(), arm_inputs=inputs,
                                             decode_observation=observed))
        previous = Split(4, 4, EIGHT_CORES, False) if i % 2 else Split.full(EIGHT_CORES)
    return out


def test_ranks_fed_the_same_steps_decide_the_same_splits():
    """Each rank's ARM learns only from the output rank's measurements shipped by the scheduler: two ranks, whose own
    lanes ran at different speeds, still choose the same split every step."""
    ranks = [controller_on_eight_cores(), controller_on_eight_cores()]
    decisions = [[rank.contexts_for(step).decision for step in steps()] for rank in ranks]
    assert decisions[0] == decisions[1]
    assert len({d.split for d in decisions[0]}) > 1, "the sequence never left one split: it tests nothing"


def test_the_partition_backend_is_built_on_the_workers_own_device(monkeypatch):
    """Under data parallelism or a non-zero local rank the worker's device is not GPU 0: the backend gets its index,
    and the configured partition layout."""
    built = {}

    def fake_create(name, *, device_index, layout, shared_pool_fraction, **options):
        built.update(device_index=device_index, layout=layout, shared_pool_fraction=shared_pool_fraction)
        return ThreadsBackend(cores=2)

    monkeypatch.setattr(select, "gpu_vendor", lambda kind: "nvidia")
    monkeypatch.setattr(select, "_create", fake_create)
    config = RapidConfig(partition_backend="green_context", partition_layout="shared_pool", shared_pool_fraction=0.3)
    LaneController(config, torch.device("cuda", 3))
    assert built == {"device_index": 3, "layout": "shared_pool", "shared_pool_fraction": 0.3}


def test_the_worker_builds_its_lanes_after_device_init():
    """RapidWorker's __init__ runs before vLLM's init_device picks the device; the lanes and the backend come from
    init_device, on self.device."""
    import inspect

    from vllm_rapid.worker.lane_worker import RapidWorker

    assert "LaneController" not in inspect.getsource(RapidWorker.__init__)
    init_device = inspect.getsource(RapidWorker.init_device)
    assert init_device.index("super().init_device()") < init_device.index("LaneController(")
    assert "self.device" in init_device


@pytest.mark.parametrize(
    ("executor", "world", "reserved", "allowed", "expected"),
    [
        ("mp", 1, None, 2, 1),  # vLLM keeps one core for the engine core's poller, as its own binding does
        ("mp", 1, None, 16, 15),
        ("mp", 2, None, 16, 7),  # one reserved core per local rank, the rest shared among the ranks
        ("mp", 2, None, 2, 1),  # never fewer than one
        ("mp", 1, "0", 2, 2),  # VLLM_CPU_NUM_OF_RESERVED_CPU decides, as in vLLM
        ("uni", 1, None, 2, 2),  # in-process: nothing polls
    ],
)
def test_cpu_lanes_get_the_cores_vllm_gives_a_worker(monkeypatch, executor, world, reserved, allowed, expected):
    from vllm.config import ParallelConfig

    if reserved is None:
        monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", reserved)
    config = ParallelConfig(tensor_parallel_size=world, distributed_executor_backend=executor)
    assert config.local_world_size == world
    assert worker_cpu_cores(config, allowed_cores=allowed) == expected
