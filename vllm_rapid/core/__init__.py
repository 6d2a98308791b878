"""Engine-core process: the RAPID scheduler and its KV fences (imports vLLM)."""
