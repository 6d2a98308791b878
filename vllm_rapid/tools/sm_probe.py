"""Which SMs does each lane really run on? A Triton kernel whose programs record their ``%smid``.

Launched concurrently on the decode and prefill lanes' streams, it shows whether a split's partitions are
disjoint (green contexts) or shared (plain streams). NVIDIA only; Triton and torch are imported lazily so this
module imports anywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_rapid.lanes.lane import ContextFactory


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


def probe_lane_sms(
    lanes: Mapping[str, ContextFactory], programs: int | None = None, spin_us: float = 200.0
) -> SmProbeResult:
    """Launch the probe on every lane's stream (entering its context) concurrently; return the SMs per lane.

    ``programs`` defaults to four per SM of the device, enough to reach every SM a lane is allowed to use.
    """
    import torch

    if torch.version.hip:
        raise NotImplementedError("the SM probe reads the NVIDIA %smid register; no ROCm version yet")
    kernel = _smid_kernel()
    count = programs or 4 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    outputs: dict[str, Any] = {}
    for name, context in lanes.items():
        with context():
            outputs[name] = torch.full((count,), -1, dtype=torch.int32, device="cuda")
            kernel[(count,)](outputs[name], int(spin_us * 1e3))
    torch.cuda.synchronize()
    return SmProbeResult({name: frozenset(out.tolist()) for name, out in outputs.items()})
