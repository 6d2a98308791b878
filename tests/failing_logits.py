"""A logits processor that raises for requests that ask it to: a real lane failure for the failure-isolation tests.

A request with ``extra_args={"fail_after_tokens": n}`` makes the sampling step of whichever lane's batch holds it
raise once the request has ``n`` output tokens: ``n=0`` fails its prefill batch (the first token is sampled on the
prefill lane), ``n>0`` a decode step. Like any user-supplied processor, it runs inside the lane's batch.
"""

from __future__ import annotations

from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor


class InjectedFailure(RuntimeError):
    """Raised on purpose by ``FailOnRequest``."""


class FailOnRequest(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False  # so it runs for greedy requests too

    def new_req_logits_processor(self, params: SamplingParams):
        after = (params.extra_args or {}).get("fail_after_tokens")
        if after is None:
            return None

        def fail(output_ids, logits):
            if len(output_ids) >= after:
                raise InjectedFailure(f"injected failure after {len(output_ids)} output tokens")
            return logits

        return fail
