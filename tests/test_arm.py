"""The Adaptive Resource Manager, its profile table and roofline fallback, and the ``vllm-rapid profile`` CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch
import yaml
from fake_backend import FakeBackend

from vllm_rapid.config import RapidConfig
from vllm_rapid.lanes.arm import AdaptiveResourceManager, ArmInputs, ArmReason, DecodeObservation
from vllm_rapid.lanes.partition import Split
from vllm_rapid.lanes.step_time import DecodeProfile, DecodeSample, ProfileError, RooflineEstimate
from vllm_rapid.tools.profile import NO_GPU_EXIT_CODE, LlamaStack, ModelDims, main

TOTAL = 100
PARTITIONS = [20, 40, 60, 80]
BATCHES = [1, 8, 32, 128]
CONTEXTS = [512, 2048, 8192]
# Decode under a concurrent prefill on the whole device: three times slower than alone there.
FULL_OVERLAP_FACTOR = 3.0


def make_backend(total: int = TOTAL, decode_units: list[int] = PARTITIONS) -> FakeBackend:
    return FakeBackend(total, decode_units)


def base_ms(batch: int, context: int) -> float:
    return 5.0 + 0.1 * batch + batch * context / 10_000


def step_ms(batch: int, context: int, units: int) -> float:
    if units == TOTAL:
        return base_ms(batch, context) * FULL_OVERLAP_FACTOR
    return base_ms(batch, context) * TOTAL / units


def make_profile() -> DecodeProfile:
    decode = [
        DecodeSample(b, c, u, step_ms(b, c, u)) for u in [*PARTITIONS, TOTAL] for b in BATCHES for c in CONTEXTS
    ]
    return DecodeProfile(TOTAL, decode, device="fake GPU", model="synthetic", backend="fake")


def make_arm(**options) -> tuple[AdaptiveResourceManager, FakeBackend]:
    options = {"itl_slo_ms": 30.0, "ttft_slo_ms": 1000.0, "arm_hysteresis_steps": 1, **options}
    backend = make_backend()
    return AdaptiveResourceManager(RapidConfig(**options), backend, profile=make_profile()), backend


HEAVY = ArmInputs(decode_batch_size=32, mean_context_len=2048, prefill_wait_ms=50.0, prefill_inflight=True)
LIGHT = ArmInputs(decode_batch_size=32, mean_context_len=2048, prefill_wait_ms=0.0, prefill_inflight=False)


# --- decisions ---


def test_no_prefill_pending_is_full_overlap():
    arm, backend = make_arm()
    decision = arm.decide(LIGHT)
    assert decision.split == backend.full_split() and "no prefill pending" in decision.detail


def test_light_decode_load_overlaps_even_with_a_prefill_running():
    arm, backend = make_arm()
    decision = arm.decide(ArmInputs(1, 512, 10.0, True))  # 5.15 ms x 3 under overlap, well inside 30 ms
    assert decision.split == backend.full_split() and "overlap meets ITL" in decision.detail
    assert decision.predicted_decode_ms == pytest.approx(step_ms(1, 512, TOTAL))


def test_heavy_load_takes_the_smallest_decode_partition_meeting_the_slo():
    arm, backend = make_arm()
    decision = arm.decide(HEAVY)
    # 32 x 2048: 73.8 ms on 20 units, 36.9 on 40, 24.6 on 60 (the first under 30), 44.3 under full overlap.
    assert decision.split == Split(60, 40, TOTAL, False)
    assert decision.split in backend.splits()
    assert "smallest decode partition meeting ITL" in decision.detail
    assert decision.predicted_decode_ms == pytest.approx(step_ms(32, 2048, 60))


def test_when_nothing_meets_the_slo_the_fastest_split_wins():
    arm, _ = make_arm(itl_slo_ms=10.0)
    decision = arm.decide(HEAVY)
    assert decision.split.decode_units == 80 and "no split meets ITL" in decision.detail


def test_hysteresis_needs_consecutive_wins_and_does_not_flap():
    arm, backend = make_arm(arm_hysteresis_steps=3)
    for _ in range(5):  # alternating load never lets a challenger win three times in a row
        assert arm.decide(HEAVY).split == backend.full_split()
        assert arm.decide(LIGHT).split == backend.full_split()
    first, second = arm.decide(HEAVY), arm.decide(HEAVY)
    assert first.split == second.split == backend.full_split()
    assert first.reason == ArmReason.HYSTERESIS and "won 2/3" in second.detail
    assert arm.decide(HEAVY).split.decode_units == 60
    for _ in range(5):
        assert arm.decide(LIGHT).split.decode_units == 60
        assert arm.decide(HEAVY).split.decode_units == 60
    assert arm.current_split.decode_units == 60


def test_ttft_guard_gives_prefill_one_step_more_at_once():
    arm, _ = make_arm(arm_hysteresis_steps=3)
    waiting = dataclasses.replace(HEAVY, prefill_wait_ms=900.0)  # > 0.8 x 1000 ms
    decision = arm.decide(waiting)
    assert decision.split.decode_units == 40  # one size below the ITL choice (60), no hysteresis wait
    assert decision.reason == ArmReason.TTFT_GUARD and decision.detail.startswith("ttft-guard")
    assert arm.decide(dataclasses.replace(HEAVY, prefill_wait_ms=700.0)).split.decode_units == 40  # held by hysteresis


def test_online_correction_raises_the_partition_when_steps_run_slower_than_predicted():
    arm, _ = make_arm()
    chosen = arm.decide(HEAVY).split
    assert chosen.decode_units == 60
    for _ in range(10):
        arm.observe(DecodeObservation(chosen, 32, 2048, 2.0 * step_ms(32, 2048, 60)))
    assert arm.predict_decode_ms(chosen, 32, 2048) > 30.0
    assert arm.decide(HEAVY).split.decode_units == 80


def test_online_correction_ignores_a_single_outlier():
    arm, _ = make_arm()
    split = Split(60, 40, TOTAL, False)
    arm.observe(DecodeObservation(split, 32, 2048, 1000.0 * step_ms(32, 2048, 60)))
    assert arm.decide(HEAVY).split == split


def test_full_overlap_policy():
    arm, backend = make_arm(arm_policy="full_overlap")
    for load in (HEAVY, LIGHT):
        decision = arm.decide(load)
        assert decision.split == backend.full_split() and decision.detail == "policy full_overlap"


@pytest.mark.parametrize(("fraction", "units"), [(0.5, 60), (0.3, 40), (0.2, 20), (0.9, TOTAL)])
def test_static_policy_uses_the_precreated_split_at_or_above_the_fraction(fraction, units):
    arm, _ = make_arm(arm_policy="static", static_decode_fraction=fraction)
    for load in (HEAVY, LIGHT):
        decision = arm.decide(load)
        assert decision.split.decode_units == units and decision.detail == "policy static"
        assert arm.current_split == decision.split


def test_cpu_threads_give_decode_every_core_alone_and_a_partition_beside_a_prefill():
    """CPU lanes are OpenMP teams: both on every core at once would oversubscribe them, so while a prefill runs the
    ARM leaves the full split at once (no hysteresis) for a partition, even one predicted slower, and returns as soon
    as the prefill lane is idle."""
    from vllm_rapid.lanes.partition.threads import ThreadsBackend

    backend = ThreadsBackend(cores=8)
    profile = DecodeProfile(8, [DecodeSample(1, 1, units, 1.0) for units in (2, 3, 4, 5, 6, 8)])
    arm = AdaptiveResourceManager(RapidConfig(arm_hysteresis_steps=3), backend, profile=profile)
    assert arm.decide(LIGHT).split == backend.full_split()
    beside_prefill = arm.decide(HEAVY).split
    assert not beside_prefill.full_overlap
    assert beside_prefill.decode_units + beside_prefill.prefill_units == 8
    assert arm.decide(LIGHT).split == backend.full_split()


def test_profile_from_another_device_is_refused():
    with pytest.raises(ProfileError, match="re-run `vllm-rapid profile`"):
        AdaptiveResourceManager(RapidConfig(), make_backend(total=132, decode_units=[40]), profile=make_profile())


def test_profile_of_another_partition_layout_is_refused():
    """A shared-pool split and a disjoint one of the same decode size run differently: the profile must match."""
    shared = FakeBackend(TOTAL, [40, 60], shared_units=20)
    with pytest.raises(ProfileError, match="'disjoint' partition layout.*'shared_pool'.*--layout shared_pool"):
        AdaptiveResourceManager(RapidConfig(), shared, profile=make_profile())
    profile = dataclasses.replace(make_profile(), layout="shared_pool")
    arm = AdaptiveResourceManager(RapidConfig(itl_slo_ms=30.0, arm_hysteresis_steps=1), shared, profile=profile)
    assert arm.decide(HEAVY).split.shared_units == 20


def test_adaptive_policy_needs_a_profile_or_an_estimate():
    with pytest.raises(ValueError, match="profile"):
        AdaptiveResourceManager(RapidConfig(), make_backend())
    AdaptiveResourceManager(RapidConfig(arm_policy="full_overlap"), make_backend())


# --- profile table ---


def test_profile_lookup_is_conservative():
    profile = make_profile()
    at = lambda units: Split(units, TOTAL - units, TOTAL, units == TOTAL)  # noqa: E731
    assert profile.decode_step_ms(at(40), 32, 2048) == step_ms(32, 2048, 40)
    assert profile.decode_step_ms(at(40), 20, 1000) == step_ms(32, 2048, 40)  # next measured batch and context
    assert profile.decode_step_ms(at(40), 256, 8192) == pytest.approx(2 * step_ms(128, 8192, 40))  # beyond grid
    assert profile.decode_step_ms(at(50), 32, 2048) == step_ms(32, 2048, 40)  # unmeasured split: fewer units
    assert profile.decode_step_ms(at(10), 32, 2048) == pytest.approx(2 * step_ms(32, 2048, 20))


def test_profile_yaml_round_trip(tmp_path):
    path = tmp_path / "profile.yaml"
    make_profile().save(path)
    assert yaml.safe_load(path.read_text())["version"] == 1
    assert DecodeProfile.load(path) == make_profile()
    shared = dataclasses.replace(make_profile(), layout="shared_pool")
    shared.save(path)
    assert DecodeProfile.load(path) == shared


def test_arm_loads_the_profile_named_by_the_config(tmp_path):
    path = tmp_path / "profile.yaml"
    make_profile().save(path)
    config = RapidConfig(profile_path=str(path), itl_slo_ms=30.0, arm_hysteresis_steps=1)
    arm = AdaptiveResourceManager(config, make_backend())
    assert arm.decide(HEAVY).split.decode_units == 60


def _good() -> dict:
    return {
        "version": 1,
        "total_units": 100,
        "decode": [{"batch_size": 1, "context_len": 512, "decode_units": 40, "step_ms": 5.0}],
    }


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("version"), "version None is not supported"),
        (lambda d: d.update(version=2), "version 2 is not supported"),
        (lambda d: d.update(total_units="many"), "total_units must be a positive integer"),
        (lambda d: d.update(decode=[]), "decode has no samples"),
        (lambda d: d.update(decode={"a": 1}), "decode must be a list"),
        (lambda d: d["decode"][0].pop("step_ms"), r"decode\[0\] must be a mapping with keys"),
        (lambda d: d["decode"][0].update(step_ms=-1), r"decode\[0\].step_ms must be a positive number"),
        (lambda d: d["decode"][0].update(batch_size=1.5), r"decode\[0\].batch_size must be a positive integer"),
        (lambda d: d["decode"][0].update(decode_units=101), "exceeds total_units=100"),
        (lambda d: d["decode"][0].update(step_ms=True), r"decode\[0\].step_ms must be a positive number"),
        (lambda d: d.update(colour="blue"), r"unknown field\(s\) \['colour'\]"),
        (lambda d: d.update(layout="pooled"), r"layout must be one of \['disjoint', 'shared_pool'\]"),
        # Prefill throughput was measured but drove no decision: the table holds decode steps only.
        (lambda d: d.update(prefill=[{"prefill_units": 60}]), r"unknown field\(s\) \['prefill'\]"),
    ],
)
def test_bad_profile_files_fail_with_a_clear_error(tmp_path, mutate, message):
    data = _good()
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=message) as info:
        DecodeProfile.load(path)
    assert str(path) in str(info.value)


def test_unreadable_or_non_yaml_profiles_fail_clearly(tmp_path):
    with pytest.raises(ProfileError, match="cannot read ARM profile"):
        DecodeProfile.load(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("decode: [unclosed")
    with pytest.raises(ProfileError, match="not valid YAML"):
        DecodeProfile.load(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ProfileError, match="expected a mapping, got list"):
        DecodeProfile.load(tmp_path / "list.yaml")


# --- roofline estimate ---


def llama8b_on_h200(total_units: int = 132) -> RooflineEstimate:
    return RooflineEstimate.for_device("NVIDIA H200", 16e9, ModelDims().kv_bytes_per_token(), total_units)


def test_roofline_estimate_shape():
    estimate = llama8b_on_h200()
    assert estimate.peak_bandwidth == 4.8e12
    quarter, half, full = Split(33, 99, 132, False), Split(66, 66, 132, False), Split.full(132)
    # Memory-bound decode keeps full bandwidth down to half the device, and loses it below.
    assert estimate.decode_step_ms(half, 1, 512) == pytest.approx(1e3 * (16e9 + 131072 * 512) / (4.8e12 * 0.6))
    assert estimate.decode_step_ms(quarter, 1, 512) == pytest.approx(2 * estimate.decode_step_ms(half, 1, 512))
    assert estimate.decode_step_ms(full, 1, 512) == pytest.approx(1.5 * estimate.decode_step_ms(half, 1, 512))
    assert estimate.decode_step_ms(half, 64, 8192) > estimate.decode_step_ms(half, 1, 512)
    unknown = RooflineEstimate.for_device("Mystery GPU", 16e9, 131072, 132)
    assert unknown.decode_step_ms(half, 1, 512) > estimate.decode_step_ms(half, 1, 512)


def test_roofline_counts_contention_on_the_shared_pool_only():
    """Decode on a floor plus a shared pool competes with the prefill on the pool's part of its units: slower than a
    disjoint partition of the same size, faster than the whole device under overlap."""
    estimate = llama8b_on_h200()
    disjoint, shared = Split(84, 48, 132, False), Split(84, 84, 132, False, 36)
    alone = estimate.decode_step_ms(disjoint, 32, 2048)
    assert estimate.decode_step_ms(shared, 32, 2048) == pytest.approx(alone * (1 + 0.5 * 36 / 84))
    assert estimate.decode_step_ms(shared, 32, 2048) < estimate.decode_step_ms(Split.full(132), 32, 2048)


def test_the_arm_sizes_a_shared_pool_split_like_a_disjoint_one():
    """Same decisions over shared-pool splits: full overlap at light load, the smallest decode partition (floor plus
    pool) predicted to meet the SLO under a prefill. The pool's contention costs units: at 35 ms, 68 disjoint SMs
    would do (29.4 ms, as above), 68 of them shared 37.2 ms, 84 35.7 ms, 100 34.7 ms."""
    backend = FakeBackend(132, [60, 68, 84, 100, 108], shared_units=36)
    arm = AdaptiveResourceManager(RapidConfig(itl_slo_ms=35.0, arm_hysteresis_steps=1), backend,
                                  roofline=llama8b_on_h200())
    heavy = arm.decide(ArmInputs(128, 4096, 100.0, True))
    assert (heavy.split.decode_units, heavy.split.shared_units, heavy.reason) == (100, 36, ArmReason.HEAVY_LOAD)
    assert arm.decide(ArmInputs(128, 4096, 0.0, False)).split == backend.full_split()


def test_roofline_is_used_without_a_profile_and_says_so_once(caplog):
    backend = make_backend(total=132, decode_units=[40, 56, 72, 88, 104])
    with caplog.at_level(logging.INFO, logger="vllm_rapid.lanes.arm"):
        arm = AdaptiveResourceManager(
            RapidConfig(itl_slo_ms=30.0, arm_hysteresis_steps=1), backend, roofline=llama8b_on_h200()
        )
        decisions = [arm.decide(ArmInputs(128, 4096, 100.0, True)) for _ in range(5)]
    assert sum("ESTIMATE" in r.getMessage() for r in caplog.records) == 1
    # 16 GB of weights + 69 GB of KV: 29.4 ms at full bandwidth, which needs at least half the SMs (72 of 132).
    assert all(d.split.decode_units == 72 for d in decisions)
    assert "smallest decode partition meeting ITL" in decisions[0].detail
    assert arm.decide(ArmInputs(1, 512, 100.0, True)).split == backend.full_split()  # 8.4 ms under overlap


# --- the profile CLI ---


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_profile_without_a_gpu_exits_2_with_a_message(capsys):
    assert main(["profile"]) == NO_GPU_EXIT_CODE
    assert "no GPU is visible" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_profile_module_entry_point_without_a_gpu_has_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "vllm_rapid.tools.profile", "profile", "--num-layers", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == NO_GPU_EXIT_CODE
    assert "no GPU is visible" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("bad", [["--batch-sizes", "1,x"], ["--layout", "pooled"]])
def test_profile_arguments_are_checked(bad):
    with pytest.raises(SystemExit) as info:
        main(["profile", *bad])
    assert info.value.code == 2


def test_model_dims_from_hf_config(tmp_path):
    config = {
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 8192, "vocab_size": 128256,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    dims = ModelDims.from_hf_config(tmp_path, num_layers=2)
    assert (dims.num_layers, dims.head_dim, dims.num_kv_heads) == (2, 64, 8)
    assert ModelDims().kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2


def test_llama_stack_shapes_on_cpu():
    dims = ModelDims(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                     vocab_size=100, head_dim=16)
    stack = LlamaStack(dims, torch.device("cpu"), torch.float32)
    x = torch.randn(3, 64)
    k_cache, v_cache = torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    assert stack.decode(x, k_cache, v_cache).shape == (3, 100)
    assert stack.prefill(torch.randn(7, 64)).shape == (1, 100)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("layout", ["disjoint", "shared_pool"])
def test_profile_on_gpu_writes_a_table_the_arm_reads(tmp_path, layout):
    """Strict: on green contexts (asked for explicitly, so a fallback fails), in the layout asked for, both recorded
    in the table."""
    out = tmp_path / "profile.yaml"
    code = main([
        "profile", "--num-layers", "2", "--batch-sizes", "1,16", "--context-lens", "512", "--prefill-tokens", "512",
        "--iters", "3", "--backend", "green_context", "--layout", layout, "--output", str(out),
    ])
    assert code == 0
    profile = DecodeProfile.load(out)
    assert (profile.backend, profile.layout) == ("green_context", layout)
    from vllm_rapid.lanes.partition import create_partition_backend

    backend = create_partition_backend("green_context", "cuda", layout=layout)
    try:
        assert {s.decode_units for s in profile.decode} == {s.decode_units for s in backend.splits()}
        arm = AdaptiveResourceManager(RapidConfig(profile_path=str(out)), backend)
        assert arm.decide(ArmInputs(16, 512, 10.0, True)).split in backend.splits()
    finally:
        torch.cuda.synchronize()
        backend.close()
