"""RapidScheduler: vLLM's scheduler split into a decode lane and a prefill lane over one KV-cache manager.

Each engine step schedules the decode batch of every running request whose prompt is done, and, when the prefill
lane is free, one prefill batch that then runs across as many engine steps as it needs. Both batches are built by
vLLM's own ``Scheduler.schedule`` run once per lane over that lane's requests, so budgets, prefix caching,
preemption, priorities and structured output keep vLLM's semantics.

A request's life (``check_invariants`` verifies the table after every step when ``rapid.debug_invariants`` is on):

============================  ==================================================  ==========================
state                         where the scheduler holds it                        its KV blocks
============================  ==================================================  ==========================
waiting                       ``waiting`` / ``kv_holding_waiting``                none (or a prefix hit)
prefill queued                ``running``, >1 token pending, not in the batch     allocated
prefill in flight (batch b)   ``running``, in ``inflight_prefill.req_ids``        being written by the lane
decoding                      ``running``, 1 token pending (the decode lane)      allocated
finished                      gone from ``requests``                              freed; fenced while in b
preempted                     back to ``waiting``                                 freed; fenced while in b
============================  ==================================================  ==========================

Three hazards that a single stream hides are fenced here:

* prefix-cache commits: vLLM publishes full blocks to the prefix cache when it schedules them, before any lane has
  written them. New requests are admitted only by the prefill pass, which runs only while the prefill lane is idle;
  so the prefill pass publishes at schedule time as vLLM does (requests of one batch share a new common prefix, as
  in vLLM's own batch), while the decode pass publishes a block only once its step has written it. A prefill batch
  that fails takes its blocks out of the prefix cache again.
* freed blocks: a request aborted or preempted while its prefill is in flight keeps its blocks until the batch
  completes (``fenced_frees``), so no other request can be handed a block the prefill lane is still writing.
* the first token: it is sampled by the prefill lane; the worker moves the request's runner state to the decode lane
  (``vllm_rapid.worker.lane_states.LaneStates``) and the decode batch starts from it.

A lane batch that raised comes back as an error (``PrefillResult.error``, ``RapidModelRunnerOutput.decode_error``):
its requests finish with ``FINISHED_ERROR`` and free their blocks; every other request carries on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vllm.sampling_params import SamplingType
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.core.sched.request_queue import RequestQueue, SchedulingPolicy, create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from vllm_rapid.config import RapidConfig
from vllm_rapid.core.compat import EXTRA_WAITING_QUEUES, HAS_PREV_STEP_SCHEDULED_REQ_IDS, PrefillCadence
from vllm_rapid.core.encoder_inputs import encoder_outputs_of, forget_encoder_outputs, hand_on_evictions
from vllm_rapid.core.runner_handoff import DecodeRunnerHandoff
from vllm_rapid.lanes.arm import ArmInputs, DecodeObservation
from vllm_rapid.lanes.lane import LaneName
from vllm_rapid.metrics.lane_stats import LaneStats, StepStats
from vllm_rapid.patch.internals import require_vllm_internals
from vllm_rapid.patch.iteration_details import count_prefill_launches
from vllm_rapid.patch.kv_publication import defer_prefix_cache_publication
from vllm_rapid.patch.registry import Stage
from vllm_rapid.patch.scheduler_stats import has_plugin_stats
from vllm_rapid.patch.versions import require_supported_vllm
from vllm_rapid.protocol import PrefillLaunch, PrefillResult, RapidModelRunnerOutput, RapidSchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class InflightPrefill:
    """The prefill batch the prefill lane is running, and the requests whose block frees wait for it."""

    batch_id: int
    scheduler_output: SchedulerOutput
    req_ids: frozenset[str]
    # The blocks this batch writes, published at schedule time: taken out of the prefix cache if it fails.
    written_blocks: frozenset[int] = frozenset()
    # The multimodal items whose encoder outputs it computes: forgotten by the encoder cache if it fails.
    encoder_outputs: frozenset[str] = frozenset()
    fenced_frees: list[Request] = field(default_factory=list)


class RapidScheduler(Scheduler):
    """Dual-queue scheduler: decode every step, prefill on its own lane whenever that lane is free."""

    # vLLM's own state that the lane passes swap (checked at start-up, vllm_rapid/patch/internals.py).
    running: list[Request]
    waiting: RequestQueue
    kv_holding_waiting: RequestQueue
    max_num_scheduled_tokens: int
    max_num_active_reqs: int
    prefill_capacity_bound: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require_supported_vllm()
        require_vllm_internals(Stage.ENGINE_CORE)
        super().__init__(*args, **kwargs)
        self.rapid_config = RapidConfig.of(self.vllm_config)
        max_tokens = self.scheduler_config.max_num_batched_tokens
        chunk = self.rapid_config.prefill_chunk_tokens
        # An item vLLM must not split (--disable-chunked-mm-input, forced for models that attend bidirectionally
        # within an image) fits vLLM's batch budget, not necessarily a smaller RAPID chunk: no chunks below it.
        chunking = self.scheduler_config.enable_chunked_prefill and not self.scheduler_config.disable_chunked_mm_input
        self.prefill_token_budget = min(chunk, max_tokens) if (chunk and chunking) else max_tokens
        self.inflight_prefill: InflightPrefill | None = None
        self._next_batch_id = 0
        self._last_completed_prefill = -1
        # vLLM tracks "scheduled in the previous step" per runner; each lane has its own runner.
        self._prev_ids_by_lane: dict[LaneName, set[str]] = {LaneName.DECODE: set(), LaneName.PREFILL: set()}
        self._suppress_stats = False
        # What the current step's outputs say of the lanes, filled in while they are processed.
        self._step_stats = StepStats()
        # The last decode step the output rank measured, shipped to every rank's ARM with the next step.
        self._decode_observation: DecodeObservation | None = None
        # The scheduling pass running now (None outside schedule()), and during the decode pass the prefill lane's
        # running requests (which vLLM's own pass cannot see, but whose blocks preemption may take).
        self._pass: LaneName | None = None
        self._other_lane: list[Request] = []
        self._running_order: dict[int, int] = {}
        # A reset_prefix_cache(reset_running_requests=True) that waits for the prefill lane to finish its batch.
        self._reset_prefix_cache_after_batch: bool | None = None
        # Requests refused at arrival (a feature RAPID does not support per request), failed at the next update.
        self._refused: dict[str, str] = {}
        self._num_added = 0
        # vLLM 0.33's --prefill-schedule-interval, applied once per engine step (its counters would advance per pass).
        self._cadence = PrefillCadence(self)
        # V2 model runners: the decode runner resumes each request the prefill lane finished (no state object moves).
        self._handoff = DecodeRunnerHandoff(self.model_uses_mrope)
        # The decode pass delays publication to the prefix cache until its step has written the blocks.
        defer_prefix_cache_publication(self.kv_cache_manager, when=lambda: self._pass != LaneName.PREFILL)
        count_prefill_launches()
        logger.info(
            "RAPID scheduler: decode every step, prefill batches of up to %d tokens on their own lane (%s)",
            self.prefill_token_budget,
            self.rapid_config,
        )

    # ---- scheduling -------------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.resumable and request.request_id not in self.requests:
            self.requests[request.request_id] = request  # failed at the next update, with a clear reason
            self._refused[request.request_id] = "streaming-input sessions are not supported with --scheduler rapid yet"
            return
        self._seed_unseeded(request)
        super().add_request(request)

    def _seed_unseeded(self, request: Request) -> None:
        """Give an unseeded random-sampling request a seed derived from the engine's seed and its arrival order.

        vLLM's default scheduler draws unseeded samples from one device generator in step order, which one lane
        makes reproducible run to run. Two lanes draw in an order set by timing, and which requests share a decode
        batch also depends on when prefills finish: only a generator per request keeps the samples the same on every
        run (vLLM's seeded path). The request's own SamplingParams object is not changed (callers share them).
        """
        self._num_added += 1
        params, seed = request.sampling_params, self.vllm_config.model_config.seed
        if params is None or seed is None or params.sampling_type != SamplingType.RANDOM:
            return
        if not self.rapid_config.reproducible_sampling:
            return
        request.sampling_params = params.clone()
        request.sampling_params.seed = (seed * 1_000_003 + self._num_added) % (1 << 63)

    def has_requests(self) -> bool:
        # A prefill batch in flight keeps the engine stepping until its result is in, also when every one of its
        # requests was aborted: only then do their fenced blocks come back (an idle server keeps nothing).
        return super().has_requests() or self.inflight_prefill is not None or bool(self._refused)

    def schedule(self, throttle_prefills: bool = False) -> RapidSchedulerOutput:
        # Data-parallel prefill balancing: vLLM defers every prefill of a throttled step while some running request
        # decodes, unless its queue is capacity-bound. Decided over both lanes' requests, before the passes.
        defer_prefills = throttle_prefills and not self.prefill_capacity_bound and any(
            not r.is_prefill_chunk for r in self.running
        )
        defer_prefills = defer_prefills or self._cadence.holds(self.prefill_capacity_bound, self.running)
        capacity_bound = self.prefill_capacity_bound
        decode, decode_preempted = self._schedule_lane(LaneName.DECODE, throttle_prefills)
        if getattr(self, "use_v2_model_runner", True):  # vLLM 0.34's scheduler has no V1 runner to tell apart
            decode = self._handoff.resume_arrivals(
                decode, self.requests, self._still_decoding, self.kv_cache_manager.get_block_ids
            )
        self.prefill_capacity_bound = capacity_bound  # the decode pass's empty queue says nothing about it
        launch = None
        # vLLM admits nobody in a step that preempted; the prefill pass is where RAPID admits.
        if self.inflight_prefill is None and not (decode_preempted or defer_prefills) and self._has_prefill_work():
            prefill, _ = self._schedule_lane(LaneName.PREFILL, throttle_prefills=False)
            if prefill.total_num_scheduled_tokens > 0:
                launch = self._launch_prefill(prefill)
            else:
                hand_on_evictions(decode, prefill)
        self._cadence.count(decode.total_num_scheduled_tokens + (launch is not None), launch is not None)
        step = RapidSchedulerOutput.wrap(
            decode,
            grammar=self._grammar_of(decode),
            prefill=launch,
            arm_inputs=ArmInputs.of(
                [self.requests[i].num_computed_tokens for i in decode.num_scheduled_tokens],
                [r.arrival_time for r in self._pending_prefills()],
                prefill_inflight=self.inflight_prefill is not None,
            ),
            decode_observation=self._take_decode_observation(),
            last_completed_prefill=self._last_completed_prefill,
        )
        if self.rapid_config.debug_invariants:
            self.check_invariants(step)
        return step

    def get_grammar_bitmask(self, scheduler_output: SchedulerOutput):
        if isinstance(scheduler_output, RapidSchedulerOutput):
            return None  # computed in schedule() and shipped with the batch
        return super().get_grammar_bitmask(scheduler_output)

    def _grammar_of(self, lane_output: SchedulerOutput) -> GrammarOutput | None:
        """The lane batch's grammar bitmask, copied: vLLM returns views of one shared buffer, so the second lane's
        call in the same step would overwrite the first's before it ships."""
        grammar = super().get_grammar_bitmask(lane_output)
        if grammar is None:
            return None
        return dataclasses.replace(grammar, grammar_bitmask=grammar.grammar_bitmask.copy())

    def in_prefill_lane(self, request: Request) -> bool:
        """A request belongs to the prefill lane while its batch is in flight, while any of its prompt is not computed
        (every prompt token, so prompt logprobs and encoder inputs stay with one runner), or while more than its last
        sampled token is pending (recomputing after a preemption). Draft tokens of speculative decoding are decode
        work: they do not count."""
        if self._is_inflight(request):
            return True
        computed = request.num_computed_tokens
        return computed < request.num_prompt_tokens or computed < request.num_tokens - 1

    def _still_decoding(self, request: Request) -> bool:
        return request.status == RequestStatus.RUNNING and not self.in_prefill_lane(request)

    def _has_prefill_work(self) -> bool:
        return bool(self.waiting or self.kv_holding_waiting) or any(map(self.in_prefill_lane, self.running))

    def _schedule_lane(self, lane: LaneName, throttle_prefills: bool) -> tuple[SchedulerOutput, bool]:
        """Run vLLM's scheduling pass over one lane's requests only, then restore the shared queues.

        Returns the lane's batch and whether the pass preempted anything.
        """
        all_running = self.running
        is_decode = lane == LaneName.DECODE
        lane_reqs: list[Request] = []
        others: list[Request] = []
        for request in all_running:
            (others if self.in_prefill_lane(request) == is_decode else lane_reqs).append(request)
        saved = (self.waiting, self.kv_holding_waiting, self.max_num_scheduled_tokens, self.max_num_active_reqs)
        saved_queues = {name: getattr(self, name) for name in EXTRA_WAITING_QUEUES}
        self.running = lane_reqs
        if HAS_PREV_STEP_SCHEDULED_REQ_IDS:
            self.prev_step_scheduled_req_ids = self._prev_ids_by_lane[lane]
        self._pass = lane
        if is_decode:
            # Decode admits nobody; whatever it preempts lands in this queue and goes back to the real one.
            self.waiting = create_request_queue(self.policy)
            self.kv_holding_waiting = create_request_queue(self.policy)
            for name in saved_queues:
                setattr(self, name, create_request_queue(self.policy))
            self._other_lane = others
            self._running_order = {id(r): i for i, r in enumerate(all_running)}
        else:
            self.max_num_scheduled_tokens = self.prefill_token_budget
            self.max_num_active_reqs = saved[3] - len(others)
        try:
            output = Scheduler.schedule(self, throttle_prefills)
        finally:
            lane_after, preempted = self.running, self.waiting
            self.waiting, self.kv_holding_waiting, self.max_num_scheduled_tokens, self.max_num_active_reqs = saved
            for name, queue in saved_queues.items():
                setattr(self, name, queue)
            self._pass, self._other_lane = None, []
            if is_decode and preempted:
                # vLLM prepends each victim to the waiting queue as it preempts it; prepend_requests reverses.
                self.waiting.prepend_requests(reversed(list(preempted)))
            # Kept: the lane's requests still running after the pass, and the other lane's not preempted by it.
            kept = {id(r) for r in lane_after} | {id(r) for r in others if r.status == RequestStatus.RUNNING}
            before = {id(r) for r in all_running}
            self.running = [r for r in all_running if id(r) in kept] + [
                r for r in lane_after if id(r) not in before
            ]
        return output, bool(is_decode and preempted)

    # ---- preemption across the lanes ----------------------------------------------------------------------------

    def _request_blocks_can_be_freed(self, request: Request) -> bool:
        """vLLM asks this of the victim it picked before preempting it. In the decode pass it picked among the
        decode lane's requests only; vLLM's policy over every running request may prefer one of the prefill lane's.

        * That one is not in flight: under FCFS vLLM preempts it instead (it pops the last running request next, so
          it is placed there); under priority it is preempted here and this decode request waits a step.
        * It is in flight: its blocks come back when its batch completes, so this decode request waits for that
          rather than an older or higher-priority request being preempted for a newer or lower-priority one.
        """
        victim = self._preferred_victim(request)
        if victim is None:
            return super()._request_blocks_can_be_freed(request)
        if self._is_inflight(victim):
            return False
        self._other_lane.remove(victim)
        if self.policy == SchedulingPolicy.PRIORITY:
            self._preempt_request(victim, time.monotonic())
            return False
        self.running.append(victim)
        return True

    def _preferred_victim(self, picked: Request) -> Request | None:
        """The prefill-lane request vLLM's policy would preempt before ``picked`` (None: ``picked`` it is)."""
        if self._pass != LaneName.DECODE or not self._other_lane or not any(r is picked for r in self.running):
            return None
        candidates = [*self.running, *self._other_lane]
        if self.policy == SchedulingPolicy.PRIORITY:
            victim = max(candidates, key=lambda r: (r.priority, r.arrival_time))
        else:
            victim = max(candidates, key=lambda r: self._running_order[id(r)])
        return victim if any(victim is r for r in self._other_lane) else None

    def _pending_prefills(self) -> list[Request]:
        """Requests waiting for (the rest of) their prefill and not in the batch in flight."""
        running = [r for r in self.running if self.in_prefill_lane(r) and not self._is_inflight(r)]
        return [*self.waiting, *self.kv_holding_waiting, *running]

    def _launch_prefill(self, prefill: SchedulerOutput) -> PrefillLaunch:
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        self.inflight_prefill = InflightPrefill(
            batch_id, prefill, frozenset(prefill.num_scheduled_tokens), self._blocks_written_by(prefill),
            encoder_outputs=encoder_outputs_of(prefill, self.requests),
        )
        # First tokens of structured-output requests are sampled on the prefill lane: ship their bitmask along.
        return PrefillLaunch(batch_id, prefill, self._grammar_of(prefill))

    def _blocks_written_by(self, batch: SchedulerOutput) -> frozenset[int]:
        """Block ids that ``batch`` writes KV into (from each request's first newly computed token on)."""
        written: set[int] = set()
        groups = self.kv_cache_config.kv_cache_groups
        for req_id, num_tokens in batch.num_scheduled_tokens.items():
            start = self.requests[req_id].num_computed_tokens - num_tokens  # computed already counts the batch
            for group, block_ids in zip(groups, self.kv_cache_manager.get_block_ids(req_id)):
                written.update(block_ids[start // group.kv_cache_spec.block_size:])
        return frozenset(written)

    def _is_inflight(self, request: Request) -> bool:
        return self.inflight_prefill is not None and request.request_id in self.inflight_prefill.req_ids

    def check_invariants(self, step: RapidSchedulerOutput) -> None:
        """The lifecycle table above, after ``step`` was scheduled (raises AssertionError naming the breach)."""
        running_ids = [r.request_id for r in self.running]
        assert len(running_ids) == len(set(running_ids)), f"a request is running twice: {sorted(running_ids)}"
        waiting_ids = {r.request_id for r in (*self.waiting, *self.kv_holding_waiting)}
        assert not waiting_ids & set(running_ids), f"running and waiting at once: {waiting_ids & set(running_ids)}"
        decoding = set(step.num_scheduled_tokens)
        assert decoding <= set(running_ids), f"decode batch has requests not running: {decoding - set(running_ids)}"
        for req_id in decoding:
            assert not self.in_prefill_lane(self.requests[req_id]), f"{req_id} decodes while in the prefill lane"
        assert not step.scheduled_encoder_inputs, f"encoder inputs in the decode batch: {step.scheduled_encoder_inputs}"
        batch = self.inflight_prefill
        if batch is None:
            return
        assert not decoding & batch.req_ids, f"in the decode batch and the prefill batch: {decoding & batch.req_ids}"
        fenced = {r.request_id for r in batch.fenced_frees}
        assert fenced <= batch.req_ids, f"fenced frees of requests not in batch {batch.batch_id}: {fenced}"

    # ---- results ----------------------------------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> dict[int, EngineCoreOutputs]:
        if not isinstance(model_runner_output, RapidModelRunnerOutput):
            return super().update_from_output(scheduler_output, model_runner_output)
        prefill_outputs: dict[int, EngineCoreOutputs] = {}
        self._step_stats = StepStats(
            decode_batch_reqs=len(scheduler_output.num_scheduled_tokens),
            decode_step_ms=model_runner_output.decode_step_ms,
            arm=model_runner_output.arm_state,
        )
        self._remember_decode_step(scheduler_output, model_runner_output)
        if model_runner_output.decode_error is None:
            self._publish_decode_blocks(scheduler_output)
        if self._refused:
            refused, self._refused = self._refused, {}
            for req_id, reason in refused.items():
                prefill_outputs = _merge_outputs(prefill_outputs, self._fail_requests([req_id], reason))
        if model_runner_output.finished_prefill is not None:
            completed = self._complete_prefill(model_runner_output.finished_prefill)
            prefill_outputs = _merge_outputs(prefill_outputs, completed)
        if (decode_error := model_runner_output.decode_error) is not None:
            # Failed first, so vLLM's update below skips them as finished.
            failed = self._fail_requests(scheduler_output.num_scheduled_tokens, decode_error)
            prefill_outputs = _merge_outputs(prefill_outputs, failed)
        decode_outputs = super().update_from_output(scheduler_output, model_runner_output)
        return _merge_outputs(prefill_outputs, decode_outputs)

    def _publish_decode_blocks(self, step: SchedulerOutput) -> None:
        """The decode step has written its KV: publish the blocks it filled (before vLLM frees finished requests,
        so a request's last block reaches the prefix cache too)."""
        for req_id in step.num_scheduled_tokens:
            if (request := self.requests.get(req_id)) is not None:
                # Up to the known tokens: positions past them hold draft tokens, not yet verified.
                self.kv_cache_manager.cache_blocks(request, min(request.num_computed_tokens, request.num_tokens))

    def _remember_decode_step(self, step: SchedulerOutput, output: RapidModelRunnerOutput) -> None:
        """Keep the decode step the output rank measured, for every rank's ARM at the next step."""
        if output.decode_step_ms is None or output.arm_state is None or not isinstance(step, RapidSchedulerOutput):
            return
        inputs = step.arm_inputs
        self._decode_observation = DecodeObservation(
            output.arm_state.split, inputs.decode_batch_size, round(inputs.mean_context_len), output.decode_step_ms
        )

    def _take_decode_observation(self) -> DecodeObservation | None:
        observation, self._decode_observation = self._decode_observation, None  # each one is observed once
        return observation

    def _complete_prefill(self, result: PrefillResult) -> dict[int, EngineCoreOutputs]:
        batch = self.inflight_prefill
        if batch is None or batch.batch_id != result.batch_id:
            raise RuntimeError(
                f"prefill result for batch {result.batch_id} but batch "
                f"{None if batch is None else batch.batch_id} is in flight"
            )
        self._last_completed_prefill = batch.batch_id
        if result.error is not None or result.output is None:
            self.kv_cache_manager.evict_blocks(set(batch.written_blocks))  # published unwritten: out of the cache
            self._release(batch)  # before failing its requests, so their blocks are freed at once
            failed = self._fail_requests(batch.req_ids, result.error or "the prefill batch returned no output")
            forget_encoder_outputs(self.encoder_cache_manager, batch.encoder_outputs)  # once nobody refers to them
            return failed
        self._step_stats.prefill_batch_ms = result.elapsed_ms
        self._step_stats.prefill_batch_tokens = batch.scheduler_output.total_num_scheduled_tokens
        self._suppress_stats = True  # registry: one-stats-record-per-step (the decode update makes it)
        try:
            outputs = super().update_from_output(batch.scheduler_output, result.output)
        finally:
            self._suppress_stats = False
        self._release(batch)
        return outputs

    def _release(self, batch: InflightPrefill) -> None:
        """The prefill lane is done with ``batch``: free the blocks whose frees it fenced, then run a prefix-cache
        reset that waited for it (before any new admission: only the prefill pass admits, with the lane idle)."""
        self.inflight_prefill = None
        for request in batch.fenced_frees:
            self.kv_cache_manager.free(request)
        if (reset_connector := self._reset_prefix_cache_after_batch) is not None:
            self._reset_prefix_cache_after_batch = None
            super().reset_prefix_cache(reset_running_requests=False, reset_connector=reset_connector)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        if reset_running_requests:
            for ids in self._prev_ids_by_lane.values():
                ids.clear()  # the runners flush every request: none counts as scheduled in the previous step
        if not (reset_running_requests and self.inflight_prefill is not None):
            return super().reset_prefix_cache(reset_running_requests, reset_connector)
        # The prefill lane still writes its batch's blocks, whose frees are fenced: preempt everything now (as vLLM
        # does) and reset the cache the moment the batch completes.
        timestamp = time.monotonic()
        while self.running:
            self._preempt_request(self.running.pop(), timestamp, drop_stale_output=True)
        self._reset_prefix_cache_after_batch = reset_connector
        return True

    def _fail_requests(self, req_ids: Iterable[str], error: str) -> dict[int, EngineCoreOutputs]:
        """Finish a failed lane batch's requests with an error (HTTP 500 to their clients) and free their blocks."""
        failed = self.finish_requests(req_ids, RequestStatus.FINISHED_ERROR)
        if failed:
            logger.error("RAPID: failing request(s) %s: %s", sorted(r.request_id for r in failed), error)
        self._step_stats.failed_reqs += len(failed)
        outputs: dict[int, EngineCoreOutputs] = {}
        for request in failed:
            outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=request.get_finished_reason(),
                    events=request.take_events(),
                    trace_headers=request.trace_headers,
                )
            )
        return outputs

    def make_stats(self, *args: Any, **kwargs: Any):
        if self._suppress_stats:
            return None
        stats = super().make_stats(*args, **kwargs)
        if stats is not None and has_plugin_stats(type(stats)):
            stats.plugin_stats = self.lane_stats().to_plugin_stats()
        return stats

    def lane_stats(self) -> LaneStats:
        """The lanes now: queues, the batch in flight, and what the last step's outputs said."""
        inflight = self.inflight_prefill
        return LaneStats(
            prefill_queue_reqs=len(self._pending_prefills()),
            prefill_inflight_reqs=len(inflight.req_ids) if inflight else 0,
            prefill_inflight_tokens=inflight.scheduler_output.total_num_scheduled_tokens if inflight else 0,
            step=self._step_stats,
        )

    # ---- KV fences --------------------------------------------------------------------------------------------

    def _free_request_blocks(self, request: Request) -> None:
        if self.inflight_prefill is not None and self._is_inflight(request):
            self.inflight_prefill.fenced_frees.append(request)  # the prefill lane may still write them
            return
        super()._free_request_blocks(request)


def _merge_outputs(
    first: dict[int, EngineCoreOutputs], second: dict[int, EngineCoreOutputs]
) -> dict[int, EngineCoreOutputs]:
    """Concatenate two steps' per-client outputs; the second carries the step's stats.

    vLLM gives the stats to client 0 when it has no output for any client; if the first part has outputs, the
    stats ride with those instead of in a message of their own, as in vLLM's single update.
    """
    for client, early in first.items():
        late = second.get(client)
        if late is None:
            second[client] = early
            continue
        late.outputs = early.outputs + late.outputs
        if early.finished_requests:
            late.finished_requests = early.finished_requests | (late.finished_requests or set())
    alone = [client for client, o in second.items()
             if o.scheduler_stats is not None and not o.outputs and not o.finished_requests]
    if alone and len(second) > 1:
        stats = second.pop(alone[0]).scheduler_stats
        next(iter(second.values())).scheduler_stats = stats
    return second
