"""What ``--scheduler`` names, and which vLLM features a RAPID engine refuses at start-up: RAPID's policy, which
``vllm_rapid.patch.engine_args`` applies to vLLM's configuration (the README's support table lists the same)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SCHEDULERS: dict[str, str | None] = {
    "default": None,
    "rapid": "vllm_rapid.core.scheduler.RapidScheduler",
}
RAPID_SCHEDULER = SCHEDULERS["rapid"]


class UnknownSchedulerError(ValueError):
    """The scheduler name is not one of SCHEDULERS."""


def resolve_scheduler(name: str) -> str | None:
    """Map a scheduler name to vLLM's ``scheduler_cls`` value (None: vLLM's own)."""
    if name not in SCHEDULERS:
        raise UnknownSchedulerError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def is_rapid(scheduler_cls: Any) -> bool:
    """True for the rapid scheduler, given as a class or a class path (a subclass of it counts, either way)."""
    if scheduler_cls is None:
        return False
    if isinstance(scheduler_cls, str):
        if scheduler_cls == RAPID_SCHEDULER:
            return True
        if "." not in scheduler_cls:
            return False
        from vllm.utils.import_utils import resolve_obj_by_qualname

        scheduler_cls = resolve_obj_by_qualname(scheduler_cls)  # vLLM imports it the same way in the engine core
    from vllm_rapid.core.scheduler import RapidScheduler

    return isinstance(scheduler_cls, type) and issubclass(scheduler_cls, RapidScheduler)


@dataclass(frozen=True)
class Refusal:
    """A vLLM feature RAPID refuses at start-up, and why (the README's support table lists the same)."""

    feature: str
    applies: Callable[[Any], bool]  # of the engine's VllmConfig
    reason: str


def _spec_method(config: Any) -> str | None:
    return None if config.speculative_config is None else config.speculative_config.method


REFUSALS: tuple[Refusal, ...] = (
    Refusal("pipeline parallelism (--pipeline-parallel-size > 1)",
            lambda c: c.parallel_config.pipeline_parallel_size > 1,
            "each stage's two lanes would need a pipeline communicator each, and vLLM keeps one batch per stage in "
            "flight, which RAPID's step protocol does not model yet (designed in the README, not built)"),
    Refusal("data parallelism with a mixture-of-experts model",
            lambda c: c.parallel_config.data_parallel_size > 1 and bool(getattr(c.model_config, "is_moe", False)),
            "MoE layers synchronize every forward pass across the data-parallel ranks; two lanes on each rank would "
            "interleave those collectives (dense models run with data parallelism)"),
    Refusal("dual-batch overlap (--enable-dbo)", lambda c: bool(getattr(c.parallel_config, "enable_dbo", False)),
            "DBO splits one batch into micro-batches on streams of its own; RAPID's lanes already own the streams"),
    Refusal("speculative decoding other than n-gram", lambda c: _spec_method(c) not in (None, "ngram"),
            "a draft model (EAGLE, MTP, draft_model, Medusa) needs its own KV cache and the target's hidden states, "
            "which the prefill lane would hand to the decode lane with the first token (designed, not built)"),
    Refusal("KV transfer connectors", lambda c: c.kv_transfer_config is not None,
            "a connector saves and loads a request's KV at the steps vLLM schedules it; a RAPID prefill batch spans "
            "several engine steps, so its save points are not vLLM's"),
    Refusal("LoRA adapters", lambda c: c.lora_config is not None,
            "vLLM keeps the active adapters' index mapping (the punica wrapper) in the model's layers, which both "
            "lanes share: two batches with different adapters at once would overwrite each other's mapping"),
    Refusal("encoder-decoder models (e.g. Whisper)", lambda c: bool(c.model_config.is_encoder_decoder),
            "their encoder output fills cross-attention KV through vLLM's encoder-decoder cache manager, which "
            "RAPID's two passes were not built for (decoder-only multimodal models work)"),
    Refusal("encoder-cache transfer connectors (--ec-transfer-config)", lambda c: c.ec_transfer_config is not None,
            "a connector saves and loads encoder outputs at the steps vLLM schedules them; RAPID's live in the "
            "prefill lane's runner, whose batches span several engine steps"),
    Refusal("custom encoder cache managers",
            lambda c: getattr(getattr(c, "ec_manager_config", None), "encoder_cache_manager_cls", None) is not None,
            "RAPID frees and forgets entries of vLLM's own EncoderCacheManager across its two scheduling passes; a "
            "custom manager's bookkeeping and worker metadata were not built for them"),
    Refusal("hybrid (Mamba, linear-attention) models", lambda c: bool(getattr(c.model_config, "is_hybrid", False)),
            "the recurrent state would move with the request like its KV blocks, but vLLM's state-cache modes align "
            "chunks to blocks and copy states between steps (designed, not built)"),
)


def check_rapid_config(config: Any) -> None:
    """Refuse, with a clear message naming each feature and why, configurations the lanes do not support."""
    refused = [f"{r.feature}: {r.reason}" for r in REFUSALS if r.applies(config)]
    if refused:
        raise ValueError("--scheduler rapid does not support " + "; ".join(refused))
