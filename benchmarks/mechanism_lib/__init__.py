"""Pieces of the GPU mechanism benchmark (``python -m benchmarks.mechanism``): trace, paged KV cache, stack runner,
serving policies, metrics and plots. Nothing here imports vLLM."""
