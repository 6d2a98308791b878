"""Which SMs does each lane really run on? A Triton kernel whose programs record their ``%smid``.

Launched concurrently on the decode and prefill lanes' streams, it shows whether a split's partitions are
disjoint (green contexts) or shared (plain streams). Captured in a CUDA graph on one lane's stream and replayed on
others, it shows whether a graph's Triton kernel nodes keep the partition they were captured on (a kernel node's
``ctx`` field "is ignored if func is set", and Triton launches CUfunctions: not known until it runs). NVIDIA only;
Triton and torch are imported lazily so this module imports anywhere.

``python -m vllm_rapid.tools.sm_probe --output sm_probe.json`` runs both on a fresh process's green contexts, in
each partition layout (disjoint, and floors plus a shared pool, whose lanes should meet in exactly the pool).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_rapid.lanes.lane import ContextFactory
from vllm_rapid.lanes.partition import PartitionBackend, Split, create_partition_backend
from vllm_rapid.lanes.partition.base import PARTITION_LAYOUTS, PartitionLayout
from vllm_rapid.tools.layer_stack import capture_graph, frozen_gc

NO_GPU_EXIT_CODE = 2
# 1024 threads a program: at most two programs fit on an SM at once, so a launch of four programs per SM of the
# device spreads over every SM its stream may use instead of piling onto a few.
PROBE_WARPS = 32


@dataclass(frozen=True)
class SmProbeResult:
    """The SM ids each lane's programs ran on."""

    sm_sets: dict[str, frozenset[int]]

    @property
    def disjoint(self) -> bool:
        """No SM was used by two lanes."""
        seen: set[int] = set()
        for sms in self.sm_sets.values():
            if seen & sms:
                return False
            seen |= sms
        return True


@functools.cache
def _smid_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def smid_kernel(out_ptr, spin_ns):
        # Spin so that programs stay resident and both lanes' kernels overlap; then record where this one ran.
        start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        now = start
        while now - start < spin_ns:
            now = tl.inline_asm_elementwise(
                "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
            )
        smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(out_ptr + tl.program_id(0), smid)

    return smid_kernel


def _programs(programs: int | None) -> int:
    import torch

    return programs or 4 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _launch(out: Any, spin_us: float) -> None:
    _smid_kernel()[(out.numel(),)](out, int(spin_us * 1e3), num_warps=PROBE_WARPS)


def probe_lane_sms(
    lanes: Mapping[str, ContextFactory], programs: int | None = None, spin_us: float = 200.0
) -> SmProbeResult:
    """Launch the probe on every lane's stream (entering its context) concurrently; return the SMs per lane.

    ``programs`` defaults to four per SM of the device, enough to reach every SM a lane is allowed to use.
    """
    import torch

    if torch.version.hip:
        raise NotImplementedError("the SM probe reads the NVIDIA %smid register; no ROCm version yet")
    count = _programs(programs)
    outputs: dict[str, Any] = {}
    for name, context in lanes.items():
        with context():
            outputs[name] = torch.full((count,), -1, dtype=torch.int32, device="cuda")
            _launch(outputs[name], spin_us)
    torch.cuda.synchronize()
    return SmProbeResult({name: frozenset(out.tolist()) for name, out in outputs.items()})


def probe_graph_replays(
    capture: ContextFactory, replays: Mapping[str, ContextFactory], programs: int | None = None, spin_us: float = 50.0
) -> dict[str, frozenset[int]]:
    """Capture the probe in a CUDA graph on ``capture``'s stream, then replay it alone on each of ``replays``'
    streams; returns the SMs each replay ran on."""
    import torch

    with capture():
        out = torch.full((_programs(programs),), -1, dtype=torch.int32, device="cuda")
    graph = capture_graph(lambda: _launch(out, spin_us), capture)
    try:
        sets = {}
        for name, context in replays.items():
            with context():
                out.fill_(-1)
                graph.replay()
                torch.cuda.current_stream().synchronize()
            sets[name] = frozenset(out.tolist())
    finally:
        torch.cuda.synchronize()
        graph.reset()
    return sets


def _plain_stream() -> ContextFactory:
    import torch

    return functools.partial(torch.cuda.stream, torch.cuda.Stream())


def _sorted(sms: frozenset[int]) -> list[int]:
    return sorted(sms)


def probe_backend(backend: PartitionBackend) -> dict[str, Any]:
    """Every split eagerly (both lanes at once, and each alone), then a graph of the smallest decode partition
    replayed on its own stream, the other partition's, and a plain stream (and one captured on a plain stream
    replayed on the partition)."""
    splits: list[dict[str, Any]] = []
    for split in backend.splits():
        decode, prefill = backend.lane_contexts(split)
        together = probe_lane_sms({"decode": decode, "prefill": prefill})
        alone = {name: probe_lane_sms({name: ctx}).sm_sets[name] for name, ctx in (("decode", decode),
                                                                                     ("prefill", prefill))}
        splits.append({
            "label": split.label, "decode_units": split.decode_units, "prefill_units": split.prefill_units,
            "shared_units": split.shared_units, "full_overlap": split.full_overlap, "disjoint": together.disjoint,
            "shared_alone": len(alone["decode"] & alone["prefill"]),
            "together": {name: _sorted(sms) for name, sms in together.sm_sets.items()},
            "alone": {name: _sorted(sms) for name, sms in alone.items()},
        })
    report: dict[str, Any] = {"backend": backend.name, "layout": backend.layout, "total_units": backend.total_units,
                              "splits": splits}
    partitions = [s for s in backend.splits() if not s.full_overlap]
    if partitions:
        report["graphs"] = _probe_graphs(backend, partitions[0])
    return report


def _probe_graphs(backend: PartitionBackend, split: Split) -> dict[str, Any]:
    decode, prefill = backend.lane_contexts(split)
    plain = _plain_stream()
    eager = probe_lane_sms({"decode": decode}).sm_sets["decode"]
    on_green = probe_graph_replays(decode, {"same_stream": decode, "other_partition": prefill, "plain_stream": plain})
    on_plain = probe_graph_replays(plain, {"plain_stream": plain, "green_partition": decode})
    return {
        "split": split.label,
        "captured_on_decode_partition": {
            "eager_sms": len(eager),
            "replays": {name: {"sms": len(sms), "inside_capture_partition": sms <= eager, "ids": _sorted(sms)}
                        for name, sms in on_green.items()},
        },
        "captured_on_plain_stream": {
            "replays": {name: {"sms": len(sms), "inside_decode_partition": sms <= eager, "ids": _sorted(sms)}
                        for name, sms in on_plain.items()},
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Probe the backend's splits and graph replays; write the JSON report. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m vllm_rapid.tools.sm_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="green_context", help="partition backend (as rapid.partition_backend)")
    parser.add_argument("--layouts", default=",".join(PARTITION_LAYOUTS),
                        help="comma-separated partition layouts to probe, each on a backend of its own")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--output", default="sm_probe.json")
    args = parser.parse_args(argv)
    layouts = [name for name in args.layouts.split(",") if name]
    if unknown := sorted(set(layouts) - set(PARTITION_LAYOUTS)):
        parser.error(f"unknown layout(s) {unknown}; choose from {list(PARTITION_LAYOUTS)}")
    import torch

    if not torch.cuda.is_available():
        print("sm_probe: no GPU is visible (torch.cuda.is_available() is False); nothing to probe", file=sys.stderr)
        return NO_GPU_EXIT_CODE
    torch.cuda.set_device(args.device)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(args.device), "layouts": {}}
    for layout in layouts:
        try:
            report["layouts"][layout] = _probe_layout(args.backend, args.device, layout)
        except Exception as exc:  # noqa: BLE001 (a driver refusing one layout still leaves the other's report)
            report["layouts"][layout] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{layout}: {type(exc).__name__}: {exc}")
        with open(args.output, "w") as out:
            json.dump(report, out, indent=1)
        _print_layout(layout, report["layouts"][layout])
    print(f"wrote {args.output}")
    return 0 if all("error" not in r for r in report["layouts"].values()) else 1


def _probe_layout(backend_name: str, device: int, layout: PartitionLayout) -> dict[str, Any]:
    import torch

    backend = create_partition_backend(backend_name, "cuda", device_index=device, layout=layout)
    try:
        with frozen_gc():
            return probe_backend(backend)
    finally:
        torch.cuda.synchronize()
        backend.close()


def _print_layout(layout: str, report: dict[str, Any]) -> None:
    for split in report.get("splits", []):
        sizes = {name: len(sms) for name, sms in split["together"].items()}
        print(f"{layout} {split['label']}: SMs used together {sizes}, disjoint {split['disjoint']}, "
              f"alone the lanes share {split['shared_alone']} SMs (planned {split['shared_units']})")
    graphs = report.get("graphs", {})
    for kind in ("captured_on_decode_partition", "captured_on_plain_stream"):
        for name, replay in graphs.get(kind, {}).get("replays", {}).items():
            inside = {k: v for k, v in replay.items() if k.startswith("inside")}
            print(f"{layout} graph {kind} of {graphs['split']}, replayed on {name}: {replay['sms']} SMs, {inside}")


if __name__ == "__main__":
    sys.exit(main())
