"""Partition backends: how the decode and prefill lanes share the device's compute units.

One interface (:class:`PartitionBackend`), one implementation per mechanism (CUDA green contexts, AMD CU masks,
plain streams, CPU threads), picked by :func:`create_partition_backend`.
"""

from __future__ import annotations

from vllm_rapid.lanes.partition.base import PartitionBackend, Split
from vllm_rapid.lanes.partition.select import create_partition_backend

__all__ = ["PartitionBackend", "Split", "create_partition_backend"]
