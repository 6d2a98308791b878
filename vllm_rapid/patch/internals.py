"""The vLLM internals RAPID relies on, checked at start-up so that a vLLM that moved them fails with one clear
message before serving, never mid-serve.

RapidScheduler subclasses vLLM's Scheduler and RapidWorker the platform's worker; they override and call methods
that are not public API. Each entry below names one, with the parameters RAPID passes, the instance attributes it
reads, or the calls inside it that RAPID's override relies on. ``tests/test_vllm_internals.py`` runs every check
against the installed vLLM; the engine core and the worker run theirs when they start.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_rapid.patch.registry import Stage
from vllm_rapid.patch.versions import UnsupportedVllmError, vllm_in


@dataclass(frozen=True)
class Internal:
    """One thing RAPID uses: ``owner`` ("module:Class" or "module:function") and optionally one of its methods."""

    stage: Stage
    owner: str
    method: str | None = None
    params: tuple[str, ...] = ()  # parameters the signature must have (RAPID passes them by name)
    assigns: tuple[str, ...] = ()  # instance attributes the class's code must assign (RAPID reads or swaps them)
    uses: tuple[str, ...] = ()  # names the method's code must use (behaviour RAPID's override relies on)
    # The vLLM releases the entry is about ("0.34": from 0.34.0 on; before: up to, not including, that release).
    since: str | None = None
    before: str | None = None

    @property
    def applies(self) -> bool:
        """Whether the installed vLLM is one of the releases this entry is about."""
        return vllm_in(self.since, self.before)

    @property
    def label(self) -> str:
        return self.owner + (f".{self.method}" if self.method else "")


_SCHED = "vllm.v1.core.sched.scheduler:Scheduler"
_KV = "vllm.v1.core.kv_cache_manager:KVCacheManager"
_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_WORKER = "vllm.v1.worker.gpu_worker:Worker"
E, W, C = Stage.ENGINE_CORE, Stage.WORKER, Stage.CPU_WORKER

INTERNALS: tuple[Internal, ...] = (
    # RAPID's environment defaults must reach vLLM even after an earlier engine cached vLLM's environment.
    Internal(Stage.ENGINE_ARGS, "vllm.envs:_is_envs_cache_enabled"),
    Internal(Stage.ENGINE_ARGS, "vllm.envs:disable_envs_cache"),
    # The scheduler runs vLLM's own pass once per lane over swapped queues and budgets.
    Internal(E, _SCHED, assigns=("running", "waiting", "kv_holding_waiting", "max_num_scheduled_tokens",
                                 "max_num_active_reqs", "policy", "requests",
                                 "kv_cache_manager", "finished_req_ids", "structured_output_manager",
                                 "kv_cache_config", "prefill_capacity_bound")),
    # Version differences (vllm_rapid/core/compat.py): each lane's pass has its own "scheduled last step" set (the
    # V1 runner's, gone in 0.34); 0.34's third waiting queue, which the decode pass empties too; 0.33's local
    # prefill cadence, which RAPID applies per engine step instead of per pass.
    Internal(E, _SCHED, assigns=("prev_step_scheduled_req_ids",), before="0.34"),
    Internal(E, _SCHED, assigns=("async_kv_waiting",), since="0.34"),
    Internal(E, _SCHED, assigns=("local_prefill_interval", "num_executed_steps", "last_prefill_step"),
             since="0.33"),
    Internal(E, _SCHED, "schedule", uses=("local_prefill_interval", "num_executed_steps", "last_prefill_step"),
             since="0.33"),
    Internal(E, "vllm.v1.outputs:ModelRunnerOutput", params=("req_id_to_index",), before="0.34"),
    # Cross-lane preemption: vLLM asks _request_blocks_can_be_freed of the victim it picked before preempting it.
    Internal(E, _SCHED, "schedule", params=("throttle_prefills",), uses=("_request_blocks_can_be_freed",
                                                                         "_preempt_request")),
    Internal(E, _SCHED, "_request_blocks_can_be_freed", params=("request",)),
    Internal(E, _SCHED, "_preempt_request", params=("request", "timestamp", "drop_stale_output")),
    Internal(E, _SCHED, "reset_prefix_cache", params=("reset_running_requests", "reset_connector")),
    Internal(E, _SCHED, "has_requests"),
    Internal(E, _SCHED, "add_request", params=("request",)),
    Internal(E, _KV, "evict_blocks", params=("block_ids",)),
    Internal(E, _KV, "get_block_ids", params=("request_id",)),
    Internal(E, _SCHED, "update_from_output", params=("scheduler_output", "model_runner_output"),
             uses=("make_stats",)),  # registry: one-stats-record-per-step
    Internal(E, _SCHED, "get_grammar_bitmask", params=("scheduler_output",)),
    Internal(E, _SCHED, "make_stats"),
    Internal(E, _SCHED, "finish_requests", params=("request_ids", "finished_status")),
    Internal(E, _SCHED, "_free_request_blocks", params=("request",)),
    Internal(E, _KV, "allocate_slots", params=("delay_cache_blocks",)),  # registry: deferred publication
    Internal(E, _KV, "cache_blocks", params=("request", "num_computed_tokens")),
    Internal(E, _KV, "free", params=("request",)),
    Internal(E, "vllm.v1.core.sched.request_queue:create_request_queue"),
    Internal(E, "vllm.v1.engine.core:compute_iteration_details"),
    Internal(E, "vllm.v1.core.sched.request_queue:RequestQueue", "prepend_requests"),
    # Multimodal models (vllm_rapid/core/encoder_inputs.py): both passes share vLLM's encoder cache manager, whose
    # eviction a failed prefill batch's entries go through; the encoder fields of the scheduler's output.
    Internal(E, _SCHED, assigns=("encoder_cache_manager",)),
    Internal(E, "vllm.v1.core.encoder_cache_manager:EncoderCacheManager",
             assigns=("cached", "freeable", "num_embeds_by_hash", "num_free_slots", "freed")),
    Internal(E, "vllm.v1.core.sched.output:SchedulerOutput",
             params=("scheduled_encoder_inputs", "free_encoder_mm_hashes")),
    Internal(E, "vllm.v1.request:Request", assigns=("mm_features",)),
    Internal(E, "vllm.multimodal.inputs:MultiModalFeatureSpec", params=("identifier", "mm_position")),
    # The worker builds a second runner of the platform's class and moves request state between the two.
    Internal(W, _RUNNER, "execute_model", params=("scheduler_output",)),
    Internal(W, _RUNNER, "sample_tokens", params=("grammar_output",)),
    Internal(W, _RUNNER, "initialize_kv_cache", params=("kv_cache_config",)),
    Internal(W, _RUNNER, "initialize_kv_cache_tensors"),  # registry: shared-kv-tensors
    Internal(W, _RUNNER, "_dummy_run", params=("num_tokens", "uniform_decode", "is_profile", "cudagraph_runtime_mode",
                                               "skip_eplb")),
    Internal(W, _RUNNER, "get_model"),
    Internal(W, _RUNNER, "take_draft_token_ids"),
    Internal(W, _WORKER, "take_draft_token_ids"),
    Internal(W, _RUNNER, assigns=("requests", "input_batch", "kv_caches", "cudagraph_dispatcher",
                                  "execute_model_state", "compilation_config", "model", "model_config",
                                  "max_num_reqs", "max_num_tokens")),
    Internal(W, _WORKER, assigns=("model_runner", "device", "local_rank", "cudagraph_memory_estimate")),
    # The prefill runner holds the encoder outputs (vllm_rapid/worker/encoder_cache.py); the worker's encoder-cache
    # reset and weight reload clear its cache too.
    Internal(W, _RUNNER, assigns=("encoder_cache",)),
    Internal(W, _WORKER, "reset_encoder_cache"),
    Internal(W, _WORKER, "reload_weights"),
    *(Internal(W, _WORKER, name) for name in ("init_device", "load_model", "initialize_from_config",
                                              "determine_available_memory", "compile_or_warm_up_model",
                                              "execute_model", "shutdown")),
    # registry: lane-stream-sync (vLLM's device sync, called after host copies of prompt logprobs and pooling)
    Internal(W, _RUNNER, "_sync_device"),
    # registry: two-workspace-lanes (vLLM's GPU worker sizes its workspace manager with it; lanes are a ContextVar)
    Internal(W, "vllm.v1.worker.gpu_worker:_num_workspace_lanes", params=("vllm_config", "use_v2_model_runner")),
    Internal(W, "vllm.v1.worker.gpu_worker:Worker", "_init_workspace_and_model_runner",
             uses=("init_workspace_manager", "_num_workspace_lanes")),
    Internal(W, "vllm.v1.worker.workspace:use_workspace_lane", params=("lane",)),
    Internal(W, "vllm.v1.worker.workspace:is_workspace_manager_initialized"),
    # registry: partition-decode-graphs. The FULL wrapper replays (or captures into) the entry of the step's
    # descriptor in the dict it holds; the decode graphs are captured with vLLM's own loop and scope, and each step
    # asks the runner which graph its batch will dispatch to.
    Internal(W, "vllm.compilation.cuda_graph:CUDAGraphWrapper", assigns=("concrete_cudagraph_entries", "runtime_mode")),
    Internal(W, "vllm.compilation.cuda_graph:CUDAGraphWrapper", "__call__",
             uses=("concrete_cudagraph_entries", "validate_cudagraph_capturing_enabled", "replay")),
    Internal(W, _RUNNER, "_capture_cudagraphs", params=("batch_descriptors", "cudagraph_runtime_mode")),
    Internal(W, _RUNNER, "_determine_batch_execution_and_padding",
             params=("num_tokens", "num_reqs", "num_scheduled_tokens_np", "max_num_scheduled_tokens")),
    Internal(W, _RUNNER, "_freeze_gc"),
    Internal(W, "vllm.v1.cudagraph_dispatcher:CudagraphDispatcher", "get_capture_descs"),
    Internal(W, "vllm.v1.cudagraph_dispatcher:CudagraphDispatcher", "initialize_cudagraph_keys",
             params=("cudagraph_mode", "uniform_decode_query_len")),
    Internal(W, "vllm.v1.cudagraph_dispatcher:CudagraphDispatcher", assigns=("uniform_decode_query_len",)),
    Internal(W, "vllm.compilation.monitor:set_cudagraph_capturing_enabled"),
    Internal(W, "vllm.distributed.parallel_state:graph_capture", params=("device",)),
    # Code-swapped by the thread-local patches, which check the globals they are about when they apply.
    Internal(W, "vllm.forward_context:get_forward_context"),
    Internal(W, "vllm.forward_context:override_forward_context"),
    Internal(W, "vllm.distributed.parallel_state:get_tp_group"),
    Internal(W, "vllm.distributed.parallel_state:init_model_parallel_group",
             params=("group_ranks", "local_rank", "backend", "group_name")),
    Internal(C, "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl", "forward"),
    Internal(C, "vllm._custom_ops:_supports_onednn"),
    Internal(C, _RUNNER, assigns=("discard_request_mask",)),
    Internal(C, "vllm.v1.worker.gpu_input_batch:InputBatch", assigns=("generators",)),
    Internal(C, "vllm.v1.worker.gpu_input_batch:InputBatch", "num_reqs"),
)


def _resolve(owner: str) -> Any:
    module, _, name = owner.partition(":")
    return getattr(importlib.import_module(module), name)


def _source(obj: Any) -> str:
    """The source of ``obj`` and of its vLLM base classes (attributes may be assigned in a base)."""
    classes = [c for c in inspect.getmro(obj) if c.__module__.startswith("vllm.")] if inspect.isclass(obj) else [obj]
    return "\n".join(inspect.getsource(c) for c in classes)


def problems(internal: Internal) -> list[str]:
    """What is missing of ``internal`` in the installed vLLM (empty: all there)."""
    try:
        obj = _resolve(internal.owner)
        if internal.method is not None:
            obj = getattr(obj, internal.method)
    except (ImportError, AttributeError) as exc:
        return [f"{internal.label} is missing ({exc})"]
    found: list[str] = []
    if internal.params:
        params = inspect.signature(obj).parameters
        found += [f"{internal.label} has no parameter {p!r}" for p in internal.params if p not in params]
    if internal.assigns:
        source = _source(obj)
        found += [f"{internal.label} no longer sets self.{a}" for a in internal.assigns
                  if not re.search(rf"self\.{a}\s*(:[^=\n]+)?=", source)]
    if internal.uses:
        code: Callable[..., Any] = inspect.unwrap(obj)
        names = set(code.__code__.co_names)
        found += [f"{internal.label} no longer uses {u!r}" for u in internal.uses if u not in names]
    return found


def require_vllm_internals(*stages: Stage) -> None:
    """Raise one clear error naming every internal of ``stages`` that the installed vLLM lacks."""
    missing = [p for internal in INTERNALS if internal.stage in stages and internal.applies for p in problems(internal)]
    if missing:
        raise UnsupportedVllmError(
            "this vLLM lacks internals vllm-rapid relies on (update vllm-rapid for it): " + "; ".join(missing)
        )
