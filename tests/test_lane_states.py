"""LaneStates: runner states follow their requests between the decode runner, the prefill runner and the park.

The runners are the minimum LaneStates touches (``requests``, ``input_batch.remove_request``,
``execute_model_state``). A test creates a state in the prefill runner where the real runner would: when the lane
starts running a batch with a new request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from vllm.v1.core.sched.output import SchedulerOutput

from vllm_rapid.worker.lane_states import LaneStates


@dataclass
class InputBatch:
    removed: list[str] = field(default_factory=list)

    def remove_request(self, req_id: str) -> None:
        self.removed.append(req_id)


@dataclass
class Runner:
    requests: dict[str, State] = field(default_factory=dict)
    input_batch: InputBatch = field(default_factory=InputBatch)
    execute_model_state: object | None = None


@dataclass(eq=False)
class State:
    """A request's runner state; identity matters (it carries the sampling generator)."""

    req_id: str


def make_lanes() -> tuple[LaneStates, Runner, Runner]:
    decode, prefill = Runner(), Runner()
    return LaneStates(decode, prefill), decode, prefill


def batch_of_cached(*req_ids: str) -> SchedulerOutput:
    """A step whose cached (not new) requests are ``req_ids``: the ones a runner must already hold."""
    output = SchedulerOutput.make_empty()
    output.scheduled_cached_reqs.req_ids = list(req_ids)
    return output


def batch_of(*req_ids: str) -> SchedulerOutput:
    """A prefill batch scheduling ``req_ids`` (new requests: no state to claim yet)."""
    output = SchedulerOutput.make_empty()
    output.num_scheduled_tokens = dict.fromkeys(req_ids, 1)
    return output


def run_new_requests(runner: Runner, *req_ids: str) -> dict[str, State]:
    """The lane runs a batch with new requests: the runner creates their states."""
    states = {req_id: State(req_id) for req_id in req_ids}
    runner.requests.update(states)
    return states


def launch_new_requests(lanes: LaneStates, runner: Runner, *req_ids: str) -> dict[str, State]:
    """RapidWorker launches a prefill batch of new requests and its lane runs it."""
    lanes.launch(batch_of(*req_ids))
    return run_new_requests(runner, *req_ids)


def test_prefill_states_are_parked_then_claimed_by_the_decode_runner():
    lanes, decode, prefill = make_lanes()
    states = run_new_requests(prefill, "a", "b")
    lanes.park(["a", "b"])
    assert prefill.requests == {} and prefill.input_batch.removed == ["a", "b"]
    assert lanes.parked == states
    lanes.claim(decode, batch_of_cached("a", "b"))
    assert decode.requests == states and decode.requests["a"] is states["a"]
    assert lanes.parked == {}
    lanes.claim(decode, batch_of_cached("a", "b"))  # the next step: already there
    assert decode.requests == states and lanes.num_states() == 2
    decode.requests.clear()  # the decode runner drops its finished requests itself
    lanes.finish(["a", "b"])
    assert lanes.num_states() == 0


def test_request_finished_while_parked_is_forgotten():
    lanes, decode, prefill = make_lanes()
    run_new_requests(prefill, "a", "b")
    lanes.park(["a", "b"])
    lanes.finish(["a"])  # aborted before its first decode step
    assert set(lanes.parked) == {"b"} and lanes.num_states() == 1


def test_request_finished_while_its_batch_is_in_flight_is_dropped_when_the_batch_is_parked():
    lanes, decode, prefill = make_lanes()
    states = launch_new_requests(lanes, prefill, "a", "b")
    lanes.finish(["a"])
    assert prefill.requests == states  # the prefill lane is running: its runner is not touched
    lanes.park(["a", "b"])
    assert lanes.parked == {"b": states["b"]} and prefill.requests == {}
    launch_new_requests(lanes, prefill, "a")  # the id comes back as a new request: parked as usual
    lanes.park(["a"])
    assert set(lanes.parked) == {"a", "b"}


def test_failed_batch_states_are_dropped_from_either_runner():
    lanes, decode, prefill = make_lanes()
    launch_new_requests(lanes, prefill, "a", "b")
    lanes.finish(["a"])
    prefill.execute_model_state = object()  # the batch raised between forward and sampling
    lanes.drop(prefill, ["a", "b"])
    assert prefill.requests == {} and prefill.execute_model_state is None
    assert lanes.num_states() == 0
    run_new_requests(decode, "d0", "d1")
    lanes.drop(decode, ["d0", "d1"])
    assert decode.requests == {} and decode.input_batch.removed == ["d0", "d1"]
    launch_new_requests(lanes, prefill, "a")  # a's in-flight finish was cleared with its failed batch
    lanes.park(["a"])
    assert set(lanes.parked) == {"a"}


def test_chunked_prefill_continues_from_the_park():
    lanes, decode, prefill = make_lanes()
    (state,) = run_new_requests(prefill, "long").values()
    lanes.park(["long"])  # first chunk done
    lanes.claim(prefill, batch_of_cached("long"))
    assert prefill.requests == {"long": state} and lanes.parked == {}
    lanes.park(["long"])  # last chunk done
    lanes.claim(decode, batch_of_cached("long"))
    assert decode.requests == {"long": state}


def test_preempted_request_is_recomputed_with_its_own_state():
    """Preempted from decode (the decode runner keeps its state), recomputed on the prefill lane, back to decode."""
    lanes, decode, prefill = make_lanes()
    (state,) = run_new_requests(prefill, "a").values()
    lanes.park(["a"])
    lanes.claim(decode, batch_of_cached("a"))
    lanes.claim(prefill, batch_of_cached("a"))  # resumed in a prefill batch
    assert prefill.requests == {"a": state} and decode.requests == {}
    assert decode.input_batch.removed == ["a"]
    lanes.park(["a"])
    lanes.claim(decode, batch_of_cached("a"))
    assert decode.requests == {"a": state} and lanes.num_states() == 1


def test_lost_runner_state_is_an_error():
    lanes, decode, prefill = make_lanes()
    with pytest.raises(RuntimeError, match="lost the runner state of request ghost"):
        lanes.claim(decode, batch_of_cached("ghost"))
    run_new_requests(prefill, "a")  # its batch is still running: decode must not take it
    with pytest.raises(RuntimeError, match="lost the runner state of request a"):
        lanes.claim(decode, batch_of_cached("a"))
    assert set(prefill.requests) == {"a"}


def test_request_finished_before_the_lane_starts_its_batch_is_not_parked():
    """RapidWorker submits a batch and returns; an abort can reach finish() before the lane thread has run the
    batch's first lines (which create the new requests' states)."""
    lanes, decode, prefill = make_lanes()
    lanes.launch(batch_of("a", "b"))
    lanes.finish(["a"])
    run_new_requests(prefill, "a", "b")  # the lane thread gets going
    lanes.park(["a", "b"])
    assert set(lanes.parked) == {"b"}, "a's state is parked for good: nobody will claim or finish it again"
