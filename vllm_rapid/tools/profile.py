"""``vllm-rapid profile``: measure the table the ARM decides from, on the GPU it will drive.

For every split the partition backend pre-creates, it times a decode step (one CUDA graph, as served) for a grid of
batch sizes and context lengths while a prefill runs on the other lane, and the prefill throughput of the prefill
partition. The model is a Llama-shaped stack of torch ops with random weights: step times depend on shapes, not
values (see :mod:`vllm_rapid.tools.layer_stack`). The result is the YAML file that ``rapid.profile_path`` points to.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from vllm_rapid.config import DEFAULT_SHARED_POOL_FRACTION
from vllm_rapid.lanes.lane import ContextFactory
from vllm_rapid.lanes.partition import PartitionBackend, create_partition_backend
from vllm_rapid.lanes.partition.base import PARTITION_LAYOUTS
from vllm_rapid.lanes.step_time import DecodeProfile, DecodeSample
from vllm_rapid.tools.layer_stack import LlamaStack, ModelDims, capture_graph

logger = logging.getLogger(__name__)

NO_GPU_EXIT_CODE = 2
__all__ = ["NO_GPU_EXIT_CODE", "LlamaStack", "ModelDims", "build_parser", "main", "profile_backend"]


def _time_replays(graph: Any, context: ContextFactory, iters: int) -> tuple[Any, Any]:
    """Enqueue ``iters`` replays between two timing events on the lane stream; returns the events."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with context():
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
    return start, end


def profile_backend(
    stack: LlamaStack,
    backend: PartitionBackend,
    batch_sizes: Sequence[int],
    context_lens: Sequence[int],
    prefill_tokens: int,
    iters: int,
    max_kv_bytes: int,
) -> DecodeProfile:
    """Measure every split of ``backend``: decode steps while a prefill keeps the other lane busy."""
    import torch

    d, device, dtype = stack.dims, stack.final_norm.device, stack.final_norm.dtype
    prompt = torch.randn(prefill_tokens, d.hidden_size, device=device, dtype=dtype)
    decode_samples: list[DecodeSample] = []
    for split in backend.splits():
        decode_ctx, prefill_ctx = backend.lane_contexts(split)
        prefill = capture_graph(lambda: stack.prefill(prompt), prefill_ctx)
        try:
            start, end = _time_replays(prefill, prefill_ctx, iters)
            torch.cuda.synchronize()
            prefill_ms = start.elapsed_time(end) / iters  # sizes the prefill backlog of each decode measurement
            print(f"{split.label}: prefill {prefill_tokens * 1e3 / prefill_ms:,.0f} tok/s on {split.prefill_units} "
                  "units")
            for batch in batch_sizes:
                for context in context_lens:
                    kv_bytes = 2 * batch * context * d.num_kv_heads * d.head_dim * dtype.itemsize
                    if kv_bytes > max_kv_bytes:
                        print(f"{split.label}: skip batch={batch} context={context} (KV {kv_bytes / 2**30:.1f} GiB)")
                        continue
                    step_ms = _decode_under_prefill(
                        stack, batch, context, decode_ctx, prefill, prefill_ctx, prefill_ms, iters
                    )
                    decode_samples.append(DecodeSample(batch, context, split.decode_units, step_ms))
                    print(f"{split.label}: decode batch={batch} context={context}: {step_ms:.2f} ms")
        finally:
            _release(prefill)
    return DecodeProfile(
        backend.total_units, decode_samples, torch.cuda.get_device_name(device), d.describe(), backend.name,
        backend.layout,
    )


def _release(graph: Any) -> None:
    """Destroy a graph now, after its work: a graph must not outlive the green context it was captured on (a
    traceback holding the frame would keep it past ``backend.close()``)."""
    import torch

    torch.cuda.synchronize()
    graph.reset()


def _decode_under_prefill(
    stack: LlamaStack,
    batch: int,
    context: int,
    decode_ctx: ContextFactory,
    prefill: Any,
    prefill_ctx: ContextFactory,
    prefill_ms: float,
    iters: int,
) -> float:
    """Mean decode step (ms) while prefill replays keep the other lane busy for the whole measurement."""
    import torch

    d, device, dtype = stack.dims, stack.final_norm.device, stack.final_norm.dtype
    x = torch.randn(batch, d.hidden_size, device=device, dtype=dtype)
    k_cache = torch.randn(batch, d.num_kv_heads, context, d.head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    graph = capture_graph(lambda: stack.decode(x, k_cache, v_cache), decode_ctx)
    try:
        start, end = _time_replays(graph, decode_ctx, iters)  # alone, to size the prefill backlog
        torch.cuda.synchronize()
        alone_ms = start.elapsed_time(end) / iters
        # Decode slows down under interference: queue enough prefill for three times its solo duration.
        backlog = math.ceil(3 * iters * alone_ms / prefill_ms) + 1
        _, prefill_end = _time_replays(prefill, prefill_ctx, backlog)
        start, end = _time_replays(graph, decode_ctx, iters)
        torch.cuda.synchronize()
    finally:
        _release(graph)
    if prefill_end.elapsed_time(end) > 0:
        logger.warning("batch=%d context=%d: the prefill ended before the decode measurement did", batch, context)
    return start.elapsed_time(end) / iters


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-rapid", description="RAPID-Serve tools for vLLM")
    commands = parser.add_subparsers(dest="command", required=True)
    profile = commands.add_parser(
        "profile", help="measure decode step time and prefill throughput per partition size (needs a GPU)"
    )
    profile.add_argument("--model-config", help="HF config.json (or its directory); default: Llama-3-8B shapes")
    profile.add_argument("--num-layers", type=int, help="profile fewer layers than the model has (faster)")
    profile.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 32, 64, 128, 256])
    profile.add_argument("--context-lens", type=_int_list, default=[512, 2048, 8192])
    profile.add_argument("--prefill-tokens", type=int, default=4096, help="prompt length of the concurrent prefill")
    profile.add_argument(
        "--backend", default="auto", choices=["auto", "green_context", "cu_mask", "streams"],
        help="partition backend (as rapid.partition_backend)",
    )
    profile.add_argument("--layout", choices=list(PARTITION_LAYOUTS), default="disjoint",
                         help="partition layout (as rapid.partition_layout); the ARM uses a profile of its own layout")
    profile.add_argument("--shared-pool-fraction", type=float, default=DEFAULT_SHARED_POOL_FRACTION,
                         help="shared_pool layout: the device's share in the pool (as rapid.shared_pool_fraction)")
    profile.add_argument(
        "--decode-units", type=_int_list,
        help="decode partition sizes in SMs/CUs (default: the backend's, as the server will pre-create them)",
    )
    profile.add_argument("--iters", type=int, default=20, help="timed replays per measurement")
    profile.add_argument("--max-kv-gib", type=float, default=32.0, help="skip grid points with a larger KV cache")
    profile.add_argument("--device", type=int, default=0)
    profile.add_argument("--output", default="rapid_profile.yaml", help="YAML file for rapid.profile_path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vllm-rapid`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "vllm-rapid profile: no GPU is visible (torch.cuda.is_available() is False). The profile measures step "
            "times on the GPU the ARM will drive; run it there. Without a profile the ARM uses a roofline estimate.",
            file=sys.stderr,
        )
        return NO_GPU_EXIT_CODE
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dims = ModelDims.from_hf_config(args.model_config, args.num_layers) if args.model_config else ModelDims(
        num_layers=args.num_layers or ModelDims.num_layers
    )
    torch.cuda.set_device(args.device)
    # An explicit --backend that cannot start raises here; only auto falls back to plain streams (with a warning).
    backend = create_partition_backend(args.backend, "cuda", device_index=args.device, decode_units=args.decode_units,
                                       layout=args.layout, shared_pool_fraction=args.shared_pool_fraction)
    print(f"partition backend: {backend.name} (asked for {args.backend}), {backend.layout} layout, "
          f"splits {[s.label for s in backend.splits()]}")
    try:
        with torch.inference_mode():
            stack = LlamaStack(dims, torch.device("cuda", args.device), torch.bfloat16)
            profile = profile_backend(
                stack, backend, args.batch_sizes, args.context_lens, args.prefill_tokens, args.iters,
                int(args.max_kv_gib * 2**30),
            )
    finally:
        torch.cuda.synchronize()
        backend.close()
    profile.save(args.output)
    print(f"wrote {args.output}: {len(profile.decode)} decode samples on {profile.backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
