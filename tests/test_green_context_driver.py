"""GreenContextBackend against a fake CUDA driver (``fake_libcuda.c``) loaded by the real ``cuda-bindings``, each case
in a fresh process as in a server's worker: the call sequence and the current context it needs, split rounding,
stream priorities, teardown order, reference counts and failure paths, through the binding's own names and result
tuples. Only torch.cuda's Python-level stream wrappers are faked (CPU torch has no CUDA)."""

from __future__ import annotations

import ctypes
import textwrap
from pathlib import Path

import pytest
from fake_cuda import H200_SMS, build_driver, run_with_driver

SETUP = """
from fake_cuda import driver_state, emit, fake_torch_cuda
torch_streams = fake_torch_cuda()
from vllm_rapid.lanes.partition.green_context import GreenContextBackend, GreenContextError
"""


def run(code: str, driver: Path | None, **env: str) -> dict:
    return run_with_driver(SETUP + textwrap.dedent(code), driver, env)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    return build_driver(tmp_path_factory.mktemp("fake-cuda"))


def _real_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def assert_released(state: dict) -> None:
    """Nothing left behind, nothing destroyed out of order, every primary-context reference returned."""
    assert state["violations"] == []
    assert state["live_streams"] == state["live_green_contexts"] == state["primary_refs"] == 0


@pytest.mark.skipif(_real_driver_present(), reason="a real CUDA driver is installed here")
def test_without_a_driver_the_binding_raises_and_only_auto_falls_back():
    """The binding imports without a driver and fails at the first call; an explicit request must fail with it."""
    result = run("""
        from vllm_rapid.lanes.partition import create_partition_backend
        try:
            GreenContextBackend()
        except RuntimeError as exc:
            direct = str(exc)
        try:
            create_partition_backend("green_context", "cuda")
        except RuntimeError as exc:
            explicit = str(exc)
        emit(direct=direct, explicit=explicit, auto=create_partition_backend("auto", "cuda").name)
    """, None)
    assert result["direct"] == result["explicit"] == "Failed to dlopen libcuda.so.1"
    assert result["auto"] == "streams"


def test_a_fresh_process_retains_the_primary_context_and_splits_each_pair_once(driver):
    """No context is current in a fresh process: the backend makes the primary one current before the calls that
    need it, takes each pair from one split (group for decode, remainder for prefill), and on close destroys every
    stream before its green context and returns the primary context last."""
    result = run("""
        backend = GreenContextBackend(decode_sms=[33, 66])
        splits = [(s.decode_units, s.prefill_units, s.full_overlap) for s in backend.splits()]
        built = driver_state()
        backend.close()
        emit(splits=splits, built=built, closed=driver_state(), torch_streams=torch_streams,
             after_close=len(backend.splits()))
    """, driver)
    assert result["splits"] == [[40, 92, False], [72, 60, False], [H200_SMS, H200_SMS, True]]
    built = result["built"]
    assert built["calls"][:6] == [
        "cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent", "cuDeviceGetDevResource",
        "cuCtxGetStreamPriorityRange",
    ]
    assert built["current_is_primary"] and built["primary_retains"] == 1
    assert built["events"] == [
        "split 132 SMs flags=0 min=40: 1 x 40 + 92",
        "green 1: 40 SMs 0-39", "stream 1 on green 1: priority -5",  # decode at the device's greatest priority
        "green 2: 92 SMs 40-131", "stream 2 on green 2: priority 0",
        "split 132 SMs flags=0 min=72: 1 x 72 + 60",
        "green 3: 72 SMs 0-71", "stream 3 on green 3: priority -5",
        "green 4: 60 SMs 72-131", "stream 4 on green 4: priority 0",
    ]
    # Our retain plus one held by each green context.
    assert built["primary_refs"] == 5 and built["live_streams"] == 4 and built["violations"] == []
    # torch wraps exactly the driver's stream handles; the full split gets two plain streams, decode's first.
    external = [s for s in result["torch_streams"] if s[0] == "external"]
    assert [handle for _, handle, _ in external] == built["stream_handles"]
    assert [s for s in result["torch_streams"] if s[0] == "stream"] == [["stream", 0, -1], ["stream", 0, 0]]
    closed = result["closed"]
    assert closed["events"][len(built["events"]):] == [
        "destroyed stream 4", "destroyed green 4", "destroyed stream 3", "destroyed green 3",
        "destroyed stream 2", "destroyed green 2", "destroyed stream 1", "destroyed green 1",
    ]
    assert closed["calls"][-1] == "cuDevicePrimaryCtxRelease"
    assert_released(closed)
    assert result["after_close"] == 0


def test_fine_grained_splits_use_the_coscheduling_flag_of_cuda_bindings_13(driver):
    result = run("""
        from cuda.bindings import driver
        backend = GreenContextBackend(decode_sms=[33], fine_grained=True)
        units = [s.decode_units for s in backend.splits()]
        backend.close()
        try:
            driver.cuCtxSynchronize()  # a call the fake lacks fails loudly, as on a driver too old for it
        except RuntimeError as exc:
            missing = str(exc)
        emit(units=units, state=driver_state(), missing=missing)
    """, driver)
    assert result["units"] == [34, H200_SMS]
    assert result["missing"] == 'Function "cuCtxSynchronize" not found'
    assert "split 132 SMs flags=1 min=34: 1 x 34 + 98" in result["state"]["events"]
    assert_released(result["state"])


def test_the_shared_pool_layout_is_one_split_whose_remainder_every_context_shares(driver):
    """shared_pool: ONE split into equal groups; each decode context is its floor of groups plus the remainder, each
    prefill context the other groups plus the same remainder, so every pair overlaps in exactly the remainder; decode
    at the greatest priority; every context and stream released."""
    result = run("""
        backend = GreenContextBackend(layout="shared_pool")
        splits = [(s.decode_units, s.prefill_units, s.shared_units, s.full_overlap, s.label) for s in backend.splits()]
        built = driver_state()
        backend.close()
        emit(splits=splits, built=built, closed=driver_state(), layout=backend.layout)
    """, driver)
    assert result["layout"] == "shared_pool"
    # 132 SMs, a 25% pool: 12 groups of 8 (96 SMs) and a remainder of 36; decode floors of 3, 4, 6, 8 and 9 groups.
    assert result["splits"] == [
        [60, 108, 36, False, "P82-D45"], [68, 100, 36, False, "P76-D52"], [84, 84, 36, False, "P64-D64"],
        [100, 68, 36, False, "P52-D76"], [108, 60, 36, False, "P45-D82"], [H200_SMS, H200_SMS, H200_SMS, True,
                                                                              "P100-D100"],
    ]
    events = result["built"]["events"]
    assert [e for e in events if e.startswith("split")] == ["split 132 SMs flags=0 min=8: 12 x 8 + 36"]
    assert [e for e in events if e.startswith("green")][:4] == [
        "green 1: 60 SMs 0-23,96-131", "green 2: 108 SMs 24-131", "green 3: 68 SMs 0-31,96-131",
        "green 4: 100 SMs 32-131",
    ]
    assert [e.split(": ")[1] for e in events if e.startswith("stream")] == ["priority -5", "priority 0"] * 5
    assert result["built"]["violations"] == []
    assert_released(result["closed"])


def test_a_driver_refusing_a_group_plus_its_remainder_fails_the_shared_pool_loudly(driver):
    """The driver documents that several SM resources in one descriptor must have the same co-scheduled alignment:
    where the remainder's differs, the layout cannot exist, and the error says so instead of falling back."""
    result = run("""
        try:
            GreenContextBackend(layout="shared_pool")
        except GreenContextError as exc:
            emit(error=str(exc), state=driver_state())
    """, driver, FAKE_CUDA_REMAINDER_ALIGNMENT="4")
    assert result["error"].startswith("cuDevResourceGenerateDesc failed: CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION")
    assert "partition_layout: disjoint" in result["error"]
    assert_released(result["state"])


@pytest.mark.parametrize(
    ("fail", "message", "made"),
    [
        ("cuGreenCtxCreate:3", "cuGreenCtxCreate failed: CUDA_ERROR_OUT_OF_MEMORY", 2),
        ("cuGreenCtxStreamCreate:2", "cuGreenCtxStreamCreate failed: CUDA_ERROR_OUT_OF_MEMORY", 1),
        ("cuCtxGetStreamPriorityRange:1", "cuCtxGetStreamPriorityRange failed: CUDA_ERROR_OUT_OF_MEMORY", 0),
    ],
)
def test_a_failing_call_is_named_and_everything_made_is_released(driver, fail, message, made):
    result = run("""
        try:
            GreenContextBackend(decode_sms=[40, 72])
        except GreenContextError as exc:
            emit(error=str(exc), state=driver_state())
    """, driver, FAKE_CUDA_FAIL=fail)
    assert result["error"] == message
    assert sum(e.startswith("stream ") for e in result["state"]["events"]) == made
    assert_released(result["state"])


def test_a_device_too_small_to_split_fails_and_returns_the_primary_context(driver):
    result = run("""
        try:
            GreenContextBackend()
        except ValueError as exc:
            emit(error=str(exc), state=driver_state())
    """, driver, FAKE_CUDA_SMS="12")
    assert "cannot be split" in result["error"]
    assert result["state"]["primary_retains"] == 1
    assert_released(result["state"])


def test_an_explicitly_requested_backend_fails_loudly_in_select_and_in_the_profiler(driver, tmp_path):
    """``partition_backend=green_context`` and ``vllm-rapid profile --backend green_context`` raise the driver's
    error; only ``auto`` falls back to plain streams (and says so)."""
    output = tmp_path / "profile.yaml"
    result = run(f"""
        import logging
        from vllm_rapid.lanes.partition import create_partition_backend
        from vllm_rapid.tools.profile import main
        try:
            create_partition_backend("green_context", "cuda")
        except GreenContextError as exc:
            explicit = str(exc)
        try:
            main(["profile", "--backend", "green_context", "--output", {str(output)!r}])
        except GreenContextError as exc:
            profiled = str(exc)
        logging.basicConfig()
        emit(explicit=explicit, profiled=profiled, auto=create_partition_backend("auto", "cuda").name,
             state=driver_state())
    """, driver, FAKE_CUDA_FAIL="cuGreenCtxCreate")
    assert result["explicit"] == result["profiled"] == "cuGreenCtxCreate failed: CUDA_ERROR_OUT_OF_MEMORY"
    assert result["auto"] == "streams" and not output.exists()
    assert_released(result["state"])
