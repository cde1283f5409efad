"""kv-extproc: an Envoy external processor that routes each LLM request to the vLLM pod
most likely to hold its prompt's KV cache.

Pipeline (one module per stage, data flowing one way):
server -> requests -> tokenization/prefixcache -> blocks -> indexer -> index -> scoring -> server
KV events: events (transport -> sequencing -> index; janitor -> index) -> invalidation feed
"""

__version__ = "0.1.0"
