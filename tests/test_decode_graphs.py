"""Decode CUDA graphs per SM partition (vllm_rapid/worker/decode_graphs.py), without a GPU.

vLLM's own dispatcher, its FULL-graph wrapper's replay path and its runner's dispatch decision run for real; the GPU
parts are fakes: streams are names, a graph records the stream it was captured on and the streams it was replayed
on, and capturing one is what vLLM's wrapper does on a capture (an entry in the dict it holds). What only a GPU can
show (the graphs really stay inside their partitions) is for the device script.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.compilation.cuda_graph import CUDAGraphEntry, CUDAGraphOptions, CUDAGraphWrapper
from vllm.compilation.monitor import set_cudagraph_capturing_enabled
from vllm.config import CompilationMode, CUDAGraphMode, VllmConfig
from vllm.forward_context import BatchDescriptor, ForwardContext, override_forward_context
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_rapid.config import RapidConfig
from vllm_rapid.lanes.arm import AdaptiveResourceManager, ArmDecision, ArmInputs, ArmReason
from vllm_rapid.lanes.lane import Lane
from vllm_rapid.lanes.partition.base import PartitionBackend, Split
from vllm_rapid.lanes.partition.offered import OfferedSplits
from vllm_rapid.lanes.step_time import RooflineEstimate
from vllm_rapid.protocol import RapidSchedulerOutput
from vllm_rapid.worker import decode_graphs
from vllm_rapid.worker.decode_graphs import (
    MIN_GRAPH_BYTES,
    DecodeGraphs,
    decode_descriptors,
    graph_reserve_bytes,
    partition_graph_bytes,
)
from vllm_rapid.worker.lane_control import LaneController

CAPTURE_SIZES = [1, 2, 4, 8, 16, 32]
TOTAL_SMS = 100
D25 = Split(25, 75, TOTAL_SMS, False)
D50 = Split(50, 50, TOTAL_SMS, False)
FULL = Split.full(TOTAL_SMS)
VLLM_STREAM = "vllm's capture stream"
HEAVY = ArmInputs(decode_batch_size=7, mean_context_len=512, prefill_wait_ms=50.0, prefill_inflight=True)
_current = threading.local()


def current_stream() -> str:
    return getattr(_current, "stream", "default")


@contextlib.contextmanager
def on_stream(name: str) -> Iterator[None]:
    previous, _current.stream = current_stream(), name
    try:
        yield
    finally:
        _current.stream = previous


class NamedStreams(PartitionBackend):
    """Green-context-like splits whose lane contexts make a named stream current."""

    name = "named_streams"

    def __init__(self, partitions: tuple[Split, ...] = (D25, D50)) -> None:
        super().__init__(TOTAL_SMS)
        for split in (*partitions, FULL):
            self._register(split, *(functools.partial(on_stream, f"{lane}:{split.label}") for lane in ("d", "p")))

    def close(self) -> None:
        self._contexts.clear()


class FakeGraph:
    def __init__(self) -> None:
        self.captured_on = current_stream()
        self.replayed_on: list[str] = []

    def replay(self) -> None:
        self.replayed_on.append(current_stream())


def make_config(mode: CUDAGraphMode, max_num_seqs: int = 8) -> VllmConfig:
    config = VllmConfig()
    compilation = config.compilation_config
    compilation.cudagraph_mode = mode
    compilation.cudagraph_capture_sizes = list(CAPTURE_SIZES)
    compilation.max_cudagraph_capture_size = CAPTURE_SIZES[-1]
    if mode.requires_piecewise_compilation():
        compilation.mode = CompilationMode.VLLM_COMPILE
        compilation.splitting_ops = list(compilation._attention_ops)
    config.scheduler_config.max_num_seqs = max_num_seqs
    return config


def full_wrapper(entries: dict[BatchDescriptor, Any]) -> CUDAGraphWrapper:
    """vLLM's FULL wrapper as load_model makes it, minus the graph pool a CPU has none of."""
    wrapper = object.__new__(CUDAGraphWrapper)
    wrapper.runnable = lambda *args: "eager forward"
    wrapper.runtime_mode = CUDAGraphMode.FULL
    wrapper.cudagraph_options = CUDAGraphOptions()
    wrapper.is_debugging_mode = False
    wrapper.concrete_cudagraph_entries = entries
    return wrapper


class FakeRunner:
    """The primary runner's parts the decode graphs use; vLLM's own dispatch decision."""

    _determine_batch_execution_and_padding = GPUModelRunner._determine_batch_execution_and_padding
    _is_uniform_decode = staticmethod(GPUModelRunner._is_uniform_decode)

    def __init__(self, mode: CUDAGraphMode = CUDAGraphMode.FULL_AND_PIECEWISE, max_num_seqs: int = 8,
                 device: str = "cuda", enforce_eager: bool = False) -> None:
        self.vllm_config = make_config(mode, max_num_seqs)
        self.parallel_config = self.vllm_config.parallel_config
        self.device = torch.device(device)
        self.model_config = SimpleNamespace(enforce_eager=enforce_eager, is_encoder_decoder=False)
        self.input_batch = SimpleNamespace(lora_id_to_lora_request={})
        self.max_num_reqs = max_num_seqs
        self.cudagraph_dispatcher = CudagraphDispatcher(self.vllm_config)
        self.cudagraph_dispatcher.initialize_cudagraph_keys(mode, 1)
        self.uniform_decode_query_len = 1
        # vLLM's own capture, on its own stream, into the wrapper's dict.
        self.vllm_entries: dict[BatchDescriptor, Any] = {}
        self.model: Any = full_wrapper(self.vllm_entries) if mode.has_full_cudagraphs() else object()
        with on_stream(VLLM_STREAM):
            for graph_mode, descriptors in self.cudagraph_dispatcher.get_capture_descs():
                if graph_mode == CUDAGraphMode.FULL:  # PIECEWISE graphs live in the model's pieces, not here
                    self._capture_cudagraphs(descriptors, graph_mode)

    def _capture_cudagraphs(self, batch_descriptors: list[BatchDescriptor], cudagraph_runtime_mode: CUDAGraphMode):
        """What vLLM's wrapper does with each descriptor it does not hold: capture it on the current stream."""
        assert cudagraph_runtime_mode == CUDAGraphMode.FULL
        for descriptor in batch_descriptors:
            self.model.concrete_cudagraph_entries[descriptor] = CUDAGraphEntry(descriptor, FakeGraph(), "out")

    def _dummy_run(self, num_tokens: int, cudagraph_runtime_mode: CUDAGraphMode | None = None,
                   uniform_decode: bool = False, skip_eplb: bool = False) -> Any:
        mode, descriptor = self.cudagraph_dispatcher.dispatch(num_tokens, uniform_decode=uniform_decode)
        assert cudagraph_runtime_mode in (None, mode)
        return self.forward(mode, descriptor)

    def forward(self, mode: CUDAGraphMode, descriptor: BatchDescriptor) -> Any:
        """The model forward of a step: through vLLM's wrapper, which replays or captures by the forward context."""
        context = ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={},
                                 cudagraph_runtime_mode=mode, batch_descriptor=descriptor)
        with override_forward_context(context):
            return self.model(torch.zeros(1))

    def step(self, step: SchedulerOutput) -> Any:
        """A decode step as execute_model runs it: vLLM's dispatch decision, then the forward."""
        tokens = torch.tensor(list(step.num_scheduled_tokens.values()), dtype=torch.int32).numpy()
        mode, descriptor, *_ = self._determine_batch_execution_and_padding(
            len(tokens) and int(tokens.sum()), len(tokens), tokens, int(tokens.max()))
        return self.forward(mode, descriptor)


def decode_step(num_reqs: int) -> SchedulerOutput:
    step = SchedulerOutput.make_empty()
    step.num_scheduled_tokens = {f"r{i}": 1 for i in range(num_reqs)}
    step.total_num_scheduled_tokens = num_reqs
    return step


def decision(split: Split) -> ArmDecision:
    return ArmDecision(split, ArmReason.HEAVY_LOAD, "heavy load", 5.0)


@pytest.fixture
def capture_scope(monkeypatch) -> list[str]:
    """vLLM's capture scope (TP capture context, capturing allowed) needs a GPU: record that the captures run in it."""
    events: list[str] = []

    @contextlib.contextmanager
    def scope(runner: Any) -> Iterator[None]:
        events.append("enter")
        yield
        events.append("exit")

    monkeypatch.setattr(decode_graphs, "_capture_scope", scope)
    return events


def captured(runner: FakeRunner | None = None, backend: PartitionBackend | None = None) -> DecodeGraphs:
    graphs = DecodeGraphs(runner or FakeRunner(), backend or NamedStreams(), eager_partitions=False)
    graphs.capture(reserved_bytes=0)
    return graphs


def run_on_decode_lane(context: Any, fn: Any, *args: Any) -> Any:
    lane = Lane("decode")
    try:
        return lane.submit(fn, *args, context=context).result()
    finally:
        lane.close()


# ---- what is captured, where, and its memory ------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "uniform"), [
    (CUDAGraphMode.FULL_AND_PIECEWISE, True), (CUDAGraphMode.FULL_DECODE_ONLY, True), (CUDAGraphMode.FULL, False)])
def test_the_graphs_captured_per_partition_are_the_full_graphs_a_decode_batch_dispatches_to(mode, uniform):
    runner = FakeRunner(mode, max_num_seqs=8)
    descriptors = decode_descriptors(runner.cudagraph_dispatcher, max_num_seqs=8)
    assert [(d.num_tokens, d.num_reqs, d.uniform) for d in descriptors] == [(n, n, uniform) for n in (8, 4, 2, 1)]
    for num_reqs in range(1, 9):  # every decode batch dispatches to one of them (FULL mode's 16 and 32 never)
        mode_used, descriptor = runner.cudagraph_dispatcher.dispatch(num_reqs, uniform_decode=True)
        assert mode_used == CUDAGraphMode.FULL and descriptor in descriptors


@pytest.mark.parametrize("mode", [CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE])
def test_without_full_graphs_nothing_is_captured(mode, capture_scope):
    graphs = captured(FakeRunner(mode))
    assert graphs.descriptors == [] and capture_scope == []


def test_each_partition_gets_its_own_graphs_captured_on_its_decode_stream_and_replayed_once(capture_scope):
    runner = FakeRunner()
    vllm_graphs = dict(runner.vllm_entries)
    graphs = captured(runner)
    assert capture_scope == ["enter", "exit"]
    assert runner.model.concrete_cudagraph_entries is runner.vllm_entries == vllm_graphs  # vLLM's, untouched
    assert all(e.cudagraph.captured_on == VLLM_STREAM and e.cudagraph.replayed_on == [] for e in vllm_graphs.values())
    assert set(graphs._entries) == {D25, D50}  # the full split keeps vLLM's graphs
    for split, entries in graphs._entries.items():
        assert list(entries) == graphs.descriptors
        for entry in entries.values():
            assert entry.cudagraph.captured_on == f"d:{split.label}"
            assert entry.cudagraph.replayed_on == [f"d:{split.label}"]  # the warm-up replay, on its partition


def test_shared_pool_splits_get_graphs_of_their_own_beside_a_disjoint_split_of_the_same_size(capture_scope):
    """A shared-pool split (floor plus pool) is keyed apart from a disjoint split of the same decode size: its graphs
    are captured on its own decode stream and a step on it replays them there."""
    shared = Split(50, 75, TOTAL_SMS, False, 25)
    runner = FakeRunner()
    graphs = captured(runner, NamedStreams((D50, shared)))
    assert set(graphs._entries) == {D50, shared} and shared.label == "P75-D50"
    effective, context = graphs.decode_lane(decision(shared), decode_step(3))
    assert effective.split == shared
    assert run_on_decode_lane(context, runner.step, decode_step(3)) == "out"
    padded = BatchDescriptor(4, 4, True)
    assert graphs._entries[shared][padded].cudagraph.captured_on == "d:P75-D50"
    assert graphs._entries[shared][padded].cudagraph.replayed_on == ["d:P75-D50", "d:P75-D50"]  # warm-up, this step
    assert graphs._entries[D50][padded].cudagraph.replayed_on == ["d:P50-D50"]  # its warm-up only


def test_the_memory_reserve_counts_one_decode_graph_set_per_partition_at_vllms_cost_per_graph():
    assert graph_reserve_bytes(100 << 20, vllm_graphs=50, partition_graphs=10) == 20 << 20
    assert graph_reserve_bytes(10 << 20, vllm_graphs=50, partition_graphs=10) == 10 * MIN_GRAPH_BYTES  # vLLM's floor
    assert graph_reserve_bytes(100 << 20, vllm_graphs=0, partition_graphs=10) == 0
    assert graph_reserve_bytes(100 << 20, vllm_graphs=50, partition_graphs=0) == 0
    # vLLM's keys for this config: 6 PIECEWISE + 4 FULL decode graphs; 4 decode graphs more on each of 2 partitions.
    config, cuda = make_config(CUDAGraphMode.FULL_AND_PIECEWISE), torch.device("cuda")
    config.model_config = SimpleNamespace(enforce_eager=False)
    assert partition_graph_bytes(config, NamedStreams(), cuda, 10 * (3 << 20)) == 2 * 4 * (3 << 20)
    assert partition_graph_bytes(config, NamedStreams(partitions=()), cuda, 10 << 20) == 0  # no partitions
    assert partition_graph_bytes(config, NamedStreams(), torch.device("cpu"), 10 << 20) == 0  # threads: no graphs
    assert partition_graph_bytes(config, NamedStreams(), cuda, 0) == 0  # vLLM did not profile (explicit KV size)
    config.model_config = SimpleNamespace(enforce_eager=True)
    assert partition_graph_bytes(config, NamedStreams(), cuda, 10 << 20) == 0


# ---- each step: the partition's graphs, or the whole device ---------------------------------------------------


def test_a_decode_step_on_a_partition_replays_that_partitions_graph_on_its_stream(capture_scope):
    runner = FakeRunner()
    graphs = captured(runner)
    chosen = decision(D25)
    effective, context = graphs.decode_lane(chosen, decode_step(3))
    assert effective is chosen
    assert run_on_decode_lane(context, runner.step, decode_step(3)) == "out"
    padded = BatchDescriptor(4, 4, True)
    assert graphs._entries[D25][padded].cudagraph.replayed_on == ["d:P75-D25", "d:P75-D25"]  # warm-up, this step
    assert graphs._entries[D50][padded].cudagraph.replayed_on == ["d:P50-D50"]
    assert runner.vllm_entries[padded].cudagraph.replayed_on == []
    assert runner.model.concrete_cudagraph_entries is runner.vllm_entries  # vLLM's again after the step


@pytest.mark.parametrize(("max_num_seqs", "num_reqs", "missing"), [
    (8, 7, BatchDescriptor(8, 8, True)),  # a size the partition lacks
    (64, 40, None),  # a batch above vLLM's largest capture size: vLLM runs it eagerly
])
def test_a_batch_without_a_graph_on_its_partition_runs_on_the_whole_device_and_never_captures(
        capture_scope, max_num_seqs, num_reqs, missing):
    runner = FakeRunner(max_num_seqs=max_num_seqs)
    graphs = captured(runner)
    if missing is not None:
        del graphs._entries[D25][missing]
    set_cudagraph_capturing_enabled(False)  # as after start-up
    try:
        effective, context = graphs.decode_lane(decision(D25), decode_step(num_reqs))
        assert effective.split == FULL and effective.reason == ArmReason.NO_DECODE_GRAPH
        assert effective.detail.startswith(f"no decode graph for {num_reqs} tokens on P75-D25")
        run_on_decode_lane(context, runner.step, decode_step(num_reqs))
        if missing is not None:
            assert runner.vllm_entries[missing].cudagraph.replayed_on == ["d:P100-D100"]
            # What the partition would have done: a lazy capture, refused after start-up.
            partition = graphs._partition(D25, graphs._entries[D25])
            with pytest.raises(RuntimeError, match="CUDA graph capturing detected"):
                run_on_decode_lane(partition, runner.step, decode_step(num_reqs))
    finally:
        set_cudagraph_capturing_enabled(True)


def test_the_full_split_idle_steps_and_cpu_splits_run_as_chosen(capture_scope):
    backend = NamedStreams()
    graphs = captured(backend=backend)
    full = decision(FULL)
    assert graphs.decode_lane(full, decode_step(3)) == (full, backend.lane_contexts(FULL)[0])
    idle = decision(D25)
    assert graphs.decode_lane(idle, decode_step(0)) == (idle, backend.lane_contexts(D25)[0])
    cpu = captured(FakeRunner(device="cpu"), backend)
    assert cpu._entries == {} and cpu.decode_lane(idle, decode_step(3)) == (idle, backend.lane_contexts(D25)[0])


def test_the_step_asks_vllms_runner_which_graph_the_batch_dispatches_to():
    runner = FakeRunner(max_num_seqs=64)
    graphs = DecodeGraphs(runner, NamedStreams(), eager_partitions=False)
    for num_reqs in range(1, 65):
        mode, expected = runner.cudagraph_dispatcher.dispatch(num_reqs, uniform_decode=True)
        assert graphs.descriptor(decode_step(num_reqs)) == (expected if mode == CUDAGraphMode.FULL else None)
    mixed = decode_step(2)
    mixed.num_scheduled_tokens, mixed.total_num_scheduled_tokens = {"r0": 1, "r1": 3}, 4
    assert graphs.descriptor(mixed) is None  # not a uniform decode batch: PIECEWISE in vLLM


# ---- what the ARM is offered ----------------------------------------------------------------------------------


def test_the_arm_is_offered_the_captured_partitions(capture_scope):
    graphs = captured(backend=NamedStreams())
    assert graphs.offered_splits() == [D25, D50, FULL]


@pytest.mark.parametrize(("runner", "eager", "offered"), [
    ({"enforce_eager": True}, False, [FULL]),
    ({"mode": CUDAGraphMode.PIECEWISE}, False, [FULL]),
    ({"enforce_eager": True}, True, [D25, D50, FULL]),
])
def test_without_decode_graphs_partitions_are_offered_only_on_request_with_a_warning(
        capture_scope, caplog, runner, eager, offered):
    graphs = DecodeGraphs(FakeRunner(**runner), NamedStreams(), eager_partitions=eager)
    graphs.capture(reserved_bytes=0)
    with caplog.at_level(logging.WARNING, logger="vllm_rapid.worker.decode_graphs"):
        assert graphs.offered_splits() == offered
    assert "without FULL CUDA graphs" in caplog.text and "rapid.eager_decode_partitions" in caplog.text


def test_cpu_thread_splits_are_all_offered(capture_scope, caplog):
    graphs = captured(FakeRunner(device="cpu"))
    with caplog.at_level(logging.WARNING, logger="vllm_rapid.worker.decode_graphs"):
        assert graphs.offered_splits() == [D25, D50, FULL]
    assert not [r for r in caplog.records if r.name == "vllm_rapid.worker.decode_graphs"]


def test_the_arm_chooses_only_among_the_offered_splits():
    backend = NamedStreams()
    static = RapidConfig(arm_policy="static", static_decode_fraction=0.25)
    assert AdaptiveResourceManager(static, OfferedSplits(backend, [D50])).decide(HEAVY).split == D50
    assert AdaptiveResourceManager(static, OfferedSplits(backend, [])).decide(HEAVY).split == FULL
    offered = OfferedSplits(backend, [D50])
    assert offered.splits() == [D50, FULL] and offered.lane_contexts(D50) == backend.lane_contexts(D50)


def test_the_worker_reports_the_split_decode_really_ran_on(capture_scope):
    """The ARM state (metrics, the ARM's next observation) names the whole device when decode fell back to it; the
    prefill lane keeps the chosen partition."""
    backend = NamedStreams()
    graphs = captured(backend=backend)
    del graphs._entries[D25][BatchDescriptor(8, 8, True)]
    controller = LaneController(RapidConfig(arm_policy="static", static_decode_fraction=0.25), torch.device("cpu"))
    controller.backend.close()
    controller.backend = backend
    controller.attach_model(torch.nn.Linear(4, 4), [torch.zeros(16)], 16)
    controller.attach_decode_graphs(graphs)
    for num_reqs, split, reason in [(3, D25, "policy"), (7, FULL, "no_decode_graph")]:
        step = RapidSchedulerOutput.wrap(decode_step(num_reqs), arm_inputs=HEAVY)
        contexts = controller.contexts_for(step)
        assert (controller.state().split, controller.state().reason) == (split, reason)
        assert contexts.prefill is backend.lane_contexts(D25)[1]
    assert isinstance(controller.roofline, RooflineEstimate)
