"""Process-wide settings of the worker process that runs the two lanes."""

from __future__ import annotations

import sys

from vllm_rapid.lanes.lane import LANE_GIL_SWITCH_INTERVAL_S


def shorten_gil_switch_interval() -> None:
    sys.setswitchinterval(LANE_GIL_SWITCH_INTERVAL_S)
