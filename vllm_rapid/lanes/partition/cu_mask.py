"""AMD CU masks: compute-unit sets for the decode and prefill lanes (``hipExtStreamCreateWithCUMask``).

A mask is fixed when its stream is created, so mask pairs are pre-created at start-up: complementary ones
(``disjoint`` layout), or each lane's floor plus a shared pool at the top of the mask (``shared_pool``). On MI300-class
GPUs the CUs sit on several XCDs and mask bit ``i`` belongs to XCD ``i mod num_xcds``; a mask must take CUs evenly
from every XCD, and an XCD left with no CU can hang the queue. The mask arithmetic is pure and unit-tested; the HIP
call goes through hip-python (6.3+, whose binding of this call works) or ctypes on libamdhip64.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from typing import Any

from vllm_rapid.lanes.partition.base import (
    DEFAULT_SHARED_POOL_FRACTION,
    PartitionBackend,
    PartitionLayout,
    Split,
    plan_decode_units,
    plan_shared_pool,
)
from vllm_rapid.lanes.partition.streams import whole_device_stream_contexts

logger = logging.getLogger(__name__)

MI300X_CUS = 304
MI300X_XCDS = 8
_MULTI_XCD_ARCHS = ("gfx942", "gfx950")  # MI300X/MI300A/MI325X, MI350X/MI355X
_HIP_PYTHON_FIXED = (6, 3)


class CuMaskError(RuntimeError):
    """A HIP call creating or destroying a CU-masked stream failed."""


def infer_xcd_count(gcn_arch: str, total_cus: int) -> int:
    """XCDs the device's CUs are interleaved over: 8 on MI300X/MI325X/MI35x, 6 on MI300A, else 1.

    A partitioned MI300 (e.g. CPX mode, one XCD per device) reports fewer CUs and falls through to 1.
    """
    if gcn_arch.split(":")[0] in _MULTI_XCD_ARCHS:
        for xcds in (8, 6):
            if total_cus % xcds == 0 and total_cus > xcds:
                return xcds
    return 1


def balanced_mask(num_cus: int, num_xcds: int) -> int:
    """A mask of ``num_cus`` CUs, the same number on every XCD.

    Bits ``0 .. num_cus-1`` hold exactly ``num_cus / num_xcds`` bits of each residue class mod ``num_xcds``.
    """
    if num_cus <= 0 or num_cus % num_xcds:
        raise ValueError(f"{num_cus} CUs cannot be balanced over {num_xcds} XCDs; use a positive multiple")
    return (1 << num_cus) - 1


def cus_per_xcd(mask: int, num_xcds: int) -> list[int]:
    """How many CUs of ``mask`` sit on each XCD."""
    counts = [0] * num_xcds
    bit = 0
    while mask >> bit:
        counts[bit % num_xcds] += (mask >> bit) & 1
        bit += 1
    return counts


def complementary_masks(decode_cus: int, total_cus: int, num_xcds: int) -> tuple[int, int]:
    """(decode, prefill) masks: disjoint, together the whole device, each with at least one CU on every XCD."""
    decode = balanced_mask(decode_cus, num_xcds)
    prefill = ((1 << total_cus) - 1) & ~decode
    for lane, mask in (("decode", decode), ("prefill", prefill)):
        if 0 in cus_per_xcd(mask, num_xcds):
            raise ValueError(
                f"{lane} mask for {decode_cus}/{total_cus} CUs leaves an XCD without CUs (of {num_xcds})"
            )
    return decode, prefill


def shared_pool_masks(decode_floor: int, shared: int, total_cus: int, num_xcds: int) -> tuple[int, int]:
    """(decode, prefill) masks of the shared_pool layout: decode's floor is CUs ``0 .. decode_floor-1``, the pool the
    top ``shared`` CUs, prefill's floor what lies between; all three balanced over the XCDs."""
    for name, cus in (("decode floor", decode_floor), ("shared pool", shared),
                      ("prefill floor", total_cus - decode_floor - shared)):
        if cus <= 0 or cus % num_xcds:
            raise ValueError(f"{name} of {cus} CUs cannot be balanced over {num_xcds} XCDs; use a positive multiple")
    everything = (1 << total_cus) - 1
    pool = everything & ~((1 << (total_cus - shared)) - 1)
    decode = balanced_mask(decode_floor, num_xcds) | pool
    return decode, everything & ~balanced_mask(decode_floor, num_xcds)


def mask_words(mask: int, total_cus: int) -> list[int]:
    """The mask as the uint32 array the HIP call takes: word ``w`` holds CUs ``32w .. 32w+31``."""
    return [(mask >> (32 * w)) & 0xFFFFFFFF for w in range((total_cus + 31) // 32)]


def mask_pairs(
    total_cus: int, num_xcds: int, layout: PartitionLayout, shared_fraction: float = DEFAULT_SHARED_POOL_FRACTION,
    decode_cus: Sequence[int] | None = None,
) -> dict[Split, tuple[int, int]]:
    """Every split of ``layout`` and its (decode, prefill) masks, in units of the XCD count."""
    if layout == "disjoint":
        return {
            Split(cus, total_cus - cus, total_cus, False): complementary_masks(cus, total_cus, num_xcds)
            for cus in plan_decode_units(total_cus, num_xcds, decode_cus)
        }
    plan = plan_shared_pool(total_cus, num_xcds, shared_fraction, decode_cus)
    shared = plan.shared_units(total_cus)
    pairs = {}
    for k in plan.decode_groups:
        floor = k * plan.group_units
        split = Split(floor + shared, total_cus - floor, total_cus, False, shared)
        pairs[split] = shared_pool_masks(floor, shared, total_cus, num_xcds)
    return pairs


class CuMaskBackend(PartitionBackend):
    """CU-masked stream pairs for a list of decode CU counts (complementary, or floors plus a shared pool), plus
    plain streams for full overlap."""

    name = "cu_mask"

    def __init__(
        self, device_index: int = 0, decode_cus: Sequence[int] | None = None, num_xcds: int | None = None,
        layout: PartitionLayout = "disjoint", shared_pool_fraction: float = DEFAULT_SHARED_POOL_FRACTION,
    ) -> None:
        import torch

        props = torch.cuda.get_device_properties(device_index)
        super().__init__(props.multi_processor_count)
        xcds = num_xcds or infer_xcd_count(props.gcnArchName, self.total_units)
        torch.cuda.set_device(device_index)
        self._hip = _HipStreams()
        self.layout = layout
        try:
            # A multiple of the XCD count everywhere: balanced masks, no XCD without CUs.
            for split, (decode_mask, prefill_mask) in mask_pairs(
                self.total_units, xcds, layout, shared_pool_fraction, decode_cus
            ).items():
                self._register(
                    split,
                    self._masked_stream(torch, device_index, decode_mask),
                    self._masked_stream(torch, device_index, prefill_mask),
                )
            self._register(self.full_split(), *whole_device_stream_contexts(device_index))
        except BaseException:
            self.close()
            raise
        logger.info(
            "cu_mask: %d CUs over %d XCDs (via %s), %s layout, splits %s",
            self.total_units, xcds, self._hip.via, layout, [s.label for s in self.splits()],
        )

    def _masked_stream(self, torch: Any, device_index: int, mask: int) -> Any:
        handle = self._hip.create(mask_words(mask, self.total_units))
        return functools.partial(torch.cuda.stream, torch.cuda.ExternalStream(handle, device=device_index))

    def close(self) -> None:
        self._contexts.clear()
        self._hip.destroy_all()


class _HipStreams:
    """Creates and destroys CU-masked streams through hip-python when its binding works, else ctypes."""

    def __init__(self) -> None:
        self._hip = _working_hip_python()
        self._lib = None if self._hip is not None else ctypes.CDLL("libamdhip64.so")
        self.via = "hip-python" if self._hip is not None else "ctypes/libamdhip64"
        self._streams: list[Any] = []

    def create(self, words: list[int]) -> int:
        """A new stream restricted to the CUs of ``words``; returns its handle."""
        mask = (ctypes.c_uint32 * len(words))(*words)
        if self._hip is not None:
            err, stream = self._hip.hipExtStreamCreateWithCUMask(len(words), mask)
            if err != self._hip.hipError_t.hipSuccess:
                raise CuMaskError(f"hipExtStreamCreateWithCUMask failed: {err}")
            self._streams.append(stream)
            return int(stream)
        assert self._lib is not None
        stream = ctypes.c_void_p()
        rc = self._lib.hipExtStreamCreateWithCUMask(ctypes.byref(stream), ctypes.c_uint32(len(words)), mask)
        if rc != 0:
            raise CuMaskError(f"hipExtStreamCreateWithCUMask failed: hipError {rc}")
        self._streams.append(stream)
        return int(stream.value or 0)

    def destroy_all(self) -> None:
        for stream in reversed(self._streams):
            if self._hip is not None:
                self._hip.hipStreamDestroy(stream)
            elif self._lib is not None:
                self._lib.hipStreamDestroy(stream)
        self._streams.clear()


def _working_hip_python() -> Any | None:
    """hip-python's ``hip`` module if installed at a version whose CU-mask binding works, else None."""
    from importlib.metadata import version

    try:
        installed = tuple(int(p) for p in version("hip-python").split(".")[:2])
        from hip import hip
    except (ImportError, ValueError):  # not installed (PackageNotFoundError is an ImportError), odd version
        return None
    if installed < _HIP_PYTHON_FIXED:
        logger.info("hip-python %s has a broken hipExtStreamCreateWithCUMask binding; using ctypes", installed)
        return None
    return hip
