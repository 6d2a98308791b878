"""The vLLM internals RAPID relies on exist in the installed vLLM, a missing one is named, and the version gate
refuses a RAPID engine on an unsupported vLLM at start-up while leaving vLLM's default scheduler alone."""

from __future__ import annotations

import pytest

from vllm_rapid.patch import internals
from vllm_rapid.patch.internals import INTERNALS, Internal, problems, require_vllm_internals
from vllm_rapid.patch.registry import Stage
from vllm_rapid.patch.versions import UnsupportedVllmError


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: f"{i.stage.value}:{i.label}")
def test_the_installed_vllm_has_every_internal_rapid_uses(internal):
    assert problems(internal) == []


@pytest.mark.parametrize(
    ("internal", "message"),
    [
        (Internal(Stage.ENGINE_CORE, "vllm.v1.core.sched.scheduler:Scheduler", "schedule_twice"), "is missing"),
        (Internal(Stage.ENGINE_CORE, "vllm.v1.core.kv_cache_manager:KVCacheManager", "allocate_slots",
                  params=("publish_later",)), "has no parameter 'publish_later'"),
        (Internal(Stage.ENGINE_CORE, "vllm.v1.core.sched.scheduler:Scheduler", assigns=("lanes",)),
         "no longer sets self.lanes"),
        (Internal(Stage.ENGINE_CORE, "vllm.v1.core.sched.scheduler:Scheduler", "update_from_output",
                  uses=("make_lane_stats",)), "no longer uses 'make_lane_stats'"),
        (Internal(Stage.WORKER, "vllm.no_such_module:Thing"), "is missing"),
    ],
)
def test_a_moved_internal_is_named(internal, message):
    (problem,) = problems(internal)
    assert internal.label in problem and message in problem


def test_start_up_fails_with_one_message_naming_every_missing_internal(monkeypatch):
    missing = (
        Internal(Stage.ENGINE_CORE, "vllm.v1.core.sched.scheduler:Scheduler", "schedule_twice"),
        Internal(Stage.ENGINE_CORE, "vllm.v1.core.sched.scheduler:Scheduler", assigns=("lanes",)),
        Internal(Stage.WORKER, "vllm.no_such_module:Thing"),
    )
    monkeypatch.setattr(internals, "INTERNALS", (*INTERNALS, *missing))
    with pytest.raises(UnsupportedVllmError) as raised:
        require_vllm_internals(Stage.ENGINE_CORE)
    message = str(raised.value)
    assert "schedule_twice" in message and "self.lanes" in message
    assert "no_such_module" not in message  # another stage's check
    require_vllm_internals(Stage.CPU_WORKER)


def test_an_unsupported_vllm_refuses_rapid_at_start_up_and_leaves_default_alone(tiny_model, monkeypatch):
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    kwargs = dict(model=tiny_model, load_format="dummy", dtype="float32", max_model_len=1024,
                  kv_cache_memory_bytes=16 << 20)
    with pytest.raises(UnsupportedVllmError, match=r"vllm-rapid supports vLLM 0\.32\.x, 0\.33\.x; found 0\.31\.2"):
        EngineArgs(scheduler="rapid", **kwargs).create_engine_config()
    assert EngineArgs(scheduler="default", **kwargs).create_engine_config().scheduler_config is not None


def test_the_stats_patch_skips_an_unsupported_vllm(monkeypatch):
    import dataclasses
    import types

    import vllm

    from vllm_rapid.patch.scheduler_stats import has_plugin_stats, patch_scheduler_stats

    @dataclasses.dataclass
    class SchedulerStats:
        num_running_reqs: int = 0

    module = types.ModuleType("fake_stats")
    module.SchedulerStats = SchedulerStats
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    patch_scheduler_stats(module)
    assert module.SchedulerStats is SchedulerStats
    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    patch_scheduler_stats(module)
    assert has_plugin_stats(module.SchedulerStats)
