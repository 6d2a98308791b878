"""Worker process: the lane worker, runner-state moves between its two runners, the per-step ARM driver and the
prefill lane's TP group (imports vLLM and torch)."""
