"""The serving loop: requests arrive by wall clock, policies schedule steps onto one or two Lanes, real steps run.

Every policy shares the loop, the admission rule (FCFS, KV blocks reserved for prompt + output, at most
``max_num_seqs`` sequences) and the step execution; a policy only says what goes into a step, on which lane, and
on which split:

* ``serial``: one lane; a batch of waiting prompts (whole prompts, up to ``prefill_batch_tokens``) if any, else
  a decode step. Decodes stall while prompts are prefilled.
* ``hybrid-C``: one lane; every step carries all running decodes plus up to C prompt tokens (the last prompt is
  chunked to fit), like vLLM's chunked prefill.
* ``hybrid-C-iN``: ``hybrid-C`` with decode priority, as vLLM 0.33's ``--prefill-schedule-interval N``: prompt
  tokens join a step only once N decode steps ran since the last step that carried any (at once when nothing
  decodes). vLLM also lets them through while its waiting queue is saturated; that is not modelled.
* ``lanes``: a prefill lane and a decode lane running concurrently on the whole device (full overlap).
* ``lanes-static``: the same two lanes on one fixed split, the ARM's ``static`` policy (``--static-decode-fraction``
  of the device for decode).
* ``lanes-arm``: the same two lanes; the ARM picks each decode step's split, the prefill batch runs on the
  prefill side of the split current when it is submitted.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

from benchmarks.mechanism_lib.paged import BlockFreeList
from benchmarks.mechanism_lib.runner import ChunkInputs, DecodeInputs, StackRunner, StepInputs
from benchmarks.mechanism_lib.trace import TraceRequest
from vllm_rapid.lanes.arm import AdaptiveResourceManager, ArmInputs, DecodeObservation
from vllm_rapid.lanes.lane import Lane
from vllm_rapid.lanes.partition import PartitionBackend, Split
from vllm_rapid.lanes.partition.base import PartitionLayout

DEFAULT_POLICIES = (
    "serial", "hybrid-512", "hybrid-1024", "hybrid-2048", "hybrid-512-i4", "lanes", "lanes-static", "lanes-arm"
)
# Two-lane policies -> (the ARM policy that picks their splits (None: always the full split), the partition layout).
_LANE_POLICIES = {
    "lanes": (None, "disjoint"), "lanes-static": ("static", "disjoint"), "lanes-arm": ("adaptive", "disjoint"),
    "lanes-shared-static": ("static", "shared_pool"), "lanes-shared-arm": ("adaptive", "shared_pool"),
}


@dataclass(frozen=True)
class Policy:
    name: str
    two_lanes: bool
    chunk_budget: int | None = None  # hybrid: prompt tokens per step
    arm_policy: str | None = None  # two lanes: the RapidConfig.arm_policy choosing their splits
    prefill_interval: int | None = None  # hybrid-C-iN: decode steps between steps with prompt tokens
    layout: PartitionLayout = "disjoint"  # two lanes: the partition layout of their splits

    @property
    def arm(self) -> bool:
        return self.arm_policy is not None

    @classmethod
    def parse(cls, name: str) -> Policy:
        if name == "serial":
            return cls(name, two_lanes=False)
        if name in _LANE_POLICIES:
            arm_policy, layout = _LANE_POLICIES[name]
            return cls(name, two_lanes=True, arm_policy=arm_policy, layout=layout)
        match = re.fullmatch(r"hybrid-(\d+)(?:-i(\d+))?", name)
        if match and int(match[1]) > 0 and (match[2] is None or int(match[2]) > 0):
            interval = None if match[2] is None else int(match[2])
            return cls(name, two_lanes=False, chunk_budget=int(match[1]), prefill_interval=interval)
        raise ValueError(
            f"unknown policy {name!r}: serial, hybrid-<tokens>, hybrid-<tokens>-i<steps>, {', '.join(_LANE_POLICIES)}"
        )


@dataclass(frozen=True)
class EngineConfig:
    block_size: int
    max_num_seqs: int
    prefill_batch_tokens: int  # serial and lanes: prompt tokens per prefill batch
    drain_timeout_s: float  # after the last arrival, stop scheduling new steps this much later


@dataclass
class TraceRequestState:
    """One trace request's progress in one run: its KV blocks, the prompt tokens cached, the tokens generated."""

    req: TraceRequest
    blocks: list[int]
    computed: int = 0  # prompt tokens in the cache
    generated: int = 0
    busy: bool = False  # part of a step in flight
    token_times: list[float] = field(default_factory=list)  # seconds since the run started

    @property
    def prefilling(self) -> bool:
        return self.computed < self.req.prompt_len

    @property
    def seq_len(self) -> int:
        """Tokens in the cache once the next decode step has written its token."""
        return self.computed + self.generated


@dataclass(frozen=True)
class StepRecord:
    """One executed step (seconds since the run started)."""

    lane: str  # "decode", "prefill" or "step" (one lane: decode and/or prefill)
    start_s: float
    end_s: float
    num_decodes: int
    prefill_tokens: int
    decode_units: int
    mean_context: float


@dataclass
class RunResult:
    policy: str
    rate: float
    requests: list[TraceRequestState]
    steps: list[StepRecord]


@dataclass
class _Work:
    lane: str
    decodes: list[TraceRequestState]
    chunks: list[tuple[TraceRequestState, int]]  # (request, prompt tokens)
    split: Split


class ServingRun:
    """One policy over one trace."""

    def __init__(
        self,
        policy: Policy,
        trace: list[TraceRequest],
        runner: StackRunner,
        backend: PartitionBackend,
        lanes: dict[str, Lane],
        config: EngineConfig,
        make_arm: Callable[[str], AdaptiveResourceManager],
        rate: float,
    ) -> None:
        self.policy, self.rate, self.runner, self.backend, self.config = policy, rate, runner, backend, config
        self.lanes = lanes if policy.two_lanes else {"step": lanes["decode"]}
        self.arm = make_arm(policy.arm_policy) if policy.arm_policy is not None else None
        self.decided: Split | None = None  # the split of the ARM's last decision
        # hybrid-C-iN: decode-only steps since the last step with prompt tokens (none yet: nothing holds the first).
        self.decode_steps_since_prefill = policy.prefill_interval or 0
        self.free_blocks = BlockFreeList(runner.cache.num_blocks)
        self.states = [TraceRequestState(r, []) for r in trace]
        self.waiting: deque[TraceRequestState] = deque()  # arrived, not admitted
        self.active: list[TraceRequestState] = []  # admitted, unfinished, in admission order
        self.steps: list[StepRecord] = []
        self.t0 = 0.0  # perf_counter at the start of the run

    def run(self) -> RunResult:
        pending = deque(sorted(self.states, key=lambda s: s.req.arrival_s))
        deadline = (pending[-1].req.arrival_s if pending else 0.0) + self.config.drain_timeout_s
        inflight: dict[Future, _Work] = {}
        self.t0 = time.perf_counter()
        while True:
            now = self._now()
            while pending and pending[0].req.arrival_s <= now:
                self.waiting.append(pending.popleft())
            self._admit()
            if now < deadline:
                busy = {work.lane for work in inflight.values()}
                # Prefill first: an inline decode lane (CPU) runs its step in this thread as it is submitted.
                for lane in sorted(self.lanes, key=lambda name: name != "prefill"):
                    if lane not in busy and (work := self._next_work(lane)) is not None:
                        inflight[self._submit(work)] = work
            if not inflight:
                if now >= deadline or not (pending or self.waiting or self.active):
                    break
                if not pending:
                    raise RuntimeError(f"{self.policy.name}: requests wait but no step can be scheduled")
                time.sleep(max(0.0, pending[0].req.arrival_s - self._now()))
                continue
            timeout = max(0.0, pending[0].req.arrival_s - self._now()) if pending else None
            done, _ = wait(inflight, timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                self._complete(inflight.pop(future), *future.result())
        return RunResult(self.policy.name, self.rate, self.states, self.steps)

    def _now(self) -> float:
        return time.perf_counter() - self.t0

    def _admit(self) -> None:
        """FCFS while a sequence slot and the KV blocks for the whole request are free."""
        while self.waiting and len(self.active) < self.config.max_num_seqs:
            state = self.waiting[0]
            needed = -(-(state.req.prompt_len + state.req.output_len) // self.config.block_size)
            if needed > self.free_blocks.num_free:
                return
            state.blocks = self.free_blocks.allocate(needed)
            self.active.append(self.waiting.popleft())

    def _next_work(self, lane: str) -> _Work | None:
        decodes = [s for s in self.active if not s.prefilling and not s.busy] if lane != "prefill" else []
        chunks = []
        if lane != "decode":
            budget = self.policy.chunk_budget or self.config.prefill_batch_tokens
            chunks = self._pick_prompts(budget, split_last=self.policy.chunk_budget is not None)
        if self.policy.name == "serial" and chunks:
            decodes = []  # prefill first, decodes wait
        interval = self.policy.prefill_interval
        if interval is not None and decodes and self.decode_steps_since_prefill < interval:
            chunks = []  # decode priority: prompts wait for their turn
        if not (decodes or chunks):
            return None
        return _Work(lane, decodes, chunks, self._split(lane, decodes))

    def _pick_prompts(self, budget: int, split_last: bool) -> list[tuple[TraceRequestState, int]]:
        """Prompt tokens in admission order up to ``budget``; a prompt is cut only when ``split_last`` or when it
        alone exceeds the budget."""
        chunks: list[tuple[TraceRequestState, int]] = []
        for state in self.active:
            if budget == 0:
                break
            if state.busy or not state.prefilling:
                continue
            remaining = state.req.prompt_len - state.computed
            if remaining > budget and chunks and not split_last:
                break
            chunks.append((state, min(remaining, budget)))
            budget -= chunks[-1][1]
        return chunks

    def _split(self, lane: str, decodes: list[TraceRequestState]) -> Split:
        """Decode steps ask the ARM; a prefill batch takes the split of its last decision, or of a decision with no
        decode batch if none yet."""
        if self.arm is None:
            return self.backend.full_split()
        if lane == "prefill" and self.decided is not None:
            return self.decided
        waiting = [s.req.arrival_s for s in [*self.active, *self.waiting] if s.prefilling and not s.busy]
        inflight = any(s.busy and s.prefilling for s in self.active)
        inputs = ArmInputs.of([s.seq_len for s in decodes], waiting, inflight, now=self._now())
        self.decided = self.arm.decide(inputs).split
        return self.decided

    def _submit(self, work: _Work) -> Future:
        block_size = self.config.block_size
        decode = None
        if work.decodes:
            decode = DecodeInputs.build([s.blocks for s in work.decodes], [s.seq_len for s in work.decodes],
                                        block_size)
        chunks = [ChunkInputs.build(s.blocks, s.computed, n, block_size) for s, n in work.chunks]
        for state in [*work.decodes, *(s for s, _ in work.chunks)]:
            state.busy = True
        decode_ctx, prefill_ctx = self.backend.lane_contexts(work.split)
        return self.lanes[work.lane].submit(
            self.runner.execute, StepInputs(decode, chunks), work.split,
            context=prefill_ctx if work.lane == "prefill" else decode_ctx,
        )

    def _complete(self, work: _Work, start: float, end: float) -> None:
        start, end = start - self.t0, end - self.t0
        contexts = [s.seq_len for s in work.decodes]
        for state, n in work.chunks:
            state.computed += n
            if not state.prefilling:  # the prompt's last chunk yields the first token
                state.generated = 1
                state.token_times.append(end)
        for state in work.decodes:
            state.generated += 1
            state.token_times.append(end)
        for state in [*work.decodes, *(s for s, _ in work.chunks)]:
            state.busy = False
            if state.generated >= state.req.output_len:
                self.free_blocks.release(state.blocks)
                self.active.remove(state)
        self.decode_steps_since_prefill = 0 if work.chunks else self.decode_steps_since_prefill + 1
        mean_context = sum(contexts) / len(contexts) if contexts else 0.0
        self.steps.append(StepRecord(work.lane, start, end, len(work.decodes), sum(n for _, n in work.chunks),
                                     work.split.decode_units, mean_context))
        if self.arm is not None and work.decodes:
            self.arm.observe(DecodeObservation(work.split, len(work.decodes), round(mean_context), 1e3 * (end - start)))
