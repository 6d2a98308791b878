"""Tensor parallelism with two lanes: each lane runs its collectives on its own TP communicator.

The two lanes run forward passes at the same time. On one communicator their all-reduces would interleave: wrong
sums, or ranks waiting on each other forever. The prefill lane's thread gets its own coordinator over the same
ranks, and the decode lane keeps vLLM's. vLLM reaches the TP group in two ways, and both answer per thread:

* eager code calls ``parallel_state.get_tp_group()`` (imported by name in many modules): its code is swapped for
  one that returns the thread's group (its identity kept, as for the forward context);
* compiled graphs call vLLM's collective custom ops with the name of the group they were traced with, looked up in
  ``parallel_state._groups``: the registry answers the TP group's name with the thread's group.

``patches/0004-thread-local-tp-group.diff`` is the upstream change.

Each lane's communicator sees the same collectives in the same order on every rank, because every rank receives
the same step from the scheduler and runs the same batch on the same lane; the worker also never lets a rank's
prefill lane run ahead or fall behind by a batch (``RapidSchedulerOutput.last_completed_prefill``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from vllm_rapid.patch.versions import replace_function_code

_tp_override_tls = threading.local()


def _template_get_tp_group() -> Any:
    """Code template for vllm.distributed.parallel_state.get_tp_group: never called here (``_TP`` and
    ``_tp_override_tls`` resolve in parallel_state, where the code runs)."""
    group = getattr(_tp_override_tls, "group", None)
    if group is not None:
        return group
    assert _TP is not None, "tensor model parallel group is not initialized"  # type: ignore[name-defined] # noqa: F821
    return _TP  # type: ignore[name-defined] # noqa: F821 (parallel_state's)


class _LaneAwareGroupRegistry(dict):
    """``parallel_state._groups`` (group name -> weakref), except that a thread with its own TP group gets that
    group for the TP group's name."""

    def __getitem__(self, name: str) -> Any:
        override = getattr(_tp_override_tls, "ref", None)
        if override is not None and name == _tp_name():
            return override
        return super().__getitem__(name)


def _tp_name() -> str | None:
    import vllm.distributed.parallel_state as ps

    return ps._TP.unique_name if ps._TP is not None else None


def apply_thread_local_tp_group() -> bool:
    """Patch the loaded vLLM once; return True if this call changed it. Refuses vLLM versions it was not made for."""
    import vllm.distributed.parallel_state as ps

    if getattr(ps, "_tp_override_tls", None) is _tp_override_tls:
        return False
    template = {ps.get_tp_group: _template_get_tp_group}
    replace_function_code(template, "_TP", "the thread-local tensor-parallel group patch")
    ps._tp_override_tls = _tp_override_tls  # read by the new code; set at start-up, before any collective
    ps._groups = _LaneAwareGroupRegistry(ps._groups)
    return True


def use_tp_group(group: Any | None) -> None:
    """Make the calling thread's TP collectives use ``group`` (None: vLLM's TP group again)."""
    _tp_override_tls.group = group
    _tp_override_tls.ref = weakref.ref(group) if group is not None else None
