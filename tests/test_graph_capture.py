"""CUDA graph discipline of the profiler and the GPU benchmark, with torch.cuda's graph API faked (CPU torch has no
CUDA): synchronize before the warm-up (inputs are made on the default stream, lanes read them on non-blocking
streams), the garbage collector frozen during captures (torch >= 2.9 no longer collects first), and every graph
destroyed before the partition backend closes the green contexts it was captured on."""

from __future__ import annotations

import contextlib
import gc
import types
from typing import Any

import pytest
import torch
from fake_backend import FakeBackend

from vllm_rapid.tools import layer_stack, profile
from vllm_rapid.tools.layer_stack import LlamaStack, ModelDims, capture_graph, frozen_gc


class FakeGraphs:
    """torch.cuda's synchronize, current_stream, CUDAGraph and graph, recording what happens in which order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.graphs: list[Any] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeGraphs:
        log = self.log
        outer = self

        class Graph:
            def __init__(self) -> None:
                self.alive = True
                outer.graphs.append(self)

            def replay(self) -> None:
                assert self.alive, "replay of a destroyed graph"

            def reset(self) -> None:
                log.append("reset")
                self.alive = False

        @contextlib.contextmanager
        def graph(graph: Graph, pool=None, stream=None):
            log.append("capture begins")
            yield
            log.append("capture ends")

        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("synchronize"))
        monkeypatch.setattr(torch.cuda, "current_stream",
                            lambda device=None: types.SimpleNamespace(synchronize=lambda: log.append("stream sync")))
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        return self


@pytest.fixture
def fake_graphs(monkeypatch) -> FakeGraphs:
    return FakeGraphs().install(monkeypatch)


def test_capture_synchronizes_first_and_freezes_the_collector_while_capturing(fake_graphs):
    baseline = gc.get_freeze_count()

    def step() -> None:
        fake_graphs.log.append(f"step, frozen={gc.get_freeze_count() > baseline}")

    capture_graph(step, contextlib.nullcontext)
    assert fake_graphs.log == [
        "synchronize",  # before the warm-up reads what the default stream made
        "step, frozen=False", "stream sync",  # warm-up
        "capture begins", "step, frozen=True", "capture ends",
    ]
    assert gc.get_freeze_count() == baseline


def test_nested_frozen_gc_collects_once_and_unfreezes_at_the_outermost_exit(monkeypatch):
    collections = []
    monkeypatch.setattr(layer_stack.gc, "collect", lambda: collections.append(1))
    baseline = gc.get_freeze_count()
    with frozen_gc():
        with frozen_gc():
            pass
        assert gc.get_freeze_count() > baseline  # still frozen after the inner exit
    assert collections == [1] and gc.get_freeze_count() == baseline


TINY = ModelDims(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=64,
                 head_dim=16)


def _fake_timing(monkeypatch, fail_on_call: int | None = None) -> None:
    """Replays cost 1 ms each; optionally the n-th timing raises, as a CUDA error mid-profile would."""
    calls = []

    def time_replays(graph, context, iters):
        calls.append(iters)
        if len(calls) == fail_on_call:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        event = types.SimpleNamespace(elapsed_time=lambda other: float(iters))
        return event, event

    monkeypatch.setattr(profile, "_time_replays", time_replays)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")


def test_profile_records_its_backend_and_destroys_every_graph(fake_graphs, monkeypatch):
    _fake_timing(monkeypatch)
    stack = LlamaStack(TINY, torch.device("cpu"), torch.float32)
    result = profile.profile_backend(stack, FakeBackend(100, [40]), [1, 4], [8], 16, 2, 1 << 30)
    assert result.backend == "fake" and result.total_units == 100 and result.device == "fake GPU"
    assert {(s.decode_units, s.batch_size) for s in result.decode} == {(40, 1), (40, 4), (100, 1), (100, 4)}
    assert len(fake_graphs.graphs) == 2 + 4  # a prefill graph per split, a decode graph per grid point
    assert not any(g.alive for g in fake_graphs.graphs)


def test_a_failing_profile_still_destroys_its_graphs_before_returning(fake_graphs, monkeypatch):
    _fake_timing(monkeypatch, fail_on_call=3)  # the first decode point's concurrent prefill
    stack = LlamaStack(TINY, torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        profile.profile_backend(stack, FakeBackend(100, [40]), [1], [8], 16, 2, 1 << 30)
    assert fake_graphs.graphs and not any(g.alive for g in fake_graphs.graphs)
