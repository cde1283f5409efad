"""vLLM KV events: decode every wire layout vLLM has shipped, then apply them to the index."""
