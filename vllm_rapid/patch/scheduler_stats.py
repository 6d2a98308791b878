"""Give vLLM's ``SchedulerStats`` a free-form ``plugin_stats`` dict, so RAPID's stats reach the frontend.

SchedulerStats crosses the engine-core -> frontend boundary as msgpack decoded into the ``SchedulerStats`` type, so
fields of a subclass made by the scheduler are dropped on the way. ``patches/0003-scheduler-stats-plugin-stats.diff``
adds the field upstream. At run time the start-up hook applies the same change as ``vllm.v1.metrics.stats`` is
imported, before any other vLLM module takes the name: the module's ``SchedulerStats`` becomes a dataclass subclass
with the one extra field, so the scheduler, the engine-core output type and the frontend's decoder all use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm_rapid.patch.versions import is_supported_vllm

FIELD = "plugin_stats"


def has_plugin_stats(stats_class: type) -> bool:
    return FIELD in {f.name for f in dataclasses.fields(stats_class)}


def patch_scheduler_stats(module: Any) -> None:
    """Rebind ``module.SchedulerStats`` (``vllm.v1.metrics.stats``) to a subclass with ``plugin_stats``."""
    base = module.SchedulerStats
    if has_plugin_stats(base):
        return  # vLLM has the field already (upstream patch), or this ran before
    if not is_supported_vllm():
        return  # the version gate refuses RAPID engines on this vLLM; other schedulers see vLLM untouched
    module.SchedulerStats = dataclasses.make_dataclass(
        base.__name__,
        [(FIELD, dict[str, Any] | None, dataclasses.field(default=None))],
        bases=(base,),
        namespace={"__doc__": base.__doc__, "__module__": module.__name__},
    )
