"""CPU: each lane is a thread with its own OpenMP team; a split is how many cores each team may use.

Light load: the decode lane's team gets every core (the paper's P100-D100; the prefill lane is idle). Two teams of
every core running at once would spin against each other, so while both lanes run the ARM gives them a partition
(decode some cores, prefill the rest). The prefill lane's thread also runs at a lower OS priority, so on a busy
machine the decode lane (and the engine loop that feeds it) get the cores first and prefill soaks up the rest.
torch's CPU kernels release the GIL, so the two threads really run at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence

from vllm_rapid.lanes.lane import ContextFactory, LaneName
from vllm_rapid.lanes.partition.base import PartitionBackend, Split, plan_decode_units

# The prefill lane's niceness: 10 keeps decode close to its pace alone while the prefill still gets enough CPU
# (19 starved it); benchmarks/lane_overlap.py measures the result (benchmarks/results/cpu-lane-overlap.json).
CPU_PREFILL_NICENESS = 10


class ThreadsBackend(PartitionBackend):
    """Splits of the process's cores between the two lanes' OpenMP teams."""

    name = "threads"
    full_split_runs_both_lanes = False
    # An OpenMP team started from a second thread runs at about half the speed of the worker thread's own team
    # (measured: 4.7 vs 2.4 ms for a small decode step with two threads on two cores), and the engine waits for
    # every decode step anyway: the decode lane runs inline in the worker's thread, with that thread's team.
    inline_decode_lane = True

    def __init__(self, cores: int | None = None, decode_units: Sequence[int] | None = None) -> None:
        cores = cores or len(os.sched_getaffinity(0))
        super().__init__(cores)
        self._register(self.full_split(), _team(cores), _team(cores))
        if cores >= 2:
            for decode in plan_decode_units(cores, 1, decode_units):
                self._register(Split(decode, cores - decode, cores, False), _team(decode), _team(cores - decode))

    def thread_init(self, lane: str) -> Callable[[], None]:
        return functools.partial(_init_lane_thread, CPU_PREFILL_NICENESS if lane == LaneName.PREFILL else 0)

    def close(self) -> None:
        self._contexts.clear()


def _init_lane_thread(niceness: int) -> None:
    """The lane thread's OS priority, and its own OpenMP team.

    torch sizes a new thread's team lazily from a process-wide value on its first parallel op: run one first, so
    the team size each split sets afterwards is this thread's own.
    """
    import torch

    if niceness:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    torch.ones(1 << 16).sum()


def _team(num_threads: int) -> ContextFactory:
    return functools.partial(_omp_team, num_threads)


@contextlib.contextmanager
def _omp_team(num_threads: int) -> Iterator[None]:
    """Run the submission with an OpenMP team of ``num_threads`` in the calling (lane) thread.

    ``torch._C.set_num_threads``: vLLM's CPU worker turns ``torch.set_num_threads`` into a no-op after binding its
    threads; the C entry point is intact, and it sets the calling thread's own team size.
    """
    import torch

    if torch.get_num_threads() != num_threads:
        torch._C.set_num_threads(num_threads)
    yield
