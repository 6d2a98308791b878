"""Pick the partition backend for this device, honouring RapidConfig.partition_backend.

An explicitly requested backend must be the one that runs: one that cannot exist on this kind of device is a
configuration error, and one that fails at start-up fails the start-up. Only ``auto`` degrades: when the device's
preferred backend fails (missing bindings, old driver, unsupported GPU) it falls back to plain streams, with one
warning that says what was tried and why it failed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from vllm_rapid.lanes.partition.base import (
    DEFAULT_SHARED_POOL_FRACTION,
    PARTITION_LAYOUTS,
    PartitionBackend,
    PartitionLayout,
)

logger = logging.getLogger(__name__)

DEVICE_KINDS = ("cuda", "cpu")
# The backends each vendor can run, the preferred one first.
_BACKENDS_BY_VENDOR = {
    "nvidia": ("green_context", "streams"),
    "amd": ("cu_mask", "streams"),
    "cpu": ("threads",),
}
# The backends whose partitions can share units (threads would oversubscribe cores; streams have no partitions).
_SHARED_POOL_BACKENDS = ("green_context", "cu_mask")


def gpu_vendor(device_kind: str) -> str:
    """'nvidia', 'amd' or 'cpu'. ROCm builds of torch also call their device 'cuda'; torch.version tells them apart."""
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"device_kind must be one of {list(DEVICE_KINDS)}, got {device_kind!r}")
    if device_kind == "cpu":
        return "cpu"
    import torch

    if torch.version.hip:
        return "amd"
    if torch.version.cuda:
        return "nvidia"
    raise ValueError("device_kind is 'cuda' but this torch build has neither CUDA nor ROCm support")


def create_partition_backend(
    name: str,
    device_kind: str,
    *,
    device_index: int = 0,
    decode_units: Sequence[int] | None = None,
    cpu_cores: int | None = None,
    layout: PartitionLayout = "disjoint",
    shared_pool_fraction: float = DEFAULT_SHARED_POOL_FRACTION,
) -> PartitionBackend:
    """Create the backend ``name`` (a RapidConfig.partition_backend value) for ``device_kind`` ('cuda' or 'cpu').

    ``decode_units`` lists the decode partition sizes to pre-create (SMs or CUs; default: fractions of the device).
    ``cpu_cores``: the cores the CPU lanes share (default: every core the process may run on). ``layout`` and
    ``shared_pool_fraction``: RapidConfig.partition_layout and .shared_pool_fraction; a shared pool needs SM or CU
    partitions, so it is refused where the backend that would run has none.
    """
    vendor = gpu_vendor(device_kind)
    allowed = _BACKENDS_BY_VENDOR[vendor]
    if layout not in PARTITION_LAYOUTS:
        raise ValueError(f"rapid.partition_layout must be one of {list(PARTITION_LAYOUTS)}, got {layout!r}")
    create = functools.partial(_create, device_index=device_index, decode_units=decode_units, cpu_cores=cpu_cores,
                               layout=layout, shared_pool_fraction=shared_pool_fraction)
    if name != "auto":
        if name not in allowed:
            raise ValueError(
                f"rapid.partition_backend={name!r} cannot run on this device ({vendor}); "
                f"choose one of {['auto', *allowed]}"
            )
        return create(name)
    preferred, *fallbacks = allowed
    try:
        return create(preferred)
    except Exception as exc:  # auto: a start-up failure degrades; the warning keeps the cause
        if not fallbacks:
            raise
        logger.warning(
            "partition backend %r failed to start (%s: %s); falling back to %r (no spatial partitioning)",
            preferred, type(exc).__name__, exc, fallbacks[0],
        )
        return create(fallbacks[0], layout="disjoint")


def check_layout(name: str, layout: PartitionLayout) -> None:
    """Refuse a layout the backend ``name`` cannot lay its partitions out in (CPU start-up checks it before any
    process starts)."""
    if layout == "shared_pool" and name not in _SHARED_POOL_BACKENDS:
        raise ValueError(
            f"rapid.partition_layout='shared_pool' needs SM or CU partitions ({' or '.join(_SHARED_POOL_BACKENDS)}); "
            f"the {name!r} backend has none to share (CPU threads would oversubscribe the cores, plain streams "
            "already share the whole GPU): use partition_layout: disjoint"
        )


def _create(name: str, *, device_index: int, decode_units: Sequence[int] | None, cpu_cores: int | None,
            layout: PartitionLayout, shared_pool_fraction: float) -> PartitionBackend:
    check_layout(name, layout)
    if name == "green_context":
        from vllm_rapid.lanes.partition.green_context import GreenContextBackend

        return GreenContextBackend(device_index, decode_units, layout=layout, shared_pool_fraction=shared_pool_fraction)
    if name == "cu_mask":
        from vllm_rapid.lanes.partition.cu_mask import CuMaskBackend

        return CuMaskBackend(device_index, decode_units, layout=layout, shared_pool_fraction=shared_pool_fraction)
    if name == "streams":
        from vllm_rapid.lanes.partition.streams import StreamsBackend

        return StreamsBackend(device_index)
    from vllm_rapid.lanes.partition.threads import ThreadsBackend

    return ThreadsBackend(cores=cpu_cores, decode_units=decode_units)
