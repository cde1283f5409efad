"""For demos, tests and benchmarks, not for routing: a simulated vLLM engine and pod that
publish real KV events (``kv-extproc simulate-pod``), the quickstart, and the launcher that
starts real Redis, Envoy and kv-extproc processes on loopback for all three."""
