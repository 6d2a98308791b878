"""A lane: one worker thread that runs submitted work in order, inside the lane's execution context.

Independent of vLLM on purpose, so partition backends and benchmarks reuse it. On CPU the lane's thread is the
concurrency (torch CPU kernels release the GIL); on a GPU each lane also enters its own stream context (a
green-context stream, a CU-masked stream, or a plain stream), chosen per submission so the ARM can move a lane
between partitions from one step to the next.

A lane times each submission itself, from the moment its thread starts it to the moment it ends: that one
``LaneEvent`` is a lane step's time everywhere (metrics, the ARM's observations, recorded events).
"""

from __future__ import annotations

import contextlib
import enum
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

ContextFactory = Callable[[], AbstractContextManager[Any]]
MAX_RECORDED_EVENTS = 100_000
# Both lanes' threads run Python between kernels; a thread waiting for the GIL waits up to the switch interval
# (Python's default 5 ms), which alone would double a small decode step. Processes that run lanes hand it over sooner.
LANE_GIL_SWITCH_INTERVAL_S = 0.0002
_lane_thread = threading.local()


def current_lane() -> str | None:
    """The name of the lane whose thread calls this; None outside the lanes (start-up, the engine's own thread)."""
    return getattr(_lane_thread, "name", None)


class Label(str, enum.Enum):
    """A closed set of names that are also metric labels: ``str()`` gives the value (StrEnum needs Python 3.11)."""

    def __str__(self) -> str:
        return self.value


class LaneName(Label):
    """The two lanes (also their label in metrics and records)."""

    DECODE = "decode"
    PREFILL = "prefill"


@dataclass(frozen=True)
class LaneEvent:
    """One unit of work as the lane ran it (monotonic seconds)."""

    lane: str
    label: str
    start: float
    end: float
    num_tokens: int = 0

    @property
    def elapsed_ms(self) -> float:
        return (self.end - self.start) * 1e3


class LaneFuture(Future):
    """A submission's result, and its ``event``: when the lane's thread ran it (set before the result)."""

    event: LaneEvent | None = None


class Lane:
    """Runs callables one at a time on a dedicated thread and returns futures.

    An ``inline`` lane runs each submission at once in the submitting thread instead (its future is done when
    ``submit`` returns): for a lane whose caller always waits for it, where a thread hop costs more than it gives
    (CPU: an OpenMP team started from a second thread runs at about half the speed of the main thread's team).
    """

    def __init__(
        self,
        name: str,
        context: ContextFactory | None = None,
        thread_init: Callable[[], None] | None = None,
        record_events: bool = False,
        inline: bool = False,
    ) -> None:
        if inline and thread_init is not None:
            raise ValueError(f"lane {name!r}: an inline lane runs in its callers' threads, it has no thread to init")
        self.name = name
        self._default_context = context or contextlib.nullcontext
        self._thread_init = thread_init
        self._queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        # Bounded: a long-running server keeps only the most recent batches.
        self.events: deque[LaneEvent] | None = deque(maxlen=MAX_RECORDED_EVENTS) if record_events else None
        self._thread: threading.Thread | None = None
        if not inline:
            self._thread = threading.Thread(target=self._run, name=f"rapid-lane-{name}", daemon=True)
            self._thread.start()

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        label: str = "",
        num_tokens: int = 0,
        context: ContextFactory | None = None,
        **kwargs: Any,
    ) -> LaneFuture:
        """Queue ``fn(*args, **kwargs)`` to run on this lane; the future holds its result or exception."""
        future = LaneFuture()
        item = (future, fn, args, kwargs, label, num_tokens, context or self._default_context)
        if self._thread is None:
            self._execute(item)
        else:
            self._queue.put(item)
        return future

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Submit and wait: the caller blocks, the work still runs in the lane's thread and context."""
        return self.submit(fn, *args, **kwargs).result()

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish queued work, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        _lane_thread.name = self.name
        if self._thread_init is not None:
            self._thread_init()
        while (item := self._queue.get()) is not None:
            self._execute(item)

    def _execute(self, item: tuple) -> None:
        future, fn, args, kwargs, label, num_tokens, context = item
        if not future.set_running_or_notify_cancel():
            return
        caller_lane, _lane_thread.name = current_lane(), self.name  # an inline lane runs in its caller's thread
        start = time.monotonic()
        try:
            with context():
                result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (handed to the waiter, never lost in the thread)
            self._finish(future, label, start, num_tokens)
            future.set_exception(exc)
            return
        finally:
            _lane_thread.name = caller_lane
        self._finish(future, label, start, num_tokens)
        future.set_result(result)

    def _finish(self, future: LaneFuture, label: str, start: float, num_tokens: int) -> None:
        future.event = LaneEvent(self.name, label, start, time.monotonic(), num_tokens)
        if self.events is not None:
            self.events.append(future.event)
