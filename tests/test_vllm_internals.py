"""The vLLM internals RAPID relies on exist in the installed vLLM, a missing one is named, and the version gate
refuses a RAPID engine on an unsupported vLLM at start-up while leaving vLLM's default scheduler alone."""

from __future__ import annotations

import pytest

from vllm_rapid.patch import internals
from vllm_rapid.patch.internals import INTERNALS, Internal, problems, require_vllm_internals
from vllm_rapid.patch.registry import Stage
from vllm_rapid.patch.versions import UnsupportedVllmError, vllm_in, vllm_version

ENGINE_CORE_STAGES = (Stage.ENGINE_ARGS, Stage.ENGINE_CORE)


def _ids(internal: Internal) -> str:
    releases = f"[{internal.since or ''}:{internal.before or ''}]" if internal.since or internal.before else ""
    return f"{internal.stage.value}:{internal.label}{releases}"


@pytest.mark.parametrize("internal", INTERNALS, ids=_ids)
def test_the_installed_vllm_has_every_internal_rapid_uses(internal):
    if not internal.applies:
        pytest.skip(f"about vLLM [{internal.since}, {internal.before}), not {vllm_version()}")
    if internal.stage not in ENGINE_CORE_STAGES and vllm_in(since="0.34"):
        # vLLM 0.34 has the V2 model runner only; the worker's entries are being ported to it.
        pytest.skip("worker-stage internals are checked on vLLM 0.32 and 0.33 only until the V2 worker port")
    assert problems(internal) == []


def test_entries_apply_to_their_releases_only(monkeypatch):
    import vllm

    installed = vllm.__version__
    old, new = Internal(Stage.ENGINE_CORE, "m:f", before="0.34"), Internal(Stage.ENGINE_CORE, "m:f", since="0.34")
    for version, applies in (("0.32.0", (True, False)), ("0.33.1", (True, False)), ("0.34.0", (False, True)),
                             ("0.34.1rc1", (False, True))):
        monkeypatch.setattr(vllm, "__version__", version)
        assert (old.applies, new.applies) == applies, version
    monkeypatch.setattr(vllm, "__version__", installed)
    missing = Internal(Stage.ENGINE_CORE, "vllm.no_such_module:Thing", before="0.32")
    assert missing.applies is False and problems(missing)  # it is missing, and not checked on this vLLM:
    monkeypatch.setattr(internals, "INTERNALS", (*INTERNALS, missing))
    require_vllm_internals(*ENGINE_CORE_STAGES)


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
    if vllm_in(before="0.34"):
        require_vllm_internals(Stage.CPU_WORKER)


def test_an_unsupported_vllm_refuses_rapid_at_start_up_and_leaves_default_alone(tiny_model, monkeypatch):
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    kwargs = dict(model=tiny_model, load_format="dummy", dtype="float32", max_model_len=1024,
                  kv_cache_memory_bytes=16 << 20)
    supported = r"vllm-rapid supports vLLM 0\.32\.x, 0\.33\.x, 0\.34\.x; found 0\.31\.2"
    with pytest.raises(UnsupportedVllmError, match=supported):
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
    monkeypatch.setattr(vllm, "__version__", "0.35.0")
    patch_scheduler_stats(module)
    assert module.SchedulerStats is SchedulerStats
    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    patch_scheduler_stats(module)
    assert has_plugin_stats(module.SchedulerStats)
