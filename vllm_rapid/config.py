"""RapidConfig: every RAPID option in one typed object.

Sources, later ones overriding earlier ones: defaults, a YAML file named by ``VLLM_RAPID_CONFIG``, and vLLM's
``--additional-config '{"rapid": {...}}'`` (a mapping, or a path to a YAML file). Unknown keys and bad values fail
at start-up with a message that names the key and the accepted values.

The sources are read once, where the engine's config is built (``RapidConfig.resolve``); the resolved options
replace ``additional_config["rapid"]`` and travel to every process inside the vLLM config (``RapidConfig.of``), so
no other process reads the environment or a file (which may not exist on another node).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

PartitionBackendName = Literal["auto", "green_context", "cu_mask", "streams", "threads"]
ArmPolicyName = Literal["adaptive", "full_overlap", "static"]
PartitionLayoutName = Literal["disjoint", "shared_pool"]
DEFAULT_SHARED_POOL_FRACTION = 0.25

CONFIG_ENV = "VLLM_RAPID_CONFIG"
ADDITIONAL_CONFIG_KEY = "rapid"


class RapidConfigError(ValueError):
    """A RAPID option is unknown or has a bad value."""


@dataclass(frozen=True)
class RapidConfig:
    """Options of the RAPID scheduler, lanes and Adaptive Resource Manager."""

    # Service-level objectives the ARM steers by (milliseconds).
    itl_slo_ms: float = 100.0
    ttft_slo_ms: float = 2000.0
    # How compute is split between the lanes: "auto" picks green contexts on NVIDIA, CU masks on AMD,
    # plain streams on other GPUs and threads on CPU.
    partition_backend: PartitionBackendName = "auto"
    # "adaptive": the ARM sizes the decode partition from the profile; "full_overlap": both lanes always
    # on the whole device; "static": decode always gets ``static_decode_fraction`` of the device.
    # How the partitions lie (GPUs): "disjoint" (decode some SMs/CUs, prefill the rest) or "shared_pool" (each lane
    # a reserved floor plus a pool of ``shared_pool_fraction`` of the device that both may use, decode at the higher
    # stream priority). Either way the full split (both lanes on the whole device) is offered too.
    partition_layout: PartitionLayoutName = "disjoint"
    shared_pool_fraction: float = DEFAULT_SHARED_POOL_FRACTION
    arm_policy: ArmPolicyName = "adaptive"
    static_decode_fraction: float = 0.5
    # Profile table written by ``vllm-rapid profile``; without one the ARM uses a roofline estimate.
    profile_path: str | None = None
    # Prompts longer than this many tokens are prefilled in chunks (None: the engine's
    # max_num_batched_tokens), so one prefill batch never exceeds the lane's buffers.
    prefill_chunk_tokens: int | None = None
    # Hysteresis of the ARM: a new split must win this many consecutive decisions before it is applied.
    arm_hysteresis_steps: int = 3
    # While the prefill lane runs and no decode work exists, the engine step waits at most this long
    # for the prefill, so new requests and aborts keep flowing.
    idle_wait_ms: float = 20.0
    # Keep per-lane timestamps of every batch (tests, the demo and benchmarks read them).
    record_lane_events: bool = False
    # Unseeded random sampling gives the same samples on every run with the same engine seed, as with vLLM's own
    # scheduler: each such request gets a generator seeded from the engine's seed and its arrival order (vLLM's
    # seeded path; on a GPU that costs a small kernel per random-sampled request per step).
    reproducible_sampling: bool = True
    # On a GPU whose decode runs without CUDA graphs (--enforce-eager, or a cudagraph mode without FULL decode graphs),
    # offer the SM partitions to the ARM anyway. Off by default: eager decode on a small partition queues its many
    # kernel launches behind that partition and starves. With graphs, only partitions with captured decode graphs are
    # offered; CPU threads are unaffected.
    eager_decode_partitions: bool = False
    # Check the scheduler's request-lifecycle invariants after every step (tests turn it on; costs a pass over the
    # running requests per step).
    debug_invariants: bool = False

    def __post_init__(self) -> None:
        for name in ("itl_slo_ms", "ttft_slo_ms", "idle_wait_ms"):
            if getattr(self, name) <= 0:
                raise RapidConfigError(f"rapid.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 < self.static_decode_fraction < 1.0:
            raise RapidConfigError(
                f"rapid.static_decode_fraction must be in (0, 1), got {self.static_decode_fraction!r}"
            )
        if not 0.0 < self.shared_pool_fraction < 1.0:
            raise RapidConfigError(
                f"rapid.shared_pool_fraction must be in (0, 1), got {self.shared_pool_fraction!r}"
            )
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise RapidConfigError(f"rapid.prefill_chunk_tokens must be >= 1, got {self.prefill_chunk_tokens!r}")
        if self.arm_hysteresis_steps < 1:
            raise RapidConfigError(f"rapid.arm_hysteresis_steps must be >= 1, got {self.arm_hysteresis_steps!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> RapidConfig:
        """Build from a mapping, checking key names and value types."""
        if values is not None and not isinstance(values, dict):
            raise RapidConfigError(
                f"additional_config['{ADDITIONAL_CONFIG_KEY}'] must be a mapping or a YAML path, "
                f"got {type(values).__name__}"
            )
        values = dict(values or {})
        types = _field_types()
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise RapidConfigError(f"unknown rapid option(s) {unknown}; valid: {sorted(types)}")
        return cls(**{k: _coerce(k, v, types[k]) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> RapidConfig:
        """Load a YAML mapping of RAPID options (optionally nested under a top-level ``rapid:`` key)."""
        data = read_yaml(path, "RAPID config", RapidConfigError)
        if isinstance(data, dict) and set(data) == {ADDITIONAL_CONFIG_KEY}:
            data = data[ADDITIONAL_CONFIG_KEY]
        if data is not None and not isinstance(data, dict):
            raise RapidConfigError(f"RAPID config {path} must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def of(cls, vllm_config: Any) -> RapidConfig:
        """The options a vLLM config carries (resolved when the engine's config was built; never re-read from the
        environment here)."""
        section = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if isinstance(section, (str, os.PathLike)):
            return cls.from_yaml(section)  # a config built by hand, not through EngineArgs
        return cls.from_dict(section)

    def as_section(self) -> dict[str, Any]:
        """The resolved options as ``additional_config["rapid"]``."""
        return dataclasses.asdict(self)

    @classmethod
    def resolve(cls, additional_config: dict[str, Any] | None = None) -> RapidConfig:
        """Merge the env-named YAML file and vLLM's additional_config (the latter wins key by key)."""
        merged: dict[str, Any] = {}
        if env_path := os.environ.get(CONFIG_ENV):
            merged.update(_nondefault(cls.from_yaml(env_path)))
        section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if isinstance(section, (str, os.PathLike)):
            merged.update(_nondefault(cls.from_yaml(section)))
        elif isinstance(section, dict):
            merged.update(section)
        elif section is not None:
            raise RapidConfigError(
                f"additional_config['{ADDITIONAL_CONFIG_KEY}'] must be a mapping or a YAML path, "
                f"got {type(section).__name__}"
            )
        return cls.from_dict(merged)


def _field_types() -> dict[str, Any]:
    hints = get_type_hints(RapidConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RapidConfig)}


def _nondefault(config: RapidConfig) -> dict[str, Any]:
    default = RapidConfig()
    return {k: getattr(config, k) for k in _field_types() if getattr(config, k) != getattr(default, k)}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against the field's annotation; ints are accepted for floats."""
    options = get_args(annotation)
    if getattr(annotation, "__origin__", None) is Literal:
        if value not in options:
            raise RapidConfigError(f"rapid.{key} must be one of {list(options)}, got {value!r}")
        return value
    allowed = tuple(t for t in (options or (annotation,)) if isinstance(t, type))
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in allowed:
        raise RapidConfigError(f"rapid.{key} must be {_names(allowed)}, got {value!r}")
    if not isinstance(value, allowed):
        raise RapidConfigError(f"rapid.{key} must be {_names(allowed)}, got {value!r}")
    return value


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def read_yaml(path: str | os.PathLike[str], what: str, error: type[Exception]) -> Any:
    """Parse ``path`` (RAPID options, ARM profiles); a missing file or bad syntax raises ``error`` saying which
    ``what`` it was."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {exc}") from exc
