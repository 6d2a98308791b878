"""vLLM's per-iteration details (``--enable-logging-iteration-details``) count the prefill batch a step launches.

The engine core computes them from the step's SchedulerOutput, which for RAPID holds the decode batch; the prefill
batch launched in the step rides in ``RapidSchedulerOutput.prefill``. (A step whose decode batch is empty is not
logged by vLLM at all: it leaves 0-token steps to its dummy-batch path.)
"""

from __future__ import annotations

import dataclasses
from typing import Any


def count_prefill_launches() -> None:
    """Rebind the engine core's ``compute_iteration_details`` to one that adds the launched prefill batch
    (idempotent)."""
    import vllm.v1.engine.core as core

    compute = core.compute_iteration_details
    if getattr(compute, "_rapid_counts_prefill", False):
        return

    def compute_with_prefill(scheduler_output: Any) -> Any:
        details = compute(scheduler_output)
        launch = getattr(scheduler_output, "prefill", None)
        if launch is None:
            return details
        prefill = compute(launch.scheduler_output)
        return dataclasses.replace(details, **{
            f.name: getattr(details, f.name) + getattr(prefill, f.name) for f in dataclasses.fields(details)
        })

    compute_with_prefill._rapid_counts_prefill = True  # type: ignore[attr-defined]
    core.compute_iteration_details = compute_with_prefill
