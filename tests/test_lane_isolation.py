"""What one lane does to vLLM's device-wide state stays in that lane: device syncs wait for the lane's own stream, and
each lane's kernels take their scratch from a workspace lane of their own. No GPU: the streams are fakes, vLLM's
workspace manager is real (on CPU tensors)."""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from vllm.v1.worker import workspace
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_rapid.lanes.lane import Lane, current_lane
from vllm_rapid.patch.runner import sync_lane_stream_only
from vllm_rapid.patch.workspace import DECODE_WORKSPACE_LANE, PREFILL_WORKSPACE_LANE, use_two_workspace_lanes
from vllm_rapid.worker.lane_worker import run_lane_step


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.synced_from: list[str | None] = []

    def synchronize(self) -> None:
        self.synced_from.append(current_lane())


_current = threading.local()


@contextlib.contextmanager
def on_stream(stream: FakeStream) -> Iterator[None]:
    """A lane's stream context, as the partition backends' (torch.cuda.stream) make their stream current."""
    previous, _current.stream = getattr(_current, "stream", None), stream
    try:
        yield
    finally:
        _current.stream = previous


def test_each_runners_device_sync_waits_for_its_own_lanes_stream_only(monkeypatch):
    device_syncs: list[str | None] = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *args: device_syncs.append(current_lane()))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: _current.stream)
    runners = {}
    for name in ("decode", "prefill"):
        runner = types.SimpleNamespace(device=torch.device("cuda"))
        runner._sync_device = types.MethodType(GPUModelRunner._sync_device, runner)  # vLLM's own
        sync_lane_stream_only(runner)
        runners[name] = runner
    streams = {name: FakeStream(name) for name in runners}
    lanes = {name: Lane(name) for name in runners}
    try:
        for name, lane in lanes.items():
            lane.submit(runners[name]._sync_device, context=functools.partial(on_stream, streams[name])).result()
    finally:
        for lane in lanes.values():
            lane.close()
    assert {name: s.synced_from for name, s in streams.items()} == {"decode": ["decode"], "prefill": ["prefill"]}
    assert device_syncs == []
    runners["decode"]._sync_device()  # outside the lanes (start-up, profiling): vLLM's whole-device sync
    assert device_syncs == [None]


@pytest.fixture
def workspace_manager(monkeypatch) -> Any:
    """vLLM's workspace manager sized as vLLM's GPU worker sizes it, on CPU tensors."""
    import vllm.v1.worker.gpu_worker as gpu_worker

    monkeypatch.setattr(gpu_worker, "_num_workspace_lanes", gpu_worker._num_workspace_lanes)  # undone afterwards
    use_two_workspace_lanes()
    use_two_workspace_lanes()  # idempotent
    config = types.SimpleNamespace(speculative_config=None)
    workspace.init_workspace_manager(torch.device("cpu"), None, gpu_worker._num_workspace_lanes(config, False))
    yield workspace.current_workspace_manager()
    workspace.reset_workspace_manager()


class ScratchRunner:
    """A runner whose step takes scratch from vLLM's workspace, as MLA or fused MoE kernels do."""

    device = torch.device("cpu")

    def execute_model(self, scheduler_output: Any) -> int:
        (scratch,) = workspace.current_workspace_manager().get_simultaneous(((1 << 16,), torch.uint8))
        return scratch.data_ptr()


def test_vllm_sizes_its_workspace_manager_with_a_lane_per_rapid_lane(workspace_manager):
    assert workspace_manager._num_lanes == 2


def test_the_two_lanes_steps_take_their_scratch_from_different_workspaces(workspace_manager):
    lanes = {name: Lane(name) for name in ("decode", "prefill")}
    try:
        decode = lanes["decode"].run(run_lane_step, ScratchRunner(), None, None, DECODE_WORKSPACE_LANE)
        prefill = lanes["prefill"].run(run_lane_step, ScratchRunner(), None, None, PREFILL_WORKSPACE_LANE)
        again = lanes["decode"].run(run_lane_step, ScratchRunner(), None, None, DECODE_WORKSPACE_LANE)
    finally:
        for lane in lanes.values():
            lane.close()
    assert decode != prefill and again == decode
    assert workspace._workspace_lane.get() == 0  # the lane is set per step, never leaking into the caller
