"""Engine-free scheduler tests: a RapidScheduler built offline and a driver that plays the worker's side.

Starting a vLLM engine costs seconds and hides the interleavings that matter (a prefill batch in flight across
steps, an abort while it runs, a lane that raises) behind real threads and timing. Here the scheduler is built from a
``VllmConfig`` and ``KVCacheConfig`` alone, as vLLM's own ``tests/v1/core`` does, and ``LaneDriver`` answers each
step the way ``RapidWorker`` would, deterministically: the test decides when a prefill batch completes, which lane
fails and which token each request samples. ``StepDriver`` does the same for vLLM's default ``Scheduler``, the
reference a RAPID run is compared with.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import itertools
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from vllm_rapid.core.compat import model_runner_output
from vllm_rapid.core.scheduler import RapidScheduler
from vllm_rapid.metrics.lane_stats import LaneStats
from vllm_rapid.protocol import PrefillLaunch, PrefillResult, RapidModelRunnerOutput, RapidSchedulerOutput
from vllm_rapid.testing.tiny_model import make_tiny_llama

EOS_TOKEN_ID = 1  # the tiny Llama's </s>
HASH_ALGO = "sha256"  # vLLM's default prefix_caching_hash_algo
_ARRIVALS = itertools.count(time.time(), 0.001)  # default arrival times: creation order, 1 ms apart


@functools.cache
def tiny_model_dir() -> Path:
    """The tiny Llama's directory, made once per process (it trains a tokenizer); the model config reads it."""
    path = Path(tempfile.mkdtemp(prefix="vllm-rapid-sched-model-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return make_tiny_llama(path)


@dataclass(frozen=True)
class SchedulerSetup:
    """What the engine decides at start-up that the scheduler depends on; one setup builds RAPID and vLLM alike."""

    num_blocks: int = 1000  # including vLLM's reserved null block
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    long_prefill_token_threshold: int = 0
    disable_chunked_mm_input: bool = False
    prefill_schedule_interval: int = 1  # vLLM 0.33+: hold prefill until N steps since the last prefill step
    rapid: Mapping[str, Any] = field(default_factory=dict)  # additional_config={"rapid": {...}}
    # A model directory (a multimodal model's processor needs its tokenizer, so it is loaded); None: the tiny Llama.
    model: str | None = None
    v2_runner: bool = False  # the workers run vLLM's V2 model runner (what the scheduler sends them differs)

    def vllm_config(self) -> VllmConfig:
        model_config = ModelConfig(
            model=self.model or str(tiny_model_dir()), dtype="float32", seed=0,
            skip_tokenizer_init=self.model is None, max_model_len=self.max_model_len,
        )
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            disable_chunked_mm_input=self.disable_chunked_mm_input,
            prefill_schedule_interval=self.prefill_schedule_interval,
            is_encoder_decoder=False,
            watermark=0.0,  # admission and preemption exactly at the block count
            policy=self.policy,
        )
        cache_config = CacheConfig(block_size=self.block_size, enable_prefix_caching=self.enable_prefix_caching)
        cache_config.num_gpu_blocks = self.num_blocks  # what the engine sets after profiling
        return VllmConfig(
            model_config=model_config, scheduler_config=scheduler_config, cache_config=cache_config,
            additional_config={"rapid": dict(self.rapid)},
        )

    def kv_cache_config(self) -> KVCacheConfig:
        spec = FullAttentionSpec(block_size=self.block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
        return KVCacheConfig(
            num_blocks=self.num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)]
        )


def make_scheduler(setup: SchedulerSetup | None = None, **changes: Any) -> RapidScheduler:
    """A RapidScheduler as the engine core builds it, with no engine, worker or model weights."""
    scheduler = _build(RapidScheduler, setup, changes)
    assert isinstance(scheduler, RapidScheduler)
    return scheduler


def make_vllm_scheduler(setup: SchedulerSetup | None = None, **changes: Any) -> Scheduler:
    """vLLM's default Scheduler on the same setup: the reference for what a RAPID run must produce."""
    return _build(Scheduler, setup, changes)


def _build(cls: type[Scheduler], setup: SchedulerSetup | None, changes: dict[str, Any]) -> Scheduler:
    setup = dataclasses.replace(setup or SchedulerSetup(), **changes)
    vllm_config = setup.vllm_config()
    scheduler = cls(
        vllm_config=vllm_config,
        kv_cache_config=setup.kv_cache_config(),
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=setup.block_size,
        log_stats=True,
    )
    scheduler.use_v2_model_runner = setup.v2_runner
    return scheduler


# ---- requests ----------------------------------------------------------------------------------------------------


@functools.cache
def _block_hasher(block_size: int) -> Callable[[Request], list[Any]]:
    hash_fn = get_hash_fn_by_name(HASH_ALGO)
    init_none_hash(hash_fn)  # what the engine core does once before hashing any request
    return get_request_block_hasher(block_size, hash_fn)


def make_requests(
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    ids: Sequence[str] | None = None,
    arrival_times: Sequence[float] | None = None,
    priorities: Sequence[int] | None = None,
    seeds: Sequence[int | None] | None = None,
    mm_features: Sequence[Sequence[MultiModalFeatureSpec]] | None = None,
    block_size: int = SchedulerSetup.block_size,
) -> list[Request]:
    """Requests as the engine core makes them: EOS from the model, block hashes for the prefix cache, multimodal
    items (``mm_features``, one list per prompt: their hashes and placeholder positions) where given.

    ``params`` is one SamplingParams for all (copied) or one per prompt; by default greedy, 8 tokens, EOS honoured.
    ``block_size`` must be the scheduler's, or prefix caching finds nothing.
    """
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams(temperature=0.0, max_tokens=8)] * len(prompts)
    requests = []
    for i, prompt in enumerate(prompts):
        sampling = params[i].clone()
        if seeds is not None and seeds[i] is not None:
            sampling.seed = seeds[i]
        sampling.update_from_generation_config({}, EOS_TOKEN_ID)
        requests.append(
            Request(
                request_id=ids[i] if ids is not None else f"r{i}",
                prompt_token_ids=list(prompt),
                sampling_params=sampling,
                pooling_params=None,
                arrival_time=arrival_times[i] if arrival_times is not None else next(_ARRIVALS),
                priority=priorities[i] if priorities is not None else 0,
                block_hasher=_block_hasher(block_size),
                mm_features=list(mm_features[i]) if mm_features is not None else None,
            )
        )
    return requests


def prompts_of_lengths(lengths: Iterable[int], seed: int = 0) -> list[list[int]]:
    """Random prompts (token ids 2..399, never EOS) of the given lengths."""
    rng = random.Random(seed)
    return [[rng.randrange(2, 400) for _ in range(n)] for n in lengths]


TokenRule = Callable[[Request], int]


def sequence_token(request: Request) -> int:
    """A stand-in for greedy decoding: the next token is a function of the tokens so far, never EOS.

    Any scheduler that computes the same sequences therefore samples the same tokens, however it batches them.
    """
    ids = request.all_token_ids
    return 2 + (ids[-1] * 31 + len(ids) * 7) % 398


# ---- drivers -----------------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """One engine step: the batch the scheduler built, what the worker returned, what the scheduler emitted."""

    scheduler_output: SchedulerOutput
    model_output: ModelRunnerOutput
    engine_outputs: dict[int, EngineCoreOutputs]

    @property
    def decode_batch(self) -> dict[str, int]:
        """Tokens per request in the step's batch (RAPID: the decode lane's)."""
        return self.scheduler_output.num_scheduled_tokens

    @property
    def prefill_launch(self) -> PrefillLaunch | None:
        return getattr(self.scheduler_output, "prefill", None)

    @property
    def finished_prefill(self) -> PrefillResult | None:
        return getattr(self.model_output, "finished_prefill", None)

    @property
    def outputs(self) -> list[EngineCoreOutput]:
        return [out for eco in self.engine_outputs.values() for out in eco.outputs]

    @property
    def scheduler_stats(self) -> list[SchedulerStats]:
        """Every stats record the step emitted (the engine expects at most one)."""
        return [eco.scheduler_stats for eco in self.engine_outputs.values() if eco.scheduler_stats is not None]

    @property
    def lane_stats(self) -> LaneStats | None:
        """RAPID's lane stats of this step's (single) stats record."""
        (stats,) = self.scheduler_stats
        return LaneStats.from_scheduler_stats(stats)


class StepDriver:
    """Plays vLLM's own worker: each step's batch runs and returns within the step.

    A request samples one token when its batch computes all of its known tokens (a partial prefill chunk samples
    nothing), as vLLM's model runner does; ``next_token`` picks it from the request's tokens so far.
    """

    def __init__(self, scheduler: Scheduler, next_token: TokenRule = sequence_token) -> None:
        self.scheduler = scheduler
        self.next_token = next_token
        self.throttle_prefills = False  # what a data-parallel engine core passes on a throttled step
        self.records: list[StepRecord] = []
        self.tokens: dict[str, list[int]] = {}
        self.finish_reasons: dict[str, FinishReason] = {}

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.scheduler.add_request(request)
            self.tokens.setdefault(request.request_id, [])

    def abort(self, *req_ids: str) -> list[Request]:
        """A client abort, handled between steps as the engine core does."""
        return self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    @property
    def busy(self) -> bool:
        """Whether the engine core would step again (vLLM steps while the scheduler ``has_requests()``)."""
        return self.scheduler.has_requests()

    def step(self, *, abort: Iterable[str] = ()) -> StepRecord:
        """One engine step; ``abort`` arrives while the batch runs (the engine core handles those before
        ``update_from_output``)."""
        scheduler_output = self.scheduler.schedule(self.throttle_prefills)
        model_output = self.sample(scheduler_output)
        return self._finish_step(scheduler_output, model_output, abort)

    def run_until_idle(self, arrivals: Mapping[int, Sequence[Request]] | None = None, max_steps: int = 1000) -> None:
        """Step until the engine core would stop (``busy``); ``arrivals[k]`` are added before the k-th step from now.

        Like the engine core, it stops once the scheduler has no requests, even with a prefill batch in flight.
        """
        pending = dict(arrivals or {})
        for k in range(max_steps):
            self.add(*pending.pop(k, ()))
            if not self.busy and not pending:
                return
            self._run_step()
        raise AssertionError(f"not idle after {max_steps} steps")

    def _run_step(self) -> None:
        """One step of ``run_until_idle``."""
        self.step()

    def sample(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """What the model runner returns for ``scheduler_output``, sampled now (at launch, for a prefill batch)."""
        req_ids = list(scheduler_output.num_scheduled_tokens)
        sampled = []
        for req_id in req_ids:
            request = self.scheduler.requests[req_id]
            sampled.append([] if request.is_prefill_chunk else [self.next_token(request)])
        return model_runner_output(req_ids, sampled_token_ids=sampled)

    def _finish_step(
        self, scheduler_output: SchedulerOutput, model_output: ModelRunnerOutput, abort: Iterable[str]
    ) -> StepRecord:
        if abort := tuple(abort):
            self.abort(*abort)
        engine_outputs = self.scheduler.update_from_output(scheduler_output, model_output)
        record = StepRecord(scheduler_output, model_output, engine_outputs)
        for out in record.outputs:
            self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                self.finish_reasons[out.request_id] = out.finish_reason
        self.records.append(record)
        return record


@dataclass
class _LaneBatch:
    """The prefill batch on the driver's prefill lane: its result is fixed at launch, delivered when done."""

    launch: PrefillLaunch
    output: ModelRunnerOutput
    steps_left: int | None  # None: until complete_prefill()
    error: str | None = None
    done: bool = False


class LaneDriver(StepDriver):
    """Plays RapidWorker for a RapidScheduler: the decode batch runs within its step; a prefill batch stays on the
    prefill lane until it is done, and its result rides back on the next step's output, as
    ``RapidWorker.execute_model`` sends it.

    ``prefill_steps``: a batch's result rides on the output of the ``prefill_steps``-th step counting its launch
    step (1: the batch finishes while the launch step's decode runs); None: it runs until ``complete_prefill()``.
    """

    def __init__(
        self,
        scheduler: RapidScheduler,
        next_token: TokenRule = sequence_token,
        *,
        prefill_steps: int | None = 1,
        decode_step_ms: float = 1.0,
        prefill_batch_ms: float = 5.0,
    ) -> None:
        super().__init__(scheduler, next_token)
        self.prefill_steps = prefill_steps
        self.decode_step_ms = decode_step_ms
        self.prefill_batch_ms = prefill_batch_ms
        self.lane: _LaneBatch | None = None

    @property
    def inflight(self) -> PrefillLaunch | None:
        """The batch on the driver's prefill lane (done or not, until its result has been sent)."""
        return self.lane.launch if self.lane is not None else None

    def complete_prefill(self, error: str | None = None) -> None:
        """The batch in flight finishes (``error``: it raised); its result rides on the next step."""
        if self.lane is None:
            raise AssertionError("no prefill batch in flight")
        self.lane.done, self.lane.error = True, error

    def step(self, *, abort: Iterable[str] = (), decode_error: str | None = None) -> StepRecord:
        """One engine step. ``decode_error``: the decode lane's batch raises (its outputs are empty)."""
        scheduler_output = self.scheduler.schedule(self.throttle_prefills)
        assert isinstance(scheduler_output, RapidSchedulerOutput)
        launch = scheduler_output.prefill
        if launch is not None:
            if self.lane is not None:  # RapidWorker refuses this too
                raise AssertionError(f"prefill batch {launch.batch_id} launched while {self.lane.launch.batch_id} runs")
            self.lane = _LaneBatch(launch, self.sample(launch.scheduler_output), self.prefill_steps)
        decode = EMPTY_MODEL_RUNNER_OUTPUT if decode_error is not None else self.sample(scheduler_output)
        model_output = RapidModelRunnerOutput.wrap(
            decode,
            finished_prefill=self._collect_prefill(),
            decode_step_ms=self.decode_step_ms if scheduler_output.total_num_scheduled_tokens else None,
            decode_error=decode_error,
        )
        return self._finish_step(scheduler_output, model_output, abort)

    def _run_step(self) -> None:
        if self.lane is not None and self.lane.steps_left is None:
            self.complete_prefill()  # without prefill_steps, a batch finishes on the step after its launch
        self.step()

    def _collect_prefill(self) -> PrefillResult | None:
        """What RapidWorker sends back of the prefill lane on this step: the batch's result, once it is done."""
        lane = self.lane
        if lane is None:
            return None
        if lane.steps_left is not None:
            lane.steps_left -= 1
            lane.done = lane.done or lane.steps_left <= 0
        if not lane.done:
            return None
        self.lane = None
        batch_id = lane.launch.batch_id
        if lane.error is not None:
            return PrefillResult(batch_id, None, error=lane.error)
        return PrefillResult(batch_id, lane.output, elapsed_ms=self.prefill_batch_ms)
