"""Pieces of the GPU mechanism benchmark (``benchmarks/mechanism.py``): trace, paged KV cache, model runner,
serving policies, metrics and plots. Nothing here imports vLLM."""
