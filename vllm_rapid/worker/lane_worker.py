"""RapidWorker: one worker process, two model runners (decode lane, prefill lane), one model and one KV cache.

The platform's own worker (CPU or GPU) builds, loads and profiles the primary runner, which serves the decode lane.
A second runner of the same class serves the prefill lane: its own input buffers, request states, block tables and
attention-metadata builders, but the primary's weights and KV tensors (nothing is loaded or allocated twice). Each
runner's batches run on its own ``Lane`` (thread + device stream), so a prefill batch runs across several engine
steps while decode steps keep completing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from concurrent import futures
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
from vllm.config import CUDAGraphMode
from vllm.platforms import current_platform
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, DraftTokenIds, ModelRunnerOutput
from vllm.v1.worker.workspace import use_workspace_lane

from vllm_rapid.config import RapidConfig
from vllm_rapid.lanes.lane import ContextFactory, LaneFuture, LaneName
from vllm_rapid.patch.cpu_kernels import use_thread_safe_cpu_kernels
from vllm_rapid.patch.forward_context import apply_thread_local_forward_context
from vllm_rapid.patch.internals import require_vllm_internals
from vllm_rapid.patch.process import shorten_gil_switch_interval
from vllm_rapid.patch.registry import Stage
from vllm_rapid.patch.runner import one_kv_allocation, share_kv_tensors, sync_lane_stream_only
from vllm_rapid.patch.tp_group import apply_thread_local_tp_group, use_tp_group
from vllm_rapid.patch.versions import require_supported_vllm
from vllm_rapid.patch.workspace import DECODE_WORKSPACE_LANE, PREFILL_WORKSPACE_LANE, use_two_workspace_lanes
from vllm_rapid.protocol import PrefillLaunch, PrefillResult, RapidModelRunnerOutput, RapidSchedulerOutput
from vllm_rapid.worker.decode_graphs import DecodeGraphs, partition_graph_bytes
from vllm_rapid.worker.encoder_cache import PrefillEncoderCache
from vllm_rapid.worker.lane_control import LaneController, worker_cpu_cores
from vllm_rapid.worker.lane_states import LaneStates, ResumedLaneStates
from vllm_rapid.worker.runners import decode_batch_probe, encoder_outputs, is_v2, load_prefill_model, run_lane_step
from vllm_rapid.worker.tp_group import create_lane_tp_group, current_tp_group_name
from vllm_rapid.worker.workspace_lanes import grow_prefill_workspace

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as PlatformWorker

logger = logging.getLogger(__name__)


class RapidWorker(PlatformWorker):
    """The platform worker with a prefill lane beside the decode lane."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require_supported_vllm()
        require_vllm_internals(Stage.WORKER, *([Stage.CPU_WORKER] if current_platform.is_cpu() else []))
        super().__init__(*args, **kwargs)
        apply_thread_local_forward_context()
        shorten_gil_switch_interval()
        self.rapid_config = RapidConfig.of(self.vllm_config)
        self._inflight: PrefillLaunch | None = None
        self._inflight_future: LaneFuture | None = None
        self._finished_prefill: PrefillResult | None = None
        # Speculative decoding: drafts the prefill runner proposed for the batch it just finished, for the next step.
        self._prefill_drafts: DraftTokenIds | None = None

    # ---- set-up: a second runner that shares weights and KV --------------------------------------------------

    def init_device(self) -> None:
        use_two_workspace_lanes()  # before the platform's worker builds vLLM's workspace manager
        super().init_device()
        runner_cls = type(self.model_runner)
        # After the platform's device set-up: the partition backend is built on this worker's own device.
        cores = worker_cpu_cores(self.parallel_config) if self.device.type == "cpu" else None
        self.lane_control = LaneController(self.rapid_config, self.device, cpu_cores=cores)
        record = self.rapid_config.record_lane_events
        backend = self.lane_control.backend
        self.decode_lane, self.prefill_lane = (
            backend.make_lane(lane, record_events=record) for lane in (LaneName.DECODE, LaneName.PREFILL)
        )
        self.prefill_runner = runner_cls(self.vllm_config, self.device)
        self.v2 = is_v2(self.model_runner)
        if self.device.type == "cuda" and not self.v2:  # the V2 runner syncs its streams, never the whole device
            for runner in (self.model_runner, self.prefill_runner):
                sync_lane_stream_only(runner)
        states = ResumedLaneStates if self.v2 else LaneStates
        self.lane_states: LaneStates | ResumedLaneStates = states(self.model_runner, self.prefill_runner)
        self.prefill_encoder_cache = PrefillEncoderCache(self.prefill_runner)
        self.prefill_tp_group = None
        if self.parallel_config.tensor_parallel_size > 1:
            # Two lanes must never share a communicator: the prefill lane's thread gets its own TP group.
            apply_thread_local_tp_group()
            self.prefill_tp_group = create_lane_tp_group()
            self.prefill_lane.run(use_tp_group, self.prefill_tp_group)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        if current_platform.is_cpu():
            use_thread_safe_cpu_kernels()
        super().load_model(*args, **kwargs)
        load_prefill_model(self.prefill_runner, self.model_runner)

    def initialize_from_config(self, kv_cache_config: Any) -> None:
        primary, allocation = self.model_runner, dict[str, torch.Tensor]()
        # Same attention backends, builders and block tables as the primary, bound to the primary's tensors.
        with one_kv_allocation(allocation) if self.v2 else contextlib.nullcontext():
            super().initialize_from_config(kv_cache_config)
            if not self.v2:
                share_kv_tensors(self.prefill_runner, primary)
            with use_workspace_lane(PREFILL_WORKSPACE_LANE):  # its builders reserve their scratch in its own workspace
                self.prefill_runner.initialize_kv_cache(kv_cache_config)
        self.prefill_runner.kv_caches = primary.kv_caches
        # Prefill batches run without CUDA graphs. The graphs vLLM captures belong to the primary runner: its input
        # buffers, its stream and the decode lane's TP communicator. Replayed by the prefill lane they would read the
        # wrong buffers and share that communicator, and prefill batches are big enough not to need them. (The V2
        # runner replays only graphs its own manager captured, and the prefill runner captures none.)
        if self.v2:
            self.prefill_runner.kv_block_zeroer = primary.kv_block_zeroer  # zeroes blocks of the same tensors
        else:
            self.prefill_runner.cudagraph_dispatcher.initialize_cudagraph_keys(CUDAGraphMode.NONE)
        self.lane_control.attach_model(
            primary.get_model(), primary.kv_caches, kv_cache_config.num_blocks * self.cache_config.block_size
        )

    def determine_available_memory(self) -> int:
        """The platform's answer, less what the decode lane's batch needs while a full prefill batch is live, the
        prefill lane's own workspace and the decode graphs captured per partition."""
        available = super().determine_available_memory()
        decode, workspace, graphs = (
            self._decode_batch_peak_bytes(), grow_prefill_workspace(self.model_runner), self._graph_bytes()
        )
        reserve = decode + workspace + graphs
        what = (f"decode batch {decode / 2**20:.1f}, prefill workspace {workspace / 2**20:.1f}, "
                f"partition decode graphs {graphs / 2**20:.1f} MiB")
        if self.cache_config.kv_cache_memory_bytes is not None:
            logger.info("RAPID: the lanes need ~%.1f MiB beside vLLM's own (%s; KV size was set explicitly)",
                        reserve / 2**20, what)
            return available
        logger.info("RAPID: reserving %.1f MiB for the lanes (%s)", reserve / 2**20, what)
        return max(available - reserve, 0)

    def _graph_bytes(self) -> int:
        if self.v2:
            return 0  # no per-partition decode graphs on the V2 runner yet (vllm_rapid/worker/decode_graphs.py)
        estimate = getattr(self, "cudagraph_memory_estimate", 0)  # vLLM's for its own graphs (GPU worker)
        return partition_graph_bytes(self.vllm_config, self.lane_control.backend, self.device, estimate)

    def compile_or_warm_up_model(self) -> Any:
        times = super().compile_or_warm_up_model()
        # After vLLM's own capture: the decode graphs once more per decode partition, on each partition's stream.
        graphs = DecodeGraphs(self.model_runner, self.lane_control.backend, self.rapid_config.eager_decode_partitions)
        graphs.capture(reserved_bytes=self._graph_bytes())
        self.lane_control.attach_decode_graphs(graphs)
        return times

    def _decode_batch_peak_bytes(self) -> int:
        probe = decode_batch_probe(self.model_runner, self.scheduler_config.max_num_seqs)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            probe()
            return torch.cuda.max_memory_allocated() - base
        import psutil

        before = psutil.Process().memory_info().rss
        probe()
        return max(psutil.Process().memory_info().rss - before, 0)

    # ---- the step ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        if not isinstance(scheduler_output, RapidSchedulerOutput):
            return super().execute_model(scheduler_output)
        self._prefill_drafts = None  # not taken after the step that collected them: that step ran no decode
        self._collect_prefill(timeout=0.0)
        if self._inflight is not None and self._inflight.batch_id <= scheduler_output.last_completed_prefill:
            # Tensor parallelism: the output rank's lane finished this batch first and the scheduler has its result;
            # this rank's lane is at most a moment behind (the batch's collectives tie them). Catch up, so every
            # rank's lanes run the same batches in the same order.
            self._collect_prefill(timeout=None)
        finished = self._finished_prefill
        if finished is not None and finished.batch_id <= scheduler_output.last_completed_prefill:
            # The scheduler has this batch's result from the output rank (this rank's lane finished it after its
            # last step ended, or just now): drop this rank's copy, the step may launch the next batch.
            self._finished_prefill = None
        self.lane_states.finish(scheduler_output.finished_req_ids)
        self.lane_states.preempt(scheduler_output.preempted_req_ids or ())
        self.prefill_encoder_cache.defer(scheduler_output.free_encoder_mm_hashes)
        if self._inflight is None:
            self.prefill_encoder_cache.release()  # before a launch: its batch may compute a freed entry again
        contexts = self.lane_control.contexts_for(scheduler_output)
        if scheduler_output.prefill is not None:
            self._launch_prefill(scheduler_output.prefill, contexts.prefill)
        self.lane_states.claim(self.model_runner, scheduler_output)
        decode_tokens = scheduler_output.total_num_scheduled_tokens
        decode_error = None
        step = self.decode_lane.submit(
            run_lane_step, self.model_runner, scheduler_output, scheduler_output.grammar, DECODE_WORKSPACE_LANE,
            label="decode" if decode_tokens else "idle", num_tokens=decode_tokens, context=contexts.decode,
        )
        try:
            output = step.result()
        except Exception as exc:  # noqa: BLE001 (a failed batch fails its requests, not the engine)
            decode_error = self._lane_failed("decode", exc, self.model_runner, scheduler_output.num_scheduled_tokens)
            output = EMPTY_MODEL_RUNNER_OUTPUT
        # No decode work: wait a little for the prefill instead of spinning the engine loop.
        self._collect_prefill(timeout=0.0 if decode_tokens else self.rapid_config.idle_wait_ms / 1000)
        finished, self._finished_prefill = self._finished_prefill, None
        assert step.event is not None  # set by the lane before the result
        return RapidModelRunnerOutput.wrap(
            output, finished_prefill=finished,
            decode_step_ms=step.event.elapsed_ms if decode_tokens and decode_error is None else None,
            arm_state=self.lane_control.state(), decode_error=decode_error,
        )

    def _launch_prefill(self, launch: PrefillLaunch, context: ContextFactory) -> None:
        if self._inflight is not None:
            raise RuntimeError(f"prefill batch {launch.batch_id} launched while {self._inflight.batch_id} runs")
        self.lane_states.launch(launch.scheduler_output)
        self._inflight = launch
        self._inflight_future = self.prefill_lane.submit(
            run_lane_step, self.prefill_runner, launch.scheduler_output, launch.grammar_output, PREFILL_WORKSPACE_LANE,
            label=f"prefill#{launch.batch_id}", num_tokens=launch.scheduler_output.total_num_scheduled_tokens,
            context=context,
        )

    def _collect_prefill(self, timeout: float | None) -> None:
        """If the prefill batch is done (waiting at most ``timeout`` s), park its states and keep its output."""
        future, launch = self._inflight_future, self._inflight
        if future is None:
            return
        assert launch is not None and self._finished_prefill is None
        req_ids = launch.scheduler_output.num_scheduled_tokens
        try:
            output = future.result(timeout=timeout)
        except FutureTimeout:
            return
        except Exception as exc:  # noqa: BLE001 (likewise)
            error = self._lane_failed(f"prefill batch {launch.batch_id}", exc, self.prefill_runner, req_ids)
            self._finished_prefill = PrefillResult(launch.batch_id, None, error=error)
        else:
            self._prefill_drafts = self.prefill_runner.take_draft_token_ids()  # the runner is idle now
            self.lane_states.park(req_ids)
            assert future.event is not None
            self._finished_prefill = PrefillResult(launch.batch_id, output, future.event.elapsed_ms)
        self._inflight, self._inflight_future = None, None

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """Drafts for the next step: the decode runner's, and those the prefill runner proposed with the first tokens
        of a batch it finished since (their first decode step verifies them, as after vLLM's own prefill step)."""
        drafts = [d for d in (self._prefill_drafts, self.model_runner.take_draft_token_ids()) if d is not None]
        self._prefill_drafts = None
        if not drafts:
            return None
        return DraftTokenIds([r for d in drafts for r in d.req_ids], [t for d in drafts for t in d.draft_token_ids])

    def _lane_failed(self, what: str, exc: Exception, runner: Any, req_ids: Any) -> str:
        """A lane's batch raised: drop its states so that only its requests fail, and say why.

        Only while the device still works: after a sticky device error every later batch would fail too, so the
        error propagates and stops the engine, as it does in vLLM's own step.
        """
        if self.parallel_config.world_size > 1:
            # The other ranks' lanes may be waiting in this batch's collectives: only stopping the engine is safe.
            raise exc
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 (any error here means the device is gone)
                raise exc from None
        logger.exception("RAPID: %s raised; failing its %d request(s), the lanes keep serving", what, len(req_ids))
        self.lane_states.drop(runner, req_ids)
        return f"{what} failed: {type(exc).__name__}: {exc}"

    # ---- introspection (collective_rpc) -------------------------------------------------------------------------

    def rapid_lane_events(self, clear: bool = False) -> list[dict[str, Any]]:
        """Recorded lane batches (``record_lane_events``), oldest first, as plain dicts."""
        events = sorted([*(self.decode_lane.events or ()), *(self.prefill_lane.events or ())], key=lambda e: e.start)
        if clear:
            for lane in (self.decode_lane, self.prefill_lane):
                if lane.events is not None:
                    lane.events.clear()
        return [dataclasses.asdict(e) for e in events]

    def rapid_arm_state(self) -> dict[str, Any]:
        """The split the lanes run on now and the ARM's reason for it."""
        state = self.lane_control.state()
        return {**dataclasses.asdict(state), "label": state.label}

    def rapid_lane_tp_groups(self) -> dict[str, str]:
        """The TP communicator each lane's collectives use, as seen from inside the lane's thread."""
        return {lane.name: lane.run(current_tp_group_name) for lane in (self.decode_lane, self.prefill_lane)}

    def rapid_encoder_cache_entries(self) -> dict[str, list[str]]:
        """The multimodal items whose encoder outputs each lane's runner holds (the decode runner's stay empty)."""
        return {"decode": sorted(encoder_outputs(self.model_runner)), "prefill": self.prefill_encoder_cache.entries()}

    def rapid_num_request_states(self) -> int:
        """Request states held by either runner or parked between them (0 when idle)."""
        return self.lane_states.num_states()

    # ---- encoder-cache resets, weight reloads, shutdown: each waits for the prefill lane ---------------------------

    def reset_encoder_cache(self) -> None:
        super().reset_encoder_cache()
        self._wait_for_prefill()
        self.prefill_encoder_cache.clear()  # the encoder outputs live in the prefill runner

    def reload_weights(self, *args: Any, **kwargs: Any) -> None:
        self._wait_for_prefill()  # never change the weights under a running prefill batch
        super().reload_weights(*args, **kwargs)  # resets the primary runner's encoder cache
        self.prefill_encoder_cache.clear()  # outputs of the old weights

    def _wait_for_prefill(self) -> None:
        """Until the prefill batch in flight (if any) is done; its result is still collected by the next step."""
        if self._inflight_future is not None:
            futures.wait([self._inflight_future])

    def shutdown(self) -> None:
        self._wait_for_prefill()  # drain: never tear down under a running prefill
        self.decode_lane.close()
        self.prefill_lane.close()
        self.lane_control.close()
        if self.prefill_tp_group is not None:
            self.prefill_tp_group.destroy()
        super().shutdown()
