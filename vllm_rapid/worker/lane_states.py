"""Which model runner holds each request's state, and the moves between the two lanes' runners.

vLLM's model runner keeps per-request state (tokens so far, block ids, sampling generator) across steps. With two
runners, a request's state must follow it: created by the prefill runner, moved to the decode runner when its
prompt is done (carrying the first sampled token and the generator, so seeded sampling continues unchanged), and
moved back if it is preempted and recomputed. A runner is only touched while its lane is idle: a finished prefill
batch's states are parked at once, and lanes pick states up from the park (or the idle decode runner) when a batch
names them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput


class LaneStates:
    """Moves ``CachedRequestState`` objects between the decode runner, the prefill runner and a park."""

    def __init__(self, decode_runner: Any, prefill_runner: Any) -> None:
        self.decode_runner = decode_runner
        self.prefill_runner = prefill_runner
        self.parked: dict[str, Any] = {}
        # The requests of the prefill batch in flight (from its launch to its park or drop), and those of them that
        # finished meanwhile: their states are dropped, not parked, when the batch is done.
        self._in_flight: set[str] = set()
        self._finished_in_flight: set[str] = set()

    def launch(self, output: SchedulerOutput) -> None:
        """Before the prefill runner runs the batch ``output`` on its lane: claim its states, and mark its requests
        in flight (the lane thread creates new requests' states only when it starts the batch)."""
        self.claim(self.prefill_runner, output)
        self._in_flight = set(output.num_scheduled_tokens)

    def park(self, req_ids: Iterable[str]) -> None:
        """Take a finished prefill batch's states out of the (now idle) prefill runner."""
        runner = self.prefill_runner
        self._in_flight = set()
        for req_id in req_ids:
            state = runner.requests.pop(req_id, None)
            runner.input_batch.remove_request(req_id)
            if req_id in self._finished_in_flight:
                self._finished_in_flight.discard(req_id)
            elif state is not None:
                self.parked[req_id] = state

    def drop(self, runner: Any, req_ids: Iterable[str]) -> None:
        """Forget a failed batch's states held by the (now idle) ``runner``: its requests are failed, not parked."""
        if runner is self.prefill_runner:
            self._in_flight = set()
        for req_id in req_ids:
            runner.requests.pop(req_id, None)
            runner.input_batch.remove_request(req_id)
            self._finished_in_flight.discard(req_id)
        runner.execute_model_state = None  # a batch that raised between forward and sampling leaves it set

    def claim(self, runner: Any, output: SchedulerOutput) -> None:
        """Before ``runner`` runs ``output``: bring it every cached request's state it does not hold."""
        for req_id in output.scheduled_cached_reqs.req_ids:
            if req_id in runner.requests:
                continue
            state = self.parked.pop(req_id, None)
            if state is None and runner is self.prefill_runner:
                # Preempted from decode and now recomputed; the decode lane is idle between steps.
                state = self.decode_runner.requests.pop(req_id, None)
                self.decode_runner.input_batch.remove_request(req_id)
            if state is None:
                raise RuntimeError(f"RAPID lanes lost the runner state of request {req_id}")
            runner.requests[req_id] = state

    def finish(self, req_ids: Iterable[str]) -> None:
        """Forget finished requests held outside the decode runner (which drops its own from the step output).

        A finished request of the batch in flight is dropped when that batch is parked.
        """
        for req_id in req_ids:
            if self.parked.pop(req_id, None) is None and req_id in self._in_flight:
                self._finished_in_flight.add(req_id)

    def num_states(self) -> int:
        """Request states held anywhere (a leak check: 0 when the engine is idle)."""
        return len(self.parked) + len(self.decode_runner.requests) + len(self.prefill_runner.requests)
