"""Helpers for tests, benchmarks and the demo: the tiny model, the ``vllm serve`` harness, the lane-overlap
summary and an engine-free scheduler driver."""
