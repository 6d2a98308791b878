"""Process-wide settings of the worker process that runs the two lanes."""

from __future__ import annotations

import sys

# Both lanes' threads run Python between kernels; a thread waiting for the GIL waits up to the switch interval
# (Python's default 5 ms), which alone would double a small decode step. Hand the GIL over sooner.
LANE_GIL_SWITCH_INTERVAL_S = 0.0002


def shorten_gil_switch_interval() -> None:
    sys.setswitchinterval(LANE_GIL_SWITCH_INTERVAL_S)
