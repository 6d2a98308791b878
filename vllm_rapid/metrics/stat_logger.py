"""RAPID's Prometheus metrics on vLLM's ``/metrics``: a ``vllm.stat_logger_plugins`` logger in the API server.

It reads the lane stats the scheduler sends each step (``lane_stats.LaneStats``) and vLLM's own per-iteration latencies,
and exports (labels ``model_name`` and ``engine``, as vLLM's metrics):

* queue depths: requests waiting for prefill, in the decode batch, in the running prefill batch (and its tokens);
* the partition: compute units of each lane, the decode share, and the ARM's reason (one 0/1 series per reason);
* per-lane step time (a histogram with label ``lane``);
* SLO attainment against ``rapid.ttft_slo_ms`` / ``rapid.itl_slo_ms``: first tokens, inter-token gaps and finished
  requests (both SLOs: goodput) counted as met or missed;
* requests failed because their lane's batch raised.

Names start with ``vllm_rapid:`` (vLLM clears every ``vllm:`` collector when its own logger starts). The logger is
inert unless the engine runs the RAPID scheduler. ``examples/grafana/vllm-rapid.json`` is a dashboard of these.
"""

from __future__ import annotations

from typing import Any

import prometheus_client
from vllm.config import VllmConfig
from vllm.v1.engine import FinishReason
from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_rapid.config import RapidConfig
from vllm_rapid.lanes.arm import ArmReason
from vllm_rapid.lanes.lane import LaneName
from vllm_rapid.metrics.lane_stats import LaneStats
from vllm_rapid.policy import is_rapid

LABELS = ("model_name", "engine")
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMPLETED = (FinishReason.STOP, FinishReason.LENGTH)


def _gauge(name: str, doc: str, *extra: str) -> prometheus_client.Gauge:
    return prometheus_client.Gauge(name, doc, labelnames=(*LABELS, *extra), multiprocess_mode="mostrecent")


def _counter(name: str, doc: str, *extra: str) -> prometheus_client.Counter:
    return prometheus_client.Counter(name, doc, labelnames=(*LABELS, *extra))


class _Families:
    """The metric families, registered once per process (one logger per engine shares them by label)."""

    def __init__(self) -> None:
        g, c = _gauge, _counter
        self.prefill_queue = g("vllm_rapid:prefill_queue_requests", "Requests waiting for (the rest of) a prefill.")
        self.decode_batch = g("vllm_rapid:decode_batch_requests", "Requests in the last decode batch.")
        self.inflight_reqs = g("vllm_rapid:prefill_inflight_requests", "Requests in the running prefill batch.")
        self.inflight_tokens = g("vllm_rapid:prefill_inflight_tokens", "Tokens of the running prefill batch.")
        self.units = g("vllm_rapid:partition_units", "Compute units (SMs, CUs, CPU threads) of each lane.", "lane")
        self.total_units = g("vllm_rapid:partition_total_units", "Compute units of the device.")
        self.shared_units = g("vllm_rapid:partition_shared_units",
                              "Compute units in both lanes' partitions (0: disjoint; the pool of a shared-pool split).")
        self.decode_share = g(
            "vllm_rapid:decode_partition_fraction", "Decode lane's share of the device (1: both lanes share all)."
        )
        self.arm_reason = g("vllm_rapid:arm_reason", "Why the ARM chose the current split (1 for the reason).",
                            "reason")
        self.step_seconds = prometheus_client.Histogram(
            "vllm_rapid:lane_step_seconds", "Time of one batch on its lane.", labelnames=(*LABELS, "lane"),
            buckets=STEP_SECONDS_BUCKETS,
        )
        self.slo_seconds = g("vllm_rapid:slo_seconds", "The SLOs RAPID steers by.", "slo")
        self.ttft = c("vllm_rapid:ttft_slo_requests", "First tokens within / beyond rapid.ttft_slo_ms.", "result")
        self.itl = c("vllm_rapid:itl_slo_tokens", "Inter-token gaps within / beyond rapid.itl_slo_ms.", "result")
        self.goodput = c("vllm_rapid:slo_requests",
                         "Completed requests within both SLOs (TTFT, mean inter-token latency) or not.", "result")
        self.failed = c("vllm_rapid:lane_failed_requests", "Requests failed because their lane's batch raised.")


_families: _Families | None = None


def _shared_families() -> _Families:
    global _families
    if _families is None:
        _families = _Families()
    return _families


class RapidStatLogger(StatLoggerBase):
    """Exports RAPID's lane, partition and SLO metrics for one engine."""

    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        self.enabled = is_rapid(vllm_config.scheduler_config.scheduler_cls)
        if not self.enabled:
            return
        config = RapidConfig.of(vllm_config)
        self.ttft_slo_s, self.itl_slo_s = config.ttft_slo_ms / 1000, config.itl_slo_ms / 1000
        labels = (vllm_config.model_config.served_model_name, str(engine_index))
        m = _shared_families()
        self.prefill_queue, self.decode_batch = m.prefill_queue.labels(*labels), m.decode_batch.labels(*labels)
        self.inflight_reqs, self.inflight_tokens = m.inflight_reqs.labels(*labels), m.inflight_tokens.labels(*labels)
        self.units = {lane: m.units.labels(*labels, lane.value) for lane in LaneName}
        self.total_units, self.decode_share = m.total_units.labels(*labels), m.decode_share.labels(*labels)
        self.shared_units = m.shared_units.labels(*labels)
        self.arm_reason = {r.value: m.arm_reason.labels(*labels, r.value) for r in ArmReason}
        self.step_seconds = {lane: m.step_seconds.labels(*labels, lane.value) for lane in LaneName}
        self.ttft = {r: m.ttft.labels(*labels, r) for r in ("met", "missed")}
        self.itl = {r: m.itl.labels(*labels, r) for r in ("met", "missed")}
        self.goodput = {r: m.goodput.labels(*labels, r) for r in ("met", "missed")}
        self.failed = m.failed.labels(*labels)
        m.slo_seconds.labels(*labels, "ttft").set(self.ttft_slo_s)
        m.slo_seconds.labels(*labels, "itl").set(self.itl_slo_s)

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
        if not self.enabled:
            return
        lanes = LaneStats.from_scheduler_stats(scheduler_stats) if scheduler_stats is not None else None
        if lanes is not None:
            self._record_lanes(lanes)
        if iteration_stats is not None:
            self._record_slos(iteration_stats)

    def _record_lanes(self, lanes: LaneStats) -> None:
        step = lanes.step
        self.prefill_queue.set(lanes.prefill_queue_reqs)
        self.decode_batch.set(step.decode_batch_reqs)
        self.inflight_reqs.set(lanes.prefill_inflight_reqs)
        self.inflight_tokens.set(lanes.prefill_inflight_tokens)
        if step.decode_step_ms is not None:
            self.step_seconds[LaneName.DECODE].observe(step.decode_step_ms / 1000)
        if step.prefill_batch_ms is not None:
            self.step_seconds[LaneName.PREFILL].observe(step.prefill_batch_ms / 1000)
        if step.failed_reqs:
            self.failed.inc(step.failed_reqs)
        if (arm := step.arm) is not None:
            split = arm.split
            self.units[LaneName.DECODE].set(split.decode_units)
            self.units[LaneName.PREFILL].set(split.prefill_units)
            self.total_units.set(split.total_units)
            self.shared_units.set(split.shared_units)
            self.decode_share.set(split.decode_units / split.total_units)
            for reason, gauge in self.arm_reason.items():
                gauge.set(1 if reason == arm.reason else 0)

    def _record_slos(self, iteration: Any) -> None:
        for ttft in iteration.time_to_first_tokens_iter:
            self.ttft["met" if ttft <= self.ttft_slo_s else "missed"].inc()
        for itl in iteration.inter_token_latencies_iter:
            self.itl["met" if itl <= self.itl_slo_s else "missed"].inc()
        for finished in iteration.finished_requests:
            if finished.finish_reason not in COMPLETED:
                continue
            ttft = finished.queued_time + finished.prefill_time
            met = ttft <= self.ttft_slo_s and finished.mean_time_per_output_token <= self.itl_slo_s
            self.goodput["met" if met else "missed"].inc()

    def log_engine_initialized(self) -> None:
        pass
