"""``python -m vllm_rapid.patch``: print the README's "Changes to vLLM" table from the registry."""

from vllm_rapid.patch.registry import markdown_table

print(markdown_table())
