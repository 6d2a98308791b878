"""CUDA green contexts: disjoint SM partitions for the decode and prefill lanes.

Each partition pair comes from ONE ``cuDevSmResourceSplitByCount`` call: decode gets the group, prefill the
remainder. Two separate creations would overlap (torch's ``GreenContext.create`` called twice does), which defeats
the point. Pairs are pre-created at start-up (about 3 ms each) and torch runs on them through
``torch.cuda.ExternalStream``. ``cuda.bindings`` is imported lazily so the package imports without it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from vllm_rapid.lanes.partition.base import PartitionBackend, Split, plan_decode_units
from vllm_rapid.lanes.partition.streams import whole_device_stream_contexts

logger = logging.getLogger(__name__)

# SM granularity of a split: 8 by default (SMs co-scheduled per GPC slice), 2 when the driver is told to ignore
# co-scheduling (then thread-block clusters lose their placement guarantee, so it is opt-in).
SM_GRANULARITY = 8
FINE_SM_GRANULARITY = 2
_IGNORE_COSCHEDULING = "CU_DEV_SM_RESOURCE_SPLIT_IGNORE_SM_COSCHEDULING"


class GreenContextError(RuntimeError):
    """A CUDA driver call of the green-context recipe failed."""


class GreenContextBackend(PartitionBackend):
    """Complementary green-context pairs for a list of decode SM counts, plus plain streams for full overlap."""

    name = "green_context"

    def __init__(
        self, device_index: int = 0, decode_sms: Sequence[int] | None = None, fine_grained: bool = False
    ) -> None:
        import torch
        from cuda.bindings import driver

        self._driver = driver
        self._owned: list[tuple[Any, Any]] = []  # (green context, stream) pairs, destroyed by close()
        torch.cuda.init()
        torch.cuda.set_device(device_index)
        _check(driver, driver.cuInit(0), "cuInit")
        device = _check(driver, driver.cuDeviceGet(device_index), "cuDeviceGet")
        whole = _check(
            driver,
            driver.cuDeviceGetDevResource(device, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
            "cuDeviceGetDevResource",
        )
        super().__init__(int(whole.sm.smCount))
        ignore = getattr(driver.CUdevSmResourceSplit_flags, _IGNORE_COSCHEDULING, None) if fine_grained else None
        flags = 0 if ignore is None else int(ignore)
        granularity = SM_GRANULARITY if ignore is None else FINE_SM_GRANULARITY
        least, greatest = _check(driver, driver.cuCtxGetStreamPriorityRange(), "cuCtxGetStreamPriorityRange")
        try:
            for sms in plan_decode_units(self.total_units, granularity, decode_sms):
                groups, _, remainder = _check(
                    driver, driver.cuDevSmResourceSplitByCount(1, whole, flags, sms), "cuDevSmResourceSplitByCount"
                )
                split = Split(int(groups[0].sm.smCount), int(remainder.sm.smCount), self.total_units, False)
                if split.decode_units != sms:
                    logger.info("green_context: driver gave %d SMs for a request of %d", split.decode_units, sms)
                decode = self._green_stream(torch, device, device_index, groups[0], greatest)
                prefill = self._green_stream(torch, device, device_index, remainder, least)
                self._register(split, decode, prefill)
            self._register(self.full_split(), *whole_device_stream_contexts(device_index))
        except BaseException:
            self.close()
            raise
        logger.info(
            "green_context: %d SMs, granularity %d, splits %s",
            self.total_units, granularity, [s.label for s in self.splits()],
        )

    def _green_stream(self, torch: Any, device: Any, device_index: int, resource: Any, priority: int) -> Any:
        """Green context over ``resource`` and a non-blocking stream on it, as a torch stream context factory."""
        driver = self._driver
        desc = _check(driver, driver.cuDevResourceGenerateDesc([resource], 1), "cuDevResourceGenerateDesc")
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
        self._contexts.clear()
        for green, stream in reversed(self._owned):
            self._driver.cuStreamDestroy(stream)
            self._driver.cuGreenCtxDestroy(green)
        self._owned.clear()


def _check(driver: Any, result: tuple, call: str) -> Any:
    """Unwrap a ``cuda.bindings`` result tuple ``(CUresult, *values)``; raise with the driver's error name."""
    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        name = driver.cuGetErrorName(err)[1]
        raise GreenContextError(f"{call} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
