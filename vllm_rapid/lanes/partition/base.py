"""The partition interface shared by every backend, and the unit arithmetic they have in common.

A backend pre-creates every split it can offer at start-up (creating a green context or a CU-masked stream takes
milliseconds, and CUDA graphs stay bound to the partition they were captured on), so the ARM only ever chooses
among :meth:`PartitionBackend.splits`.

Two layouts of the partitions (``rapid.partition_layout``), beside the full split every backend has (both lanes on
the whole device):

* ``disjoint``: decode gets some units, prefill the rest;
* ``shared_pool``: the units are split once into equal groups plus a remainder, the shared pool; decode's partition
  is its groups plus the pool, prefill's the other groups plus the pool. Each lane keeps a reserved floor, and the
  pool goes to whichever lane has work there (decode first, at the higher stream priority): the form the paper's
  light-load over-allocation takes on SM and CU partitions.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import get_args

from vllm_rapid.config import DEFAULT_SHARED_POOL_FRACTION
from vllm_rapid.config import PartitionLayoutName as PartitionLayout
from vllm_rapid.lanes.lane import ContextFactory, Lane, LaneName

logger = logging.getLogger(__name__)

# Decode shares offered by default: enough choice for the ARM, few enough partitions that capturing one decode
# graph set per partition stays affordable.
DEFAULT_DECODE_FRACTIONS: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625, 0.75)
PARTITION_LAYOUTS: tuple[PartitionLayout, ...] = get_args(PartitionLayout)


@dataclass(frozen=True)
class Split:
    """How many compute units (SMs, CUs, CPU cores) each lane may use.

    Invariant: ``decode_units + prefill_units - shared_units == total_units`` (the two partitions cover the device
    and overlap in exactly the shared units).
    """

    decode_units: int  # units the decode lane may run on: its floor plus the shared pool
    prefill_units: int  # the same for the prefill lane
    total_units: int
    # Both lanes on the whole device (the paper's P100-D100).
    full_overlap: bool
    # Units in both lanes' partitions: 0 for disjoint partitions, the pool of a shared_pool split, everything when
    # full_overlap (set so whatever is passed: one full split per device, whoever builds it).
    shared_units: int = 0

    def __post_init__(self) -> None:
        if self.full_overlap:
            object.__setattr__(self, "shared_units", self.total_units)
        if not 0 <= self.shared_units <= min(self.decode_units, self.prefill_units) or (
            self.decode_units + self.prefill_units - self.shared_units != self.total_units
        ):
            raise ValueError(f"{self}: the partitions must cover the device and overlap in exactly shared_units")

    @classmethod
    def full(cls, total_units: int) -> Split:
        return cls(total_units, total_units, total_units, True)

    @property
    def decode_floor(self) -> int:
        """Decode's units that prefill never runs on."""
        return self.decode_units - self.shared_units

    @property
    def label(self) -> str:
        """Paper notation, e.g. ``P100-D100``, ``P70-D30``, or ``P75-D50`` for a shared pool of 25% (percent of the
        device per lane; over 100 together when they share units)."""
        prefill = round(100 * self.prefill_units / self.total_units)
        decode = round(100 * self.decode_units / self.total_units)
        return f"P{prefill}-D{decode}"


def round_units(requested: int, granularity: int, total: int) -> int:
    """Round a decode request up to the granularity, leaving at least one granule to the prefill lane.

    Rounding up is the conservative direction for decode (the ITL side); the clamp keeps both partitions
    non-empty.
    """
    if total < 2 * granularity:
        raise ValueError(f"{total} units cannot be split into two partitions of granularity {granularity}")
    largest = (total - granularity) // granularity * granularity
    return min(max(granularity, math.ceil(requested / granularity) * granularity), largest)


def candidate_units(
    total: int, granularity: int, fractions: Sequence[float] = DEFAULT_DECODE_FRACTIONS
) -> list[int]:
    """Decode partition sizes to pre-create: each fraction of the device, rounded, without duplicates."""
    return sorted({round_units(round(f * total), granularity, total) for f in fractions})


def plan_decode_units(total: int, granularity: int, requested: Sequence[int] | None = None) -> list[int]:
    """Decode partition sizes to pre-create: the requested ones (default: fractions of the device), rounded and
    unique."""
    if requested is None:
        return candidate_units(total, granularity)
    return sorted({round_units(n, granularity, total) for n in requested})


@dataclass(frozen=True)
class SharedPoolPlan:
    """The shared_pool layout of one device: ``num_groups`` equal groups, the rest the pool; decode floors in
    groups."""

    group_units: int
    num_groups: int
    decode_groups: tuple[int, ...]  # decode's floor of each split, in groups, growing (prefill gets the others)

    def shared_units(self, total: int) -> int:
        return total - self.num_groups * self.group_units


def plan_shared_pool(
    total: int, granularity: int, shared_fraction: float = DEFAULT_SHARED_POOL_FRACTION,
    requested: Sequence[int] | None = None,
) -> SharedPoolPlan:
    """Groups of ``granularity`` units covering at most ``1 - shared_fraction`` of the device (the rest is the
    pool), and decode floors: the ``requested`` decode partition sizes (floor plus pool, rounded up to whole groups)
    or fractions of the groups. Each lane keeps at least one group of its own."""
    if not 0.0 < shared_fraction < 1.0:
        raise ValueError(f"shared_pool_fraction must be in (0, 1), got {shared_fraction!r}")
    num_groups = math.floor((1.0 - shared_fraction) * total / granularity)
    shared = total - num_groups * granularity
    if num_groups < 2 or shared < granularity:
        raise ValueError(
            f"{total} units cannot be split into two floors of {granularity} and a shared pool of "
            f"{shared_fraction:.0%}; choose another shared_pool_fraction or partition_layout: disjoint"
        )
    return SharedPoolPlan(granularity, num_groups, shared_pool_floors(num_groups, granularity, shared, requested))


def shared_pool_floors(
    num_groups: int, group_units: int, shared: int, requested: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Decode floors in groups: the requested decode partition sizes (floor plus pool) rounded up to whole groups, or
    :data:`DEFAULT_DECODE_FRACTIONS` of the groups; each between 1 and ``num_groups - 1``."""
    if requested is None:
        floors = {round(f * num_groups) for f in DEFAULT_DECODE_FRACTIONS}
    else:
        floors = {math.ceil(max(n - shared, 0) / group_units) for n in requested}
    return tuple(sorted({min(max(k, 1), num_groups - 1) for k in floors}))


class PartitionBackend(ABC):
    """Pre-created splits of one device between the decode and the prefill lane.

    Subclasses create their resources in ``__init__`` and register each split's pair of lane contexts with
    :meth:`_register`; the lookup, rounding and logging live here.
    """

    name: str
    # Both lanes may run at once on the full split (streams on a GPU share its SMs); False where they would
    # oversubscribe the units (CPU threads), so the ARM gives overlapping lanes a partition instead.
    full_split_runs_both_lanes: bool = True
    # The decode lane runs in the worker's own thread (its caller waits for every step anyway), not a thread of its
    # own (CPU: see ThreadsBackend).
    inline_decode_lane: bool = False
    # How the partitions lie: disjoint, or floors plus a shared pool (see the module docstring).
    layout: PartitionLayout = "disjoint"

    def __init__(self, total_units: int) -> None:
        self._total_units = total_units
        self._contexts: dict[Split, tuple[ContextFactory, ContextFactory]] = {}
        self._logged_roundings: set[int] = set()

    @property
    def total_units(self) -> int:
        """SMs, CUs or CPU cores of the whole device."""
        return self._total_units

    def splits(self) -> list[Split]:
        """Every pre-created split, partitions by growing decode share, the full-overlap split last."""
        return sorted(self._contexts, key=lambda s: (s.full_overlap, s.decode_units))

    def full_split(self) -> Split:
        """Both lanes on the whole device; every backend pre-creates it."""
        return Split.full(self._total_units)

    def round_split(self, requested_decode_units: int) -> Split:
        """The pre-created split with the fewest decode units at or above the request (full overlap if none)."""
        partitions = [s for s in self.splits() if not s.full_overlap]
        chosen = next((s for s in partitions if s.decode_units >= requested_decode_units), self.full_split())
        if chosen.decode_units != requested_decode_units and requested_decode_units not in self._logged_roundings:
            self._logged_roundings.add(requested_decode_units)
            logger.info(
                "%s: %d decode units requested, using %d (%s), the nearest pre-created split at or above",
                self.name, requested_decode_units, chosen.decode_units, chosen.label,
            )
        return chosen

    def lane_contexts(self, split: Split) -> tuple[ContextFactory, ContextFactory]:
        """(decode, prefill) context factories that a Lane enters around each submission."""
        try:
            return self._contexts[split]
        except KeyError:
            raise ValueError(
                f"{self.name}: split {split} was not pre-created; choose one of {self.splits()}"
            ) from None

    def thread_init(self, lane: str) -> Callable[[], None] | None:
        """What a lane's thread runs once when it starts (None: nothing)."""
        return None

    def make_lane(self, lane: LaneName, *, record_events: bool = False,
                  device_init: Callable[[], None] | None = None) -> Lane:
        """The lane as this backend runs it: the decode lane inline where ``inline_decode_lane``, otherwise a thread
        that runs ``device_init`` (e.g. selecting the CUDA device) and then the backend's ``thread_init``."""
        if lane == LaneName.DECODE and self.inline_decode_lane:
            return Lane(lane.value, record_events=record_events, inline=True)
        inits = [init for init in (device_init, self.thread_init(lane)) if init is not None]

        def thread_init() -> None:
            for init in inits:
                init()

        return Lane(lane.value, record_events=record_events, thread_init=thread_init if inits else None)

    @abstractmethod
    def close(self) -> None:
        """Release streams and contexts; the lanes must be idle."""

    def _register(self, split: Split, decode: ContextFactory, prefill: ContextFactory) -> None:
        self._contexts[split] = (decode, prefill)
