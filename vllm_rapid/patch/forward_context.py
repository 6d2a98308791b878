"""Make vLLM's forward context thread-local, so two lanes can run forward passes at the same time.

``vllm/forward_context.py`` keeps the current ForwardContext in a module global: a second lane thread entering
``set_forward_context`` would overwrite the first lane's attention metadata mid-forward. The upstreamable fix is
``patches/0001-thread-local-forward-context.diff``. At run time the same change is applied by giving the three
functions that touch the global the code of the ``_template_*`` functions below; their identity is kept, so
every ``from vllm.forward_context import get_forward_context`` already made elsewhere sees the change too. The
templates are never called here: their code runs as vLLM's functions, with vLLM's module globals.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import Any

from vllm_rapid.patch.versions import replace_function_code

_forward_context_tls = threading.local()


def _template_get_forward_context() -> Any:
    """Code template for vllm.forward_context.get_forward_context."""
    forward_context = getattr(_forward_context_tls, "value", None)
    assert forward_context is not None, (
        "Forward context is not set. Please use `set_forward_context` to set the forward context."
    )
    return forward_context


def _template_is_forward_context_available() -> bool:
    """Code template for vllm.forward_context.is_forward_context_available."""
    return getattr(_forward_context_tls, "value", None) is not None


def _template_override_forward_context(forward_context: Any) -> Generator[None, None, None]:
    """Code template for vllm.forward_context.override_forward_context (its undecorated generator)."""
    prev_context = getattr(_forward_context_tls, "value", None)
    _forward_context_tls.value = forward_context
    try:
        yield
    finally:
        _forward_context_tls.value = prev_context


def apply_thread_local_forward_context() -> bool:
    """Patch the loaded vLLM once; return True if this call changed it. Refuses vLLM versions it was not made for."""
    import vllm.forward_context as fc

    if getattr(fc, "_forward_context_tls", None) is _forward_context_tls:
        return False
    replacements: dict[Callable[..., Any], Callable[..., Any]] = {
        fc.get_forward_context: _template_get_forward_context,
        fc.is_forward_context_available: _template_is_forward_context_available,
        fc.override_forward_context.__wrapped__: _template_override_forward_context,
    }
    replace_function_code(replacements, "_forward_context", "the thread-local forward-context patch")
    # The new code reads this module global. Set at start-up, before any forward pass; a context set before the
    # patch (none is, outside a forward pass) carries over.
    _forward_context_tls.value = fc._forward_context
    fc._forward_context_tls = _forward_context_tls
    return True
