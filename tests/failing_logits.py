"""A logits processor that raises for requests that ask it to: a real lane failure for the failure-isolation tests.

A request with ``extra_args={"fail_after_tokens": n}`` makes the sampling step of whichever lane's batch holds it
raise once the request has ``n`` output tokens: ``n=0`` fails its prefill batch (the first token is sampled on the
prefill lane), ``n>0`` a decode step. Like any user-supplied processor, it runs inside the lane's batch.
"""

from __future__ import annotations

import os

from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor


class InjectedFailure(RuntimeError):
    """Raised on purpose by ``FailOnRequest``."""


def _fail_after(params: SamplingParams) -> int | None:
    return (params.extra_args or {}).get("fail_after_tokens")


def _fail_if(after: int | None, num_output: int) -> None:
    if after is not None and num_output >= after:
        raise InjectedFailure(f"injected failure after {num_output} output tokens")


class FailOnRequest(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False  # so it runs for greedy requests too

    def new_req_logits_processor(self, params: SamplingParams):
        after = _fail_after(params)
        if after is None:
            return None

        def fail(output_ids, logits):
            _fail_if(after, len(output_ids))
            return logits

        return fail


class FailOnRequestV2(V2LogitsProcessor):
    """``FailOnRequest`` in the V2 runner's interface: state per request slot, batch rows mapped to slots."""

    def __init__(self, vllm_config, req_states) -> None:
        self.prompt_len = req_states.prompt_len
        self.fail_after: dict[int, int] = {}

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        after = _fail_after(sampling_params)
        if after is None:
            self.fail_after.pop(req_idx, None)
            return False
        self.fail_after[req_idx] = after
        return True

    def apply(self, logits, ctx):
        for slot, seq_len in zip(ctx.idx_mapping_np.tolist(), ctx.seq_lens_upper_bound_np.tolist()):
            _fail_if(self.fail_after.get(slot), seq_len - int(self.prompt_len.np[slot]))
        return logits


def failing_logits_processor() -> type:
    """The failing processor in the interface of the model runner the engines of this test session build."""
    return FailOnRequestV2 if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1" else FailOnRequest
