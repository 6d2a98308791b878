"""CUDA green contexts: SM partitions for the decode and prefill lanes.

``disjoint`` layout: each partition pair comes from ONE ``cuDevSmResourceSplitByCount`` call: decode gets the group,
prefill the remainder. Two separate creations would overlap (torch's ``GreenContext.create`` called twice does),
which defeats the point. ``shared_pool`` layout: one split into N equal groups and a remainder, the pool; for each
decode floor k, decode's context is k groups plus the remainder and prefill's the other N-k groups plus the same
remainder (``cuDevResourceGenerateDesc`` over several resources of one split, as the driver requires). Decode's
streams run at the device's greatest priority, prefill's at the least. Contexts are pre-created at start-up (about
3 ms each) and torch runs on them through ``torch.cuda.ExternalStream``. ``cuda.bindings`` is imported lazily so the
package imports without it.

Some of the recipe's calls (``cuCtxGetStreamPriorityRange``) need a current context, and in a fresh process there is
none: ``torch.cuda.init()`` and ``torch.cuda.set_device()`` do not make one current (pytorch#155668), so the call
fails with CUDA_ERROR_INVALID_CONTEXT. The backend retains the device's primary context (the one torch's runtime
uses), makes it current on the constructing thread, and releases it when it closes.
"""

from __future__ import annotations

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
    shared_pool_floors,
)
from vllm_rapid.lanes.partition.streams import whole_device_stream_contexts

logger = logging.getLogger(__name__)

# SM granularity of a split: 8 by default (SMs co-scheduled per GPC slice), 2 when the driver is told to ignore
# co-scheduling (then thread-block clusters lose their placement guarantee, so it is opt-in).
SM_GRANULARITY = 8
FINE_SM_GRANULARITY = 2
_IGNORE_COSCHEDULING = "CU_DEV_SM_RESOURCE_SPLIT_IGNORE_SM_COSCHEDULING"
# The enum holding that flag: cuda-bindings 13.x names it after the call, 12.x did not.
SPLIT_FLAG_ENUMS = ("CUdevSmResourceSplitByCount_flags", "CUdevSmResourceSplit_flags")


class GreenContextError(RuntimeError):
    """A CUDA driver call of the green-context recipe failed."""


class GreenContextBackend(PartitionBackend):
    """Green-context pairs for a list of decode SM counts (disjoint, or floors plus a shared pool), plus plain
    streams for full overlap."""

    name = "green_context"

    def __init__(
        self, device_index: int = 0, decode_sms: Sequence[int] | None = None, fine_grained: bool = False,
        layout: PartitionLayout = "disjoint", shared_pool_fraction: float = DEFAULT_SHARED_POOL_FRACTION,
    ) -> None:
        import torch
        from cuda.bindings import driver

        self._driver = driver
        self._owned: list[tuple[Any, Any]] = []  # (green context, stream) pairs, destroyed by close()
        self._primary_device: Any = None  # the device whose primary context this backend holds
        torch.cuda.init()
        torch.cuda.set_device(device_index)
        _check(driver, driver.cuInit(0), "cuInit")
        device = _check(driver, driver.cuDeviceGet(device_index), "cuDeviceGet")
        primary = _check(driver, driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
        self._primary_device = device
        try:
            _check(driver, driver.cuCtxSetCurrent(primary), "cuCtxSetCurrent")
            whole = _check(
                driver,
                driver.cuDeviceGetDevResource(device, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
                "cuDeviceGetDevResource",
            )
            super().__init__(int(whole.sm.smCount))
            flags, granularity = split_flags(driver, fine_grained)
            self._priorities = _check(driver, driver.cuCtxGetStreamPriorityRange(), "cuCtxGetStreamPriorityRange")
            self.layout = layout
            if layout == "shared_pool":
                self._create_shared_pool(torch, device, device_index, whole, flags, granularity, shared_pool_fraction,
                                         decode_sms)
            else:
                self._create_disjoint(torch, device, device_index, whole, flags, granularity, decode_sms)
            self._register(self.full_split(), *whole_device_stream_contexts(device_index))
        except BaseException:
            self._release()
            raise
        logger.info(
            "green_context: %d SMs, granularity %d, %s layout, splits %s",
            self.total_units, granularity, layout, [s.label for s in self.splits()],
        )

    def _create_disjoint(self, torch: Any, device: Any, device_index: int, whole: Any, flags: int, granularity: int,
                         decode_sms: Sequence[int] | None) -> None:
        """One split per decode size: decode on the group, prefill on the remainder."""
        driver = self._driver
        for sms in plan_decode_units(self.total_units, granularity, decode_sms):
            groups, _, remainder = _check(
                driver, driver.cuDevSmResourceSplitByCount(1, whole, flags, sms), "cuDevSmResourceSplitByCount"
            )
            split = Split(int(groups[0].sm.smCount), int(remainder.sm.smCount), self.total_units, False)
            if split.decode_units != sms:
                logger.info("green_context: driver gave %d SMs for a request of %d", split.decode_units, sms)
            self._register_pair(torch, device, device_index, split, [groups[0]], [remainder])

    def _create_shared_pool(self, torch: Any, device: Any, device_index: int, whole: Any, flags: int,
                            granularity: int, shared_fraction: float, decode_sms: Sequence[int] | None) -> None:
        """One split into equal groups; every pair shares its remainder."""
        driver = self._driver
        plan = plan_shared_pool(self.total_units, granularity, shared_fraction, decode_sms)
        groups, made, remainder = _check(
            driver, driver.cuDevSmResourceSplitByCount(plan.num_groups, whole, flags, plan.group_units),
            "cuDevSmResourceSplitByCount",
        )
        groups = list(groups)[: int(made)]  # the driver may make fewer (or larger) groups than asked
        if len(groups) < 2 or int(remainder.sm.smCount) == 0:
            raise GreenContextError(
                f"shared_pool: the driver split {self.total_units} SMs into {len(groups)} group(s) and a remainder "
                f"of {int(remainder.sm.smCount)} SMs; it needs two groups and a non-empty remainder "
                "(choose another shared_pool_fraction or partition_layout: disjoint)"
            )
        shared = int(remainder.sm.smCount)
        sizes = [int(g.sm.smCount) for g in groups]
        for k in shared_pool_floors(len(groups), sizes[0], shared, decode_sms):
            decode, prefill = groups[:k] + [remainder], groups[k:] + [remainder]
            split = Split(sum(sizes[:k]) + shared, sum(sizes[k:]) + shared, self.total_units, False, shared)
            try:
                self._register_pair(torch, device, device_index, split, decode, prefill)
            except GreenContextError as exc:
                raise GreenContextError(
                    f"{exc} (shared_pool: a context over several groups of one split plus its remainder; a driver "
                    "that refuses that cannot run this layout, use partition_layout: disjoint)"
                ) from exc

    def _register_pair(self, torch: Any, device: Any, device_index: int, split: Split, decode: list[Any],
                       prefill: list[Any]) -> None:
        least, greatest = self._priorities
        self._register(
            split,
            self._green_stream(torch, device, device_index, decode, greatest),
            self._green_stream(torch, device, device_index, prefill, least),
        )

    def _green_stream(self, torch: Any, device: Any, device_index: int, resources: list[Any], priority: int) -> Any:
        """Green context over ``resources`` and a non-blocking stream on it, as a torch stream context factory."""
        driver = self._driver
        desc = _check(
            driver, driver.cuDevResourceGenerateDesc(resources, len(resources)), "cuDevResourceGenerateDesc"
        )
        green = _check(
            driver,
            driver.cuGreenCtxCreate(desc, device, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
            "cuGreenCtxCreate",
        )
        try:
            stream = _check(
                driver,
                driver.cuGreenCtxStreamCreate(green, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, priority),
                "cuGreenCtxStreamCreate",
            )
        except BaseException:
            driver.cuGreenCtxDestroy(green)
            raise
        self._owned.append((green, stream))
        return functools.partial(torch.cuda.stream, torch.cuda.ExternalStream(int(stream), device=device_index))

    def close(self) -> None:
        """Release the streams and contexts; CUDA graphs captured on them must be destroyed first."""
        self._contexts.clear()
        self._release()

    def _release(self) -> None:
        """Each stream before its green context, the primary context last; a failure is logged, the rest still
        released."""
        driver = self._driver
        for green, stream in reversed(self._owned):
            _log_failure(driver, driver.cuStreamDestroy(stream), "cuStreamDestroy")
            _log_failure(driver, driver.cuGreenCtxDestroy(green), "cuGreenCtxDestroy")
        self._owned.clear()
        if self._primary_device is not None:
            _log_failure(driver, driver.cuDevicePrimaryCtxRelease(self._primary_device), "cuDevicePrimaryCtxRelease")
            self._primary_device = None


def split_flags(driver: Any, fine_grained: bool) -> tuple[int, int]:
    """(flags, SM granularity) for ``cuDevSmResourceSplitByCount``; fine granularity needs the co-scheduling flag,
    under whichever enum name this cuda-bindings uses."""
    if not fine_grained:
        return 0, SM_GRANULARITY
    for enum_name in SPLIT_FLAG_ENUMS:
        flag = getattr(getattr(driver, enum_name, None), _IGNORE_COSCHEDULING, None)
        if flag is not None:
            return int(flag), FINE_SM_GRANULARITY
    raise GreenContextError(f"fine_grained: cuda.bindings has no {_IGNORE_COSCHEDULING} in {list(SPLIT_FLAG_ENUMS)}")


def _error_name(driver: Any, err: Any) -> str:
    name = driver.cuGetErrorName(err)[1]
    return name.decode() if isinstance(name, bytes) else str(name)


def _check(driver: Any, result: tuple, call: str) -> Any:
    """Unwrap a ``cuda.bindings`` result tuple ``(CUresult, *values)``; raise with the driver's error name."""
    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        raise GreenContextError(f"{call} failed: {_error_name(driver, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _log_failure(driver: Any, result: tuple, call: str) -> None:
    if result[0] != driver.CUresult.CUDA_SUCCESS:
        logger.warning("green_context: %s failed while closing: %s", call, _error_name(driver, result[0]))
