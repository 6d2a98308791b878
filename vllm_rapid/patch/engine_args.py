"""``--scheduler {default,rapid}``, ``scheduler: rapid`` in YAML configs, and ``LLM(model, scheduler="rapid")``.

vLLM has ``scheduler_cls`` (a class path); users want a name. Three narrow patches on ``EngineArgs`` add it:

* ``__init__`` accepts ``scheduler=NAME`` (``LLM(**kwargs)`` builds EngineArgs before plugins load, which is why
  the package's start-up hook applies these patches as soon as vLLM's arg_utils is imported);
* ``add_cli_args`` adds the exact option ``--scheduler`` (today only a prefix of ``--scheduler-cls``), which vLLM's
  ``--config`` YAML loader turns ``scheduler: rapid`` into;
* ``create_engine_config`` completes a RAPID configuration: the version gate, the RAPID options resolved once, the
  lane worker, synchronous engine steps, and a clear error for each feature the lanes do not support yet
  (``vllm_rapid.policy``).
"""

from __future__ import annotations

import argparse
import functools
import os
from types import ModuleType
from typing import Any

from vllm_rapid.config import ADDITIONAL_CONFIG_KEY, RapidConfig
from vllm_rapid.patch.internals import require_vllm_internals
from vllm_rapid.patch.registry import Stage
from vllm_rapid.patch.versions import require_supported_vllm
from vllm_rapid.policy import SCHEDULERS, UnknownSchedulerError, check_rapid_config, is_rapid, resolve_scheduler

RAPID_WORKER = "vllm_rapid.worker.lane_worker.RapidWorker"
_PATCHED = "_vllm_rapid_patched"


def patch_engine_args(arg_utils: ModuleType) -> None:
    """Apply the three patches to a loaded ``vllm.engine.arg_utils`` (idempotent)."""
    engine_args = arg_utils.EngineArgs
    if getattr(engine_args, _PATCHED, False):
        return
    for cls in (engine_args, arg_utils.AsyncEngineArgs):
        cls.__init__ = _accept_scheduler_name(cls.__init__)
    engine_args.add_cli_args = staticmethod(_add_scheduler_option(engine_args.add_cli_args))
    engine_args.create_engine_config = _complete_rapid_config(engine_args.create_engine_config)
    setattr(engine_args, _PATCHED, True)


def _accept_scheduler_name(init):
    @functools.wraps(init)
    def __init__(self, *args: Any, scheduler: str | None = None, **kwargs: Any) -> None:
        if scheduler is not None:
            if kwargs.get("scheduler_cls") is not None:
                raise ValueError("pass either scheduler= (a name) or scheduler_cls= (a class path), not both")
            kwargs["scheduler_cls"] = resolve_scheduler(scheduler)
        init(self, *args, **kwargs)

    return __init__


def _scheduler_name(name: str) -> str | None:
    try:
        return resolve_scheduler(name)
    except UnknownSchedulerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_scheduler_option(add_cli_args):
    @functools.wraps(add_cli_args)
    def add_cli_args_with_scheduler(parser, *args: Any, **kwargs: Any):
        parser = add_cli_args(parser, *args, **kwargs)
        if "--scheduler" in parser._option_string_actions:
            return parser
        group = next((g for g in parser._action_groups if g.title == "SchedulerConfig"), parser)
        group.add_argument(
            "--scheduler",
            dest="scheduler_cls",
            type=_scheduler_name,
            default=argparse.SUPPRESS,
            metavar="{" + ",".join(SCHEDULERS) + "}",
            help="Scheduler by name: 'rapid' runs prefill and decode as concurrent lanes sharing one KV cache "
            "(vllm-rapid); 'default' is vLLM's own. Shorthand for --scheduler-cls.",
        )
        return parser

    return add_cli_args_with_scheduler


def _complete_rapid_config(create_engine_config):
    @functools.wraps(create_engine_config)
    def create_engine_config_with_rapid(self, *args: Any, **kwargs: Any):
        if not is_rapid(self.scheduler_cls):
            return create_engine_config(self, *args, **kwargs)
        require_supported_vllm()
        require_vllm_internals(Stage.ENGINE_ARGS)
        rapid = RapidConfig.resolve(self.additional_config)  # bad RAPID options fail here, before any process
        prepare_rapid_engine(self, rapid)
        config = create_engine_config(self, *args, **kwargs)
        check_rapid_config(config)
        return config

    return create_engine_config_with_rapid


def prepare_rapid_engine(engine_args: Any, rapid: RapidConfig) -> None:
    """Settings RAPID needs before vLLM derives the rest of its configuration from them, and the RAPID options
    resolved once, for every process (``RapidConfig.of``)."""
    additional = dict(engine_args.additional_config or {})
    additional[ADDITIONAL_CONFIG_KEY] = rapid.as_section()
    engine_args.additional_config = additional
    if engine_args.worker_cls not in ("auto", RAPID_WORKER):
        raise ValueError(
            f"--scheduler rapid runs its own worker ({RAPID_WORKER}); it cannot be combined with "
            f"--worker-cls {engine_args.worker_cls}"
        )
    engine_args.worker_cls = RAPID_WORKER
    if engine_args.async_scheduling:
        raise ValueError(
            "--scheduler rapid does not support --async-scheduling: its engine steps are synchronous (the decode "
            "lane's steps would be scheduled one step ahead with placeholder tokens while the prefill lane runs "
            "across steps: designed in the README, not built); drop --async-scheduling"
        )
    engine_args.async_scheduling = False  # the prefill lane is the overlap; engine steps stay synchronous
    _unbind_cpu_omp_threads()
    _check_cpu_layout(rapid)


def _env_default(name: str, value: str) -> str:
    """Set an environment default for this process and the engine processes it starts; returns the value in force.

    vLLM caches its environment variables once an engine has started in this process (``vllm.envs``); an engine
    started before this one (another ``LLM`` in the same program) would leave the cache holding the old value, so
    the cache is reset: vLLM fills it again when this engine starts.
    """
    import vllm.envs as envs

    current = os.environ.setdefault(name, value)
    if envs._is_envs_cache_enabled() and getattr(envs, name) != current:
        envs.disable_envs_cache()
    return current


def _check_cpu_layout(rapid: RapidConfig) -> None:
    """On CPU the lanes are thread teams: a layout they cannot have fails here, before any process starts."""
    from vllm.platforms import current_platform

    from vllm_rapid.lanes.partition.select import check_layout

    if current_platform.is_cpu():
        check_layout("threads" if rapid.partition_backend == "auto" else rapid.partition_backend,
                     rapid.partition_layout)


def _unbind_cpu_omp_threads() -> None:
    """On CPU the lanes are two threads each running OpenMP regions; vLLM's per-rank OpenMP core binding
    (OMP_PLACES + OMP_PROC_BIND) corrupts the heap when two teams run at once, so RAPID asks for none."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    bind = _env_default("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if bind != "nobind":
        raise ValueError(
            f"--scheduler rapid on CPU runs two OpenMP lanes and needs VLLM_CPU_OMP_THREADS_BIND=nobind, got {bind!r}"
        )
