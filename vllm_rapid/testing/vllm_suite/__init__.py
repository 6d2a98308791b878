"""vLLM's own tests run against RAPID: the pinned sdist's tests/ fetched at test time, an offline hub serving the
tiny Llama under the model names they use, an adapter that presents RAPID's step as vLLM's, a pytest plugin, and
the one list of selected tests (``selection.py``) with the by-design differences and known RAPID bugs.

Run: ``python -m vllm_rapid.testing.vllm_suite`` (``.ci/run`` does, after the project's own tests).
"""
