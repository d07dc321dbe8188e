"""memkv inside inference stacks: the vLLM KV connector (vllm.py) and its block keys."""
