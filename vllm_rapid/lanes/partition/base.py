"""The partition interface shared by every backend, and the unit arithmetic they have in common.

A backend pre-creates every split it can offer at start-up (creating a green context or a CU-masked stream takes
milliseconds, and CUDA graphs stay bound to the partition they were captured on), so the ARM only ever chooses
among :meth:`PartitionBackend.splits`.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vllm_rapid.lanes.lane import ContextFactory, Lane, LaneName

logger = logging.getLogger(__name__)

# Decode shares offered by default: enough choice for the ARM, few enough partitions that capturing one decode
# graph set per partition stays affordable.
DEFAULT_DECODE_FRACTIONS: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625, 0.75)


@dataclass(frozen=True)
class Split:
    """How many compute units (SMs, CUs, CPU cores) each lane may use."""

    decode_units: int
    prefill_units: int
    total_units: int
    # Both lanes on the whole device (the paper's P100-D100); otherwise the two partitions are disjoint.
    full_overlap: bool

    @classmethod
    def full(cls, total_units: int) -> Split:
        return cls(total_units, total_units, total_units, True)

    @property
    def label(self) -> str:
        """Paper notation, e.g. ``P100-D100`` or ``P70-D30`` (percent of the device per lane)."""
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
