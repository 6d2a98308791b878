"""Tools that run outside a server: the ``vllm-rapid`` command, the profiler, its layer stack and the SM probe."""
