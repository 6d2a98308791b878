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

    def preempt(self, req_ids: Iterable[str]) -> None:
        """Nothing to do: a preempted request's state stays where it is until ``claim`` brings it to the runner that
        recomputes it."""

    def num_states(self) -> int:
        """Request states held anywhere (a leak check: 0 when the engine is idle)."""
        return len(self.parked) + len(self.decode_runner.requests) + len(self.prefill_runner.requests)


class ResumedLaneStates:
    """The V2 runner's version of ``LaneStates``: nothing moves between the runners.

    V2 keeps a request's state in per-slot tensors of its runner, so the decode runner takes over a request whose
    prompt the prefill runner finished as V2 resumes a preempted request: from its tokens and blocks, sent by the
    scheduler as a new request (``vllm_rapid.core.runner_handoff``). What is left here is the prefill runner's side:
    it forgets a request once its prompt is done, or once the request finished or was preempted, and only while
    its lane is idle (a batch in flight keeps its requests' slots until it is done). A request preempted from
    decode comes back to the prefill runner as vLLM resumes any preempted request on V2: as a new one.
    """

    def __init__(self, decode_runner: Any, prefill_runner: Any) -> None:
        self.decode_runner = decode_runner
        self.prefill_runner = prefill_runner
        self._completing: set[str] = set()  # requests of the batch in flight whose prompt it completes
        self._pending_removal: set[str] = set()  # finished or preempted while their batch was in flight
        self._in_flight = False

    def launch(self, output: SchedulerOutput) -> None:
        """Before the prefill runner runs the batch ``output`` on its lane."""
        self._remove_from_prefill(self._pending_removal)
        self._pending_removal = set()
        scheduled = output.num_scheduled_tokens
        completing = {r.req_id for r in output.scheduled_new_reqs
                      if r.num_computed_tokens + scheduled[r.req_id] >= len(r.prefill_token_ids or r.prompt_token_ids)}
        states = self.prefill_runner.req_states
        cached = output.scheduled_cached_reqs
        for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
            if computed + scheduled[req_id] >= states.prefill_len.np[states.req_id_to_index[req_id]]:
                completing.add(req_id)
        self._completing = completing
        self._in_flight = True

    def park(self, req_ids: Iterable[str]) -> None:
        """The prefill batch is done: its completed prompts are the decode runner's from now on."""
        self._in_flight = False
        self._remove_from_prefill(self._completing | self._pending_removal)
        self._completing, self._pending_removal = set(), set()

    def drop(self, runner: Any, req_ids: Iterable[str]) -> None:
        """Forget a failed batch's states held by the (now idle) ``runner``."""
        if runner is self.prefill_runner:
            self._in_flight = False
            self._completing = set()
        for req_id in req_ids:
            runner._remove_request(req_id)
        runner.execute_model_state = None  # a batch that raised between forward and sampling leaves it set

    def claim(self, runner: Any, output: SchedulerOutput) -> None:
        """Nothing to bring: the scheduler's output carries what a runner needs of a request it does not hold."""

    def finish(self, req_ids: Iterable[str]) -> None:
        """Finished (or preempted) requests: the decode runner forgets its own from the step output; the prefill
        runner forgets them now, or when its batch in flight is done."""
        if self._in_flight:
            self._pending_removal.update(req_ids)
        else:
            self._remove_from_prefill(req_ids)

    preempt = finish  # a preempted request comes back to a runner as a new one (V2's resumption)

    def _remove_from_prefill(self, req_ids: Iterable[str]) -> None:
        for req_id in sorted(req_ids):  # sorted: every TP rank frees slots in the same order, as vLLM does
            self.prefill_runner._remove_request(req_id)

    def num_states(self) -> int:
        return sum(len(r.req_states.req_id_to_index) for r in (self.decode_runner, self.prefill_runner))
