"""The user-facing ways to pick and configure RAPID: ``--scheduler``, ``scheduler: rapid`` in a vLLM ``--config``
YAML, ``EngineArgs(scheduler=...)``, and RAPID's own options (``--additional-config``, YAML files, the env var).

No engine is started here: parsing and ``create_engine_config`` are what is checked, except for one real
``vllm serve --scheduler nope`` that must fail fast.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

from vllm_rapid.config import CONFIG_ENV, RapidConfig, RapidConfigError
from vllm_rapid.patch.engine_args import RAPID_WORKER
from vllm_rapid.policy import RAPID_SCHEDULER

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RAPID_YAML = EXAMPLES / "rapid.yaml"
RAPID_CONFIG_YAML = EXAMPLES / "rapid_config.yaml"

@pytest.fixture(scope="module")
def serve_parser():
    """The parser ``vllm serve`` uses, built the way vLLM's CLI main builds it (top parser + ``serve`` subparser)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    command = ServeSubcommand()
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    return parser


def parse_serve(parser, model: str, *options: str):
    args = parser.parse_args(["serve", model, *options])
    args.model = args.model_tag  # what ServeSubcommand.cmd does before building the engine args
    return args


@pytest.fixture(autouse=True)
def restore_environ():
    """create_engine_config for RAPID sets a few env defaults (VLLM_CPU_OMP_THREADS_BIND, ...): keep them here."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def no_rapid_env(monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)


# ---- (a) vllm serve --scheduler nope -----------------------------------------------------------------------------


def test_serve_unknown_scheduler_fails_fast(tiny_model):
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run(
        ["vllm", "serve", tiny_model, "--scheduler", "nope", "--port", "1"],
        check=False, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert "--scheduler" in proc.stderr
    assert "unknown scheduler 'nope'" in proc.stderr
    assert "valid schedulers: default, rapid" in proc.stderr
    assert "Traceback" not in proc.stderr  # an argparse error, not a crash


# ---- (b) the serve parser: --scheduler, --config YAML, --scheduler-cls --------------------------------------------


def test_config_yaml_with_scheduler_rapid(serve_parser, tiny_model, tmp_path):
    yaml_path = tmp_path / "serve.yaml"
    yaml_path.write_text("scheduler: rapid\nmax-model-len: 2048\n")
    args = parse_serve(serve_parser, tiny_model, "--config", str(yaml_path))
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.scheduler_cls == RAPID_SCHEDULER
    assert engine_args.max_model_len == 2048


def test_example_config_yaml(serve_parser, tiny_model):
    args = parse_serve(serve_parser, tiny_model, "--config", str(RAPID_YAML))
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.scheduler_cls == RAPID_SCHEDULER
    assert engine_args.max_model_len == 4096
    assert engine_args.kv_cache_memory_bytes == 256 << 20


def test_command_line_overrides_config_yaml(serve_parser, tiny_model):
    args = parse_serve(serve_parser, tiny_model, "--config", str(RAPID_YAML), "--scheduler", "default")
    assert AsyncEngineArgs.from_cli_args(args).scheduler_cls is None


def test_config_yaml_with_unknown_scheduler(serve_parser, tiny_model, tmp_path, capsys):
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text("scheduler: nope\n")
    with pytest.raises(SystemExit) as exc:
        parse_serve(serve_parser, tiny_model, "--config", str(yaml_path))
    assert exc.value.code != 0
    assert "valid schedulers: default, rapid" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--scheduler", "rapid"], RAPID_SCHEDULER),
        (["--scheduler", "default"], None),
        ([], None),
        (["--scheduler-cls", RAPID_SCHEDULER], RAPID_SCHEDULER),
        (["--scheduler-cls", "my_pkg.MyScheduler"], "my_pkg.MyScheduler"),
    ],
)
def test_scheduler_options(serve_parser, tiny_model, options, expected):
    args = parse_serve(serve_parser, tiny_model, *options)
    assert AsyncEngineArgs.from_cli_args(args).scheduler_cls == expected


def test_additional_config_on_command_line(serve_parser, tiny_model):
    args = parse_serve(
        serve_parser, tiny_model, "--scheduler", "rapid",
        "--additional-config", '{"rapid": {"itl_slo_ms": 50, "arm_policy": "static"}}',
    )
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config == {"rapid": {"itl_slo_ms": 50, "arm_policy": "static"}}


# ---- (c) EngineArgs(scheduler=...) --------------------------------------------------------------------------------


def test_engine_args_scheduler_name(tiny_model):
    assert EngineArgs(model=tiny_model, scheduler="rapid").scheduler_cls == RAPID_SCHEDULER
    assert AsyncEngineArgs(model=tiny_model, scheduler="rapid").scheduler_cls == RAPID_SCHEDULER
    assert EngineArgs(model=tiny_model, scheduler="default").scheduler_cls is None


def test_engine_args_unknown_scheduler(tiny_model):
    with pytest.raises(ValueError, match="valid schedulers: default, rapid") as exc:
        EngineArgs(model=tiny_model, scheduler="bogus")
    assert "bogus" in str(exc.value)


def test_engine_args_scheduler_and_scheduler_cls_conflict(tiny_model):
    with pytest.raises(ValueError, match="not both"):
        EngineArgs(model=tiny_model, scheduler="rapid", scheduler_cls=RAPID_SCHEDULER)


# ---- (d) RAPID options checked by create_engine_config ------------------------------------------------------------


def rapid_engine_config(model: str, additional_config=None):
    return EngineArgs(
        model=model, scheduler="rapid", load_format="dummy", dtype="float32", max_model_len=4096,
        kv_cache_memory_bytes=64 << 20, additional_config=additional_config or {},
    ).create_engine_config()


def test_create_engine_config_completes_rapid(tiny_model, no_rapid_env):
    config = rapid_engine_config(tiny_model, {"rapid": {"itl_slo_ms": 50}})
    assert config.scheduler_config.scheduler_cls == RAPID_SCHEDULER
    assert config.parallel_config.worker_cls == RAPID_WORKER
    assert RapidConfig.of(config).itl_slo_ms == 50.0


def test_bad_rapid_value(tiny_model, no_rapid_env):
    with pytest.raises(RapidConfigError, match="itl_slo_ms"):
        rapid_engine_config(tiny_model, {"rapid": {"itl_slo_ms": -1}})


def test_bad_rapid_value_type(tiny_model, no_rapid_env):
    with pytest.raises(RapidConfigError, match=r"arm_policy must be one of \['adaptive', 'full_overlap', 'static'\]"):
        rapid_engine_config(tiny_model, {"rapid": {"arm_policy": "greedy"}})


def test_unknown_rapid_key(tiny_model, no_rapid_env):
    with pytest.raises(RapidConfigError, match="itl_slo_msec") as exc:
        rapid_engine_config(tiny_model, {"rapid": {"itl_slo_msec": 50}})
    message = str(exc.value)
    assert "valid" in message
    for key in ("itl_slo_ms", "ttft_slo_ms", "arm_policy", "record_lane_events"):
        assert key in message


def test_default_scheduler_ignores_rapid_section(tiny_model, no_rapid_env):
    """RAPID options are only checked when RAPID runs."""
    config = EngineArgs(
        model=tiny_model, scheduler="default", load_format="dummy", dtype="float32", max_model_len=4096,
        kv_cache_memory_bytes=64 << 20, additional_config={"rapid": {"itl_slo_ms": -1}},
    ).create_engine_config()
    assert config.scheduler_config.scheduler_cls != RAPID_SCHEDULER


# ---- (e) RAPID options from YAML files ----------------------------------------------------------------------------


def test_example_rapid_config_yaml(tiny_model, no_rapid_env):
    config = rapid_engine_config(tiny_model, {"rapid": str(RAPID_CONFIG_YAML)})
    rapid = RapidConfig.of(config)
    assert rapid.itl_slo_ms == 100.0
    assert rapid.arm_policy == "adaptive"
    assert rapid.record_lane_events is False


def test_rapid_config_env_var(tiny_model, monkeypatch, tmp_path):
    path = tmp_path / "rapid.yaml"
    path.write_text("itl_slo_ms: 40\nidle_wait_ms: 5\n")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    config = rapid_engine_config(tiny_model, {"rapid": {"idle_wait_ms": 7}})  # additional_config wins per key
    rapid = RapidConfig.of(config)
    assert (rapid.itl_slo_ms, rapid.idle_wait_ms) == (40.0, 7.0)


def test_invalid_yaml_file(tiny_model, tmp_path, no_rapid_env):
    path = tmp_path / "bad.yaml"
    path.write_text("rapid:\n  itl_slo_ms: [1, 2\n")
    with pytest.raises(RapidConfigError, match="not valid YAML") as exc:
        rapid_engine_config(tiny_model, {"rapid": str(path)})
    assert str(path) in str(exc.value)


def test_yaml_file_with_bad_value(tiny_model, tmp_path, no_rapid_env):
    path = tmp_path / "bad_value.yaml"
    path.write_text("rapid:\n  itl_slo_ms: -5\n")
    with pytest.raises(RapidConfigError, match="itl_slo_ms must be > 0"):
        rapid_engine_config(tiny_model, {"rapid": str(path)})


def test_yaml_file_not_a_mapping(tiny_model, tmp_path, no_rapid_env):
    path = tmp_path / "list.yaml"
    path.write_text("- itl_slo_ms\n- 50\n")
    with pytest.raises(RapidConfigError, match="must be a mapping"):
        rapid_engine_config(tiny_model, {"rapid": str(path)})


def test_missing_yaml_file(tiny_model, tmp_path, no_rapid_env):
    path = tmp_path / "missing.yaml"
    with pytest.raises(RapidConfigError, match="cannot read RAPID config") as exc:
        rapid_engine_config(tiny_model, {"rapid": str(path)})
    assert str(path) in str(exc.value)


def test_rapid_section_of_wrong_type(tiny_model, no_rapid_env):
    with pytest.raises(RapidConfigError, match="must be a mapping or a YAML path"):
        rapid_engine_config(tiny_model, {"rapid": 5})


# ---- (f) a RAPID subclass by path, and options resolved once -----------------------------------------------------


def test_a_rapid_subclass_given_by_class_path_runs_as_rapid(tiny_model, no_rapid_env):
    """``--scheduler-cls pkg.MyRapidScheduler`` gets the lane worker, the RAPID settings and the metrics."""
    from vllm_rapid.policy import is_rapid

    path = "custom_scheduler.MyRapidScheduler"
    assert is_rapid(path) and not is_rapid("vllm.v1.core.sched.scheduler.Scheduler") and not is_rapid(None)
    config = EngineArgs(
        model=tiny_model, scheduler_cls=path, load_format="dummy", dtype="float32", max_model_len=4096,
        kv_cache_memory_bytes=64 << 20,
    ).create_engine_config()
    assert config.parallel_config.worker_cls == RAPID_WORKER
    assert config.scheduler_config.async_scheduling is False
    assert config.additional_config["rapid"] == RapidConfig().as_section()


def test_rapid_options_are_resolved_once_into_the_engine_config(tiny_model, monkeypatch, tmp_path):
    """Other processes (maybe on other nodes) read the options from the config, never the file or the env again."""
    path = tmp_path / "rapid.yaml"
    path.write_text("itl_slo_ms: 40\n")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    config = rapid_engine_config(tiny_model, {"rapid": {"idle_wait_ms": 7}})
    path.unlink()
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "not-on-this-node.yaml"))
    rapid = RapidConfig.of(config)
    assert (rapid.itl_slo_ms, rapid.idle_wait_ms) == (40.0, 7.0)
    assert config.additional_config["rapid"] == rapid.as_section()


def test_refused_features_name_themselves_and_why(tiny_model, no_rapid_env):
    """A start-up refusal says which feature and why (the README's support table lists the same)."""
    # Routed-experts output needs vLLM's V2 runner, which RAPID does not use: vLLM itself refuses it at start-up.
    with pytest.raises(ValueError, match=r"requires Model Runner V2"):
        EngineArgs(model=tiny_model, scheduler="rapid", load_format="dummy", dtype="float32", max_model_len=1024,
                   kv_cache_memory_bytes=16 << 20, enable_return_routed_experts=True).create_engine_config()
    with pytest.raises(ValueError, match=r"does not support --async-scheduling: its engine steps are synchronous"):
        EngineArgs(model=tiny_model, scheduler="rapid", load_format="dummy", async_scheduling=True,
                   kv_cache_memory_bytes=16 << 20).create_engine_config()
    with pytest.raises(ValueError, match=r"partition_layout='shared_pool' needs SM or CU partitions.*'threads'"):
        EngineArgs(model=tiny_model, scheduler="rapid", load_format="dummy", kv_cache_memory_bytes=16 << 20,
                   additional_config={"rapid": {"partition_layout": "shared_pool"}}).create_engine_config()
