"""Partition backends: unit arithmetic, AMD CU masks, split rounding, backend selection (CPU), SM probe (GPU)."""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import sys
import threading
import types

import pytest
import torch
from fake_backend import FakeBackend

from vllm_rapid.lanes.lane import Lane, LaneName, current_lane
from vllm_rapid.lanes.partition import Split, create_partition_backend, select
from vllm_rapid.lanes.partition.base import (
    candidate_units,
    plan_decode_units,
    plan_shared_pool,
    round_units,
    shared_pool_floors,
)
from vllm_rapid.lanes.partition.cu_mask import (
    MI300X_CUS,
    MI300X_XCDS,
    balanced_mask,
    complementary_masks,
    cus_per_xcd,
    infer_xcd_count,
    mask_pairs,
    mask_words,
    shared_pool_masks,
)
from vllm_rapid.lanes.partition.green_context import (
    FINE_SM_GRANULARITY,
    SM_GRANULARITY,
    GreenContextError,
    split_flags,
)
from vllm_rapid.lanes.partition.threads import CPU_PREFILL_NICENESS, ThreadsBackend

H200_SMS = 132
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


# --- unit rounding (shared by green contexts and CU masks) ---


@pytest.mark.parametrize(
    ("requested", "expected"), [(33, 40), (66, 72), (40, 40), (1, 8), (0, 8), (128, 120), (500, 120)]
)
def test_round_units_rounds_up_to_granularity_and_leaves_prefill_a_granule(requested, expected):
    assert round_units(requested, SM_GRANULARITY, H200_SMS) == expected


def test_round_units_rejects_a_device_too_small_to_split():
    with pytest.raises(ValueError, match="cannot be split"):
        round_units(4, 8, 12)


def test_candidate_units_are_rounded_unique_and_sorted():
    assert candidate_units(H200_SMS, SM_GRANULARITY) == [40, 56, 72, 88, 104]
    assert candidate_units(H200_SMS, SM_GRANULARITY, (0.25, 0.26, 0.5)) == [40, 72]


def test_plan_decode_units_honours_requests_and_fine_granularity():
    assert plan_decode_units(H200_SMS, SM_GRANULARITY, [33, 34, 66]) == [40, 72]
    assert plan_decode_units(H200_SMS, FINE_SM_GRANULARITY, [33, 34, 66]) == [34, 66]
    assert plan_decode_units(H200_SMS, SM_GRANULARITY) == candidate_units(H200_SMS, SM_GRANULARITY)


# --- AMD CU masks ---


def test_mi300x_candidates_are_balanced_across_xcds_and_complementary():
    full = (1 << MI300X_CUS) - 1
    for cus in plan_decode_units(MI300X_CUS, MI300X_XCDS):
        decode, prefill = complementary_masks(cus, MI300X_CUS, MI300X_XCDS)
        assert decode & prefill == 0 and decode | prefill == full
        assert cus_per_xcd(decode, MI300X_XCDS) == [cus // MI300X_XCDS] * MI300X_XCDS
        assert cus_per_xcd(prefill, MI300X_XCDS) == [(MI300X_CUS - cus) // MI300X_XCDS] * MI300X_XCDS


def test_decode_cus_round_to_a_multiple_of_the_xcd_count():
    assert plan_decode_units(MI300X_CUS, MI300X_XCDS, [1, 37, 40, 303]) == [8, 40, 296]
    decode, prefill = complementary_masks(296, MI300X_CUS, MI300X_XCDS)
    assert min(cus_per_xcd(prefill, MI300X_XCDS)) == 1  # the smallest prefill side still has every XCD


def test_unbalanced_or_xcd_starving_masks_are_refused():
    with pytest.raises(ValueError, match="balanced"):
        balanced_mask(12, MI300X_XCDS)
    with pytest.raises(ValueError, match="without CUs"):
        complementary_masks(MI300X_CUS, MI300X_CUS, MI300X_XCDS)


def test_mask_words_pack_32_cus_per_word_low_word_first():
    words = mask_words((1 << MI300X_CUS) - 1, MI300X_CUS)
    assert len(words) == 10 and words[:9] == [0xFFFFFFFF] * 9 and words[9] == 0xFFFF
    assert mask_words(balanced_mask(40, MI300X_XCDS), MI300X_CUS) == [0xFFFFFFFF, 0xFF] + [0] * 8
    assert mask_words(1 << 33, 64) == [0, 2]


@pytest.mark.parametrize(
    ("arch", "cus", "xcds"),
    [("gfx942:sramecc+:xnack-", 304, 8), ("gfx942", 228, 6), ("gfx942", 38, 1), ("gfx950", 256, 8), ("gfx90a", 110, 1)],
)
def test_infer_xcd_count(arch, cus, xcds):
    assert infer_xcd_count(arch, cus) == xcds


# --- the shared-pool layout ---


def test_a_split_covers_the_device_and_overlaps_in_exactly_its_shared_units():
    shared = Split(60, 108, H200_SMS, False, 36)
    assert (shared.decode_floor, shared.label) == (24, "P82-D45")
    assert Split(40, 92, H200_SMS, False).shared_units == 0
    # However the full split is built, it is the same one (a dict key of the ARM and the decode graphs).
    assert Split(H200_SMS, H200_SMS, H200_SMS, True) == Split.full(H200_SMS)
    assert Split.full(H200_SMS).shared_units == H200_SMS
    for bad in ((60, 108, H200_SMS, False), (60, 100, H200_SMS, False, 36), (60, 108, H200_SMS, False, 70)):
        with pytest.raises(ValueError, match="cover the device"):
            Split(*bad)


def test_the_shared_pool_plan_leaves_each_lane_a_floor_and_the_rest_to_the_pool():
    plan = plan_shared_pool(H200_SMS, SM_GRANULARITY, 0.25)
    assert (plan.group_units, plan.num_groups, plan.shared_units(H200_SMS)) == (8, 12, 36)
    assert plan.decode_groups == (3, 4, 6, 8, 9)
    # Requested decode partitions (floor plus pool) round up to whole groups; each lane keeps a group.
    assert shared_pool_floors(12, 8, 36, [40, 72, 36, 500]) == (1, 5, 11)
    assert plan_shared_pool(H200_SMS, FINE_SM_GRANULARITY, 0.5).shared_units(H200_SMS) == 66
    for total, fraction in ((H200_SMS, 0.0), (H200_SMS, 1.0), (20, 0.25), (H200_SMS, 0.99)):
        with pytest.raises(ValueError):
            plan_shared_pool(total, SM_GRANULARITY, fraction)


def test_shared_pool_cu_masks_meet_in_the_pool_and_stay_balanced_over_the_xcds():
    pairs = mask_pairs(MI300X_CUS, MI300X_XCDS, "shared_pool", 0.25)
    assert [s.label for s in pairs] == ["P82-D45", "P74-D53", "P63-D63", "P53-D74", "P45-D82"]
    everything = (1 << MI300X_CUS) - 1
    for split, (decode, prefill) in pairs.items():
        assert split.shared_units == 80 and bin(decode & prefill).count("1") == 80
        assert decode | prefill == everything
        assert bin(decode).count("1") == split.decode_units and bin(prefill).count("1") == split.prefill_units
        for mask in (decode, prefill, decode & prefill):
            assert len(set(cus_per_xcd(mask, MI300X_XCDS))) == 1
    with pytest.raises(ValueError, match="balanced"):
        shared_pool_masks(12, 80, MI300X_CUS, MI300X_XCDS)


@pytest.mark.parametrize("name", ["threads", "auto"])
def test_a_shared_pool_on_cpu_threads_is_refused_with_the_reason(name):
    with pytest.raises(ValueError, match="shared_pool.*oversubscribe the cores.*partition_layout: disjoint"):
        create_partition_backend(name, "cpu", layout="shared_pool")
    with pytest.raises(ValueError, match="partition_layout must be one of"):
        create_partition_backend(name, "cpu", layout="pooled")


# --- the backend interface ---


def test_splits_are_ordered_and_end_with_full_overlap():
    backend = FakeBackend(H200_SMS, [72, 40])
    assert [s.decode_units for s in backend.splits()] == [40, 72, H200_SMS]
    assert backend.splits()[-1] == Split.full(H200_SMS) and backend.splits()[-1].full_overlap
    assert backend.splits()[0].label == "P70-D30" and Split.full(H200_SMS).label == "P100-D100"


def test_round_split_picks_the_nearest_precreated_split_at_or_above(caplog):
    backend = FakeBackend(H200_SMS, [40, 72])
    with caplog.at_level(logging.INFO, logger="vllm_rapid.lanes.partition.base"):
        assert backend.round_split(33).decode_units == 40
        assert backend.round_split(33).decode_units == 40
        assert backend.round_split(40).decode_units == 40
        assert backend.round_split(50).decode_units == 72
        assert backend.round_split(100) == backend.full_split()
    rounding_logs = [r.getMessage() for r in caplog.records]
    assert len(rounding_logs) == 3  # 33 once, 50, 100; never the exact 40
    assert "33 decode units requested, using 40" in rounding_logs[0]


def test_lane_contexts_refuse_a_split_that_was_not_precreated():
    backend = FakeBackend(H200_SMS, [40])
    with pytest.raises(ValueError, match="not pre-created"):
        backend.lane_contexts(Split(48, 84, H200_SMS, False))


def test_threads_backend_splits_the_cores_between_the_lanes_teams():
    """Each split gives each lane's thread an OpenMP team of its units; the full split gives each all cores."""
    cores = len(os.sched_getaffinity(0))
    backend = ThreadsBackend()
    assert backend.total_units == cores and backend.splits()[-1] == Split.full(cores)
    assert not backend.full_split_runs_both_lanes
    if cores >= 2:
        assert all(s.decode_units + s.prefill_units == cores for s in backend.splits()[:-1])
    lanes = [Lane(name, thread_init=backend.thread_init(name)) for name in (LaneName.DECODE, LaneName.PREFILL)]
    try:
        for split in backend.splits():
            teams = [lane.submit(torch.get_num_threads, context=context).result()
                     for lane, context in zip(lanes, backend.lane_contexts(split))]
            assert teams == [split.decode_units, split.prefill_units], split
    finally:
        for lane in lanes:
            lane.close()
        backend.close()


def test_threads_backend_lowers_the_prefill_lanes_priority():
    backend = ThreadsBackend(cores=2)
    lanes = [Lane(name, thread_init=backend.thread_init(name)) for name in (LaneName.DECODE, LaneName.PREFILL)]
    try:
        nice = [lane.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())) for lane in lanes]
        assert nice[1] - nice[0] == CPU_PREFILL_NICENESS
    finally:
        for lane in lanes:
            lane.close()


def test_threads_backend_runs_the_decode_lane_inline_and_the_prefill_lane_on_its_thread():
    """The worker waits for every decode step, so on CPU the decode lane runs in the caller's thread (with that
    thread's OpenMP team); the prefill lane keeps its own lower-priority thread."""
    backend = ThreadsBackend(cores=2)
    decode, prefill = (backend.make_lane(lane) for lane in (LaneName.DECODE, LaneName.PREFILL))
    caller = threading.get_ident()
    try:
        future = decode.submit(lambda: (threading.get_ident(), current_lane()))
        assert future.done() and future.result() == (caller, "decode") and current_lane() is None
        assert future.event is not None and future.event.lane == "decode"
        failed = decode.submit(operator.truediv, 1, 0)
        assert isinstance(failed.exception(), ZeroDivisionError) and current_lane() is None
        where = prefill.run(lambda: (threading.get_ident(), current_lane(),
                                     os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        assert where[0] != caller and where[1:] == ("prefill", os.getpriority(os.PRIO_PROCESS, 0)
                                                    + CPU_PREFILL_NICENESS)
    finally:
        decode.close()
        prefill.close()
        backend.close()


def test_an_inline_lane_has_no_thread_to_init():
    with pytest.raises(ValueError, match="inline"):
        Lane("decode", inline=True, thread_init=lambda: None)


# --- selection ---


def test_auto_on_cpu_selects_threads():
    backend = create_partition_backend("auto", "cpu")
    assert backend.name == "threads"
    assert create_partition_backend("threads", "cpu").name == "threads"


@pytest.mark.parametrize("name", ["green_context", "cu_mask", "streams"])
def test_gpu_backend_requested_on_cpu_is_a_clear_error(name):
    with pytest.raises(ValueError, match=rf"partition_backend='{name}' cannot run on this device \(cpu\)"):
        create_partition_backend(name, "cpu")


def test_unknown_device_kind_is_an_error():
    with pytest.raises(ValueError, match="device_kind"):
        create_partition_backend("auto", "tpu")


def test_cu_mask_on_nvidia_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(ValueError, match="nvidia"):
        create_partition_backend("cu_mask", "cuda")


def test_start_up_failure_falls_back_to_streams_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None)
    tried = []

    def fake_create(name, **options):
        tried.append(name)
        if name == "green_context":
            raise ImportError("No module named 'cuda.bindings'")
        return FakeBackend(H200_SMS, [])

    monkeypatch.setattr(select, "_create", fake_create)
    with caplog.at_level(logging.WARNING, logger="vllm_rapid.lanes.partition.select"):
        backend = create_partition_backend("auto", "cuda")
    assert tried == ["green_context", "streams"] and backend.splits() == [Split.full(H200_SMS)]
    (record,) = caplog.records
    assert "'green_context' failed to start" in record.getMessage()
    assert "No module named 'cuda.bindings'" in record.getMessage() and "'streams'" in record.getMessage()


@pytest.mark.parametrize("vendor", ["cuda", "hip"])
def test_threads_backend_is_refused_on_a_gpu(monkeypatch, vendor):
    """On a GPU, CPU threads would leave both lanes on one stream (no overlap) and report CPU cores as units."""
    monkeypatch.setattr(torch.version, "cuda", "12.8" if vendor == "cuda" else None)
    monkeypatch.setattr(torch.version, "hip", "6.3" if vendor == "hip" else None)
    with pytest.raises(ValueError, match=r"partition_backend='threads' cannot run on this device"):
        create_partition_backend("threads", "cuda")


def test_an_explicitly_requested_backend_that_fails_fails_the_start_up(monkeypatch):
    """Only ``auto`` falls back: a backend the user asked for must be the one that runs."""
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None)

    def fake_create(name, **options):
        raise RuntimeError(f"{name} is unavailable here")

    monkeypatch.setattr(select, "_create", fake_create)
    with pytest.raises(RuntimeError, match="green_context is unavailable here"):
        create_partition_backend("green_context", "cuda")


def test_gpu_modules_import_without_their_bindings():
    import vllm_rapid.lanes.partition.cu_mask  # noqa: F401
    import vllm_rapid.lanes.partition.green_context  # noqa: F401
    import vllm_rapid.tools.sm_probe  # noqa: F401


def test_sm_probe_result_disjointness():
    from vllm_rapid.tools.sm_probe import SmProbeResult

    assert SmProbeResult({"decode": frozenset({0, 1}), "prefill": frozenset({2, 3})}).disjoint
    assert not SmProbeResult({"decode": frozenset({0, 1}), "prefill": frozenset({1, 2})}).disjoint


# --- backend construction against fake device APIs (green contexts: test_green_context_driver.py) ---


@pytest.fixture
def fake_torch_cuda(monkeypatch):
    """Enough of torch.cuda for a backend to build its streams on a CPU-only torch."""
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda handle, device=None: ("external", handle))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: ("stream", priority))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext(stream))


def test_split_flags_find_the_coscheduling_flag_under_either_enum_name():
    """cuda-bindings 13.x: CUdevSmResourceSplitByCount_flags; 12.x: CUdevSmResourceSplit_flags (the real 13.x binding
    runs in test_green_context_driver.py); neither: fine granularity is refused, not silently dropped."""
    flag = types.SimpleNamespace(CU_DEV_SM_RESOURCE_SPLIT_IGNORE_SM_COSCHEDULING=1)
    for enum_name in ("CUdevSmResourceSplitByCount_flags", "CUdevSmResourceSplit_flags"):
        driver = types.SimpleNamespace(**{enum_name: flag})
        assert split_flags(driver, fine_grained=True) == (1, FINE_SM_GRANULARITY)
        assert split_flags(driver, fine_grained=False) == (0, SM_GRANULARITY)
    with pytest.raises(GreenContextError, match="IGNORE_SM_COSCHEDULING"):
        split_flags(types.SimpleNamespace(), fine_grained=True)


class FakeHipStreams:
    """Records the mask words of each created stream instead of calling HIP."""

    via = "fake"

    def __init__(self):
        self.created, self.destroyed = [], False

    def create(self, words):
        self.created.append(words)
        return len(self.created)

    def destroy_all(self):
        self.destroyed = True


def test_cu_mask_backend_creates_balanced_complementary_streams(monkeypatch, fake_torch_cuda):
    from vllm_rapid.lanes.partition import cu_mask

    props = types.SimpleNamespace(multi_processor_count=MI300X_CUS, gcnArchName="gfx942:sramecc+:xnack-")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    hip = FakeHipStreams()
    monkeypatch.setattr(cu_mask, "_HipStreams", lambda: hip)
    backend = cu_mask.CuMaskBackend()
    assert [s.decode_units for s in backend.splits()] == [80, 120, 152, 192, 232, MI300X_CUS]
    for index, units in enumerate([80, 120, 152, 192, 232]):
        decode, prefill = complementary_masks(units, MI300X_CUS, MI300X_XCDS)
        assert hip.created[2 * index] == mask_words(decode, MI300X_CUS)
        assert hip.created[2 * index + 1] == mask_words(prefill, MI300X_CUS)
    with backend.lane_contexts(backend.splits()[0])[1]() as stream:
        assert stream == ("external", 2)
    backend.close()
    assert hip.destroyed


def test_cu_mask_backend_creates_shared_pool_streams(monkeypatch, fake_torch_cuda):
    from vllm_rapid.lanes.partition import cu_mask

    props = types.SimpleNamespace(multi_processor_count=MI300X_CUS, gcnArchName="gfx942:sramecc+:xnack-")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    hip = FakeHipStreams()
    monkeypatch.setattr(cu_mask, "_HipStreams", lambda: hip)
    backend = cu_mask.CuMaskBackend(layout="shared_pool")
    assert backend.layout == "shared_pool"
    pairs = mask_pairs(MI300X_CUS, MI300X_XCDS, "shared_pool")
    assert backend.splits() == [*pairs, Split.full(MI300X_CUS)]
    assert hip.created == [mask_words(m, MI300X_CUS) for pair in pairs.values() for m in pair]
    backend.close()


def test_cu_mask_without_hip_python_falls_back_to_ctypes(monkeypatch):
    from vllm_rapid.lanes.partition import cu_mask

    monkeypatch.setitem(sys.modules, "hip", None)  # import fails, as without hip-python
    assert cu_mask._working_hip_python() is None


# --- on a GPU (strict: a fallback to plain streams fails them) ---


@pytest.fixture
def green_backend():
    """Green contexts, asked for explicitly: a start-up failure raises instead of degrading to plain streams."""
    backend = create_partition_backend("green_context", "cuda")
    assert backend.name == "green_context" and len(backend.splits()) > 1
    yield backend
    torch.cuda.synchronize()
    backend.close()


@pytest.mark.gpu
@needs_gpu
def test_gpu_partitions_are_disjoint_and_close_to_their_size(green_backend):
    from vllm_rapid.tools.sm_probe import probe_lane_sms

    total = green_backend.total_units
    for split in green_backend.splits():
        decode, prefill = green_backend.lane_contexts(split)
        result = probe_lane_sms({"decode": decode, "prefill": prefill})
        used = {lane: len(sms) for lane, sms in result.sm_sets.items()}
        if split.full_overlap:
            # Both lanes on the whole device: their programs share SMs.
            assert not result.disjoint, (split, used)
            assert min(used.values()) >= 0.9 * total, (split, used)
        else:
            assert result.disjoint, (split, used)
            for lane, units in (("decode", split.decode_units), ("prefill", split.prefill_units)):
                assert 0.9 * units <= used[lane] <= units, (split, lane, used)


@pytest.mark.gpu
@needs_gpu
def test_gpu_shared_pool_lanes_meet_in_exactly_the_pool():
    """Alone, each lane reaches its floor plus the pool; the two reach the same SMs only in the pool."""
    from vllm_rapid.tools.sm_probe import probe_lane_sms

    backend = create_partition_backend("green_context", "cuda", layout="shared_pool")
    try:
        partitions = [s for s in backend.splits() if not s.full_overlap]
        assert backend.layout == "shared_pool" and partitions
        for split in partitions:
            decode, prefill = backend.lane_contexts(split)
            alone = {lane: probe_lane_sms({lane: ctx}).sm_sets[lane] for lane, ctx in (("decode", decode),
                                                                                        ("prefill", prefill))}
            used = {lane: len(sms) for lane, sms in alone.items()}
            for lane, units in (("decode", split.decode_units), ("prefill", split.prefill_units)):
                assert 0.9 * units <= used[lane] <= units, (split, lane, used)
            assert len(alone["decode"] & alone["prefill"]) <= split.shared_units, (split, used)
            assert len(alone["decode"] & alone["prefill"]) >= 0.9 * split.shared_units, (split, used)
            assert len(alone["decode"] | alone["prefill"]) >= 0.9 * split.total_units, (split, used)
    finally:
        torch.cuda.synchronize()
        backend.close()


@pytest.mark.gpu
@needs_gpu
def test_gpu_lanes_run_torch_work_on_every_split(green_backend):
    lanes = [Lane("decode"), Lane("prefill")]
    try:
        x = torch.randn(512, 512, device="cuda")
        expected = (x @ x).sum().item()
        torch.cuda.synchronize()  # x is made on the default stream; the lanes' non-blocking streams do not wait for it
        for split in green_backend.splits():
            for lane, context in zip(lanes, green_backend.lane_contexts(split)):
                out = lane.submit(lambda: (x @ x).sum().item(), context=context).result()
                assert out == pytest.approx(expected, rel=1e-3), split
    finally:
        for lane in lanes:
            lane.close()
