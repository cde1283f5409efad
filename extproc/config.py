"""Typed configuration: one YAML or JSON file, camelCase keys, validated at start-up.

Every error names the offending key (``$.index.timeout``) on one line, so an operator
can fix a bad file without reading a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml


class ConfigError(ValueError):
    """A config file that cannot be used; the message is one line naming the key."""


class Duration(float):
    """Seconds, written in config as "50ms", "30s", "2m" or a bare number of seconds."""

    _UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    _PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")

    @classmethod
    def parse(cls, value: Any) -> "Duration":
        if isinstance(value, bool):
            raise ValueError(f"expected a duration like '50ms', got {value!r}")
        if isinstance(value, (int, float)):
            return cls(float(value))
        if isinstance(value, str):
            match = cls._PATTERN.match(value)
            if match:
                return cls(float(match.group(1)) * cls._UNITS[match.group(2) or "s"])
        raise ValueError(f"expected a duration like '50ms' or '30s', got {value!r}")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0, got {value}")


def _address(name: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name} must be 'host:port', got {value!r}")


class _Section(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class IndexConfig(_Section):
    backend: Literal["memory", "redis"] = "memory"
    mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    """How Redis is run: one server at redisUrl (standalone); a Redis Cluster (or Valkey cluster)
    found from ``nodes``; or the primary that ``sentinels`` name for ``sentinelService``."""
    redis_url: str = DEFAULT_REDIS_URL
    """Standalone mode only. rediss:// for TLS. Put no password here: use passwordFile or passwordEnv."""
    nodes: list[str] = []
    """Cluster mode: a few seed nodes, host:port (the rest of the cluster is discovered from them)."""
    sentinels: list[str] = []
    """Sentinel mode: the Sentinels, host:port."""
    sentinel_service: str = ""
    """Sentinel mode: the monitored primary's name (``sentinel monitor <name> ...``)."""
    sentinel_password_file: str = ""
    """Sentinel mode: the Sentinels' own password (their requirepass), if they have one."""
    sentinel_password_env: str = ""
    tls: bool = False
    """Cluster and sentinel modes: TLS to every node (standalone: a rediss:// redisUrl)."""
    username: str = ""
    """Redis ACL user (AUTH username password)."""
    password_file: str = ""
    password_env: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    """Client certificate, for Redis servers that require one (with tlsKeyFile)."""
    tls_key_file: str = ""
    key_prefix: str = "matrix:kv:block:"
    meta_prefix: str = "matrix:kv:"
    """Prefix of the ingester's own keys (per-pod records, engine maps, invalidation channel)."""
    timeout: Duration = Duration(0.05)
    max_entry_age: Duration = Duration(0)
    """Entries stored longer ago are ignored and expired (0 = never). vLLM does not re-announce
    blocks that stay cached, so keep this well above how long a hot prefix stays resident."""

    def __post_init__(self) -> None:
        _positive("timeout", self.timeout)
        if self.password_file and self.password_env:
            raise ValueError("give passwordFile or passwordEnv, not both")
        if self.sentinel_password_file and self.sentinel_password_env:
            raise ValueError("give sentinelPasswordFile or sentinelPasswordEnv, not both")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tlsCertFile and tlsKeyFile go together")
        if self.max_entry_age < 0:
            raise ValueError("maxEntryAge must not be negative")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redisUrl must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        self._check_mode()

    def _check_mode(self) -> None:
        mode = self.mode
        if mode != "standalone" and self.backend != "redis":
            raise ValueError(f"mode {mode} is a Redis setting: set backend: redis")
        if mode == "standalone":
            for name, value in (("nodes", self.nodes), ("sentinels", self.sentinels),
                                ("sentinelService", self.sentinel_service)):
                if value:
                    raise ValueError(f"{name} is set but mode is standalone: set mode: "
                                     f"{'cluster' if name == 'nodes' else 'sentinel'} (or remove {name})")
            if self.tls and not self.redis_url.startswith("rediss://"):
                raise ValueError("tls is for cluster and sentinel modes; in standalone mode use a rediss:// redisUrl")
            return
        if self.redis_url != DEFAULT_REDIS_URL:
            where = "nodes" if mode == "cluster" else "sentinels and sentinelService"
            raise ValueError(f"redisUrl is for mode standalone; mode {mode} connects through {where}")
        if mode == "cluster":
            if not self.nodes:
                raise ValueError("mode cluster needs nodes: a few seed nodes as host:port")
            if self.sentinels or self.sentinel_service:
                raise ValueError("sentinels and sentinelService are for mode sentinel, not cluster")
            if "{" in self.key_prefix or "}" in self.key_prefix:
                raise ValueError("keyPrefix must not contain '{' or '}' in mode cluster: a hash tag would put "
                                 "every block in one slot")
            for node in self.nodes:
                _address("nodes", node)
        else:
            if not self.sentinels or not self.sentinel_service:
                raise ValueError("mode sentinel needs sentinels (host:port list) and sentinelService")
            if self.nodes:
                raise ValueError("nodes is for mode cluster, not sentinel")
            for node in self.sentinels:
                _address("sentinels", node)


REMOTE_TOKENIZER = "remote"
"""``tokenizer: remote``: the model's engines tokenize its prompts (vLLM's /tokenize)."""


class ModelConfig(_Section):
    name: str
    tokenizer: str = ""
    """A local directory or hub id; empty means the model name itself is the hub id; "remote"
    asks the model's engines (a local directory named remote: write ./remote)."""

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer or self.name

    @property
    def remote(self) -> bool:
        return self.tokenizer == REMOTE_TOKENIZER


class PodConfig(_Section):
    id: str
    address: str
    models: list[str] = []
    """Served model names; empty means the pod serves every configured model."""
    kv_events: str = ""
    """The pod's KV event publisher, e.g. tcp://10.0.0.5:5557 (vLLM --kv-events-config endpoint)."""
    kv_replay: str = ""
    """Its replay endpoint (vLLM replay_endpoint), to fill gaps instead of starting over."""
    data_parallel_size: int = 1
    """vLLM's --data-parallel-size behind this one address: each rank has its own KV cache and
    publishes on kvEvents (and kvReplay) port + rank; requests are pinned to the rank holding
    their prefix. Ranks that each serve their own address (external DP) are separate pods."""

    def __post_init__(self) -> None:
        _address("address", self.address)
        if not self.id:
            raise ValueError("id must not be empty")
        if "#" in self.id or "|" in self.id:
            raise ValueError(f"id must not contain '#' or '|' (they name ranks and tiers in the index), got {self.id!r}")
        if not 1 <= self.data_parallel_size <= 1024:
            raise ValueError(f"dataParallelSize must be between 1 and 1024, got {self.data_parallel_size}")
        for name, endpoint in (("kvEvents", self.kv_events), ("kvReplay", self.kv_replay)):
            if endpoint and "://" not in endpoint:
                raise ValueError(f"{name} must be a ZMQ endpoint like tcp://host:5557, got {endpoint!r}")


class IngestConfig(_Section):
    enabled: bool = False
    """Run the ingester inside ``serve`` (single replica, quickstart); else run ``kv-extproc ingest``."""
    engine_block_size: int = 16
    """vLLM's --block-size; blockSizeToHash must be a multiple of it."""
    bind: str = ""
    """Central mode: bind here (e.g. tcp://*:5557); pods connect and publish with topic kv@<pod-id>@<model>."""
    topic: str = ""
    """Subscription prefix on per-pod endpoints (vLLM's "topic"; empty takes every topic)."""
    replay_timeout: Duration = Duration(2.0)
    pod_silence_timeout: Duration = Duration(0)
    """Drop a pod's entries after this long without events (0 = never: idle pods publish nothing)."""
    janitor_interval: Duration = Duration(60.0)
    offload_chunk_blocks: int = 1
    """vLLM's offloading connector without ``self_describing_kv_events`` names each offloaded
    chunk by its last engine block only: a chunk covers this many engine blocks (its
    ``blocks_per_chunk``, or ``block_size`` / --block-size; 1 is vLLM's default)."""

    def __post_init__(self) -> None:
        _positive("engineBlockSize", self.engine_block_size)
        _positive("offloadChunkBlocks", self.offload_chunk_blocks)
        _positive("replayTimeout", self.replay_timeout)
        _positive("janitorInterval", self.janitor_interval)
        if self.pod_silence_timeout < 0:
            raise ValueError("podSilenceTimeout must not be negative")


class RemoteTokenizationConfig(_Section):
    """Calls to the engines' /tokenize, for models with ``tokenizer: remote`` (or remoteFallback)."""

    timeout: Duration = Duration(0.15)
    """The whole call, a retry on a second pod included; must be below decisionTimeout, which
    also has to cover the index lookup after it."""
    max_in_flight_per_pod: int = 4
    """Calls to one pod at once; a pod at the bound is skipped (with every pod at it, the request
    goes by load at once rather than queue)."""
    attempts: int = 2
    """Pods tried per call after a connection error or 5xx (a timeout ends the call)."""
    breaker_failures: int = 3
    """Failures in a row (timeouts, connection errors, 5xx) that open a pod's circuit breaker."""
    breaker_open_for: Duration = Duration(5.0)
    """No calls to a pod whose breaker opened, for this long; then one trial call decides."""

    def __post_init__(self) -> None:
        _positive("timeout", self.timeout)
        _positive("maxInFlightPerPod", self.max_in_flight_per_pod)
        _positive("attempts", self.attempts)
        _positive("breakerFailures", self.breaker_failures)
        _positive("breakerOpenFor", self.breaker_open_for)


class TokenizationConfig(_Section):
    workers: int = 2
    """Threads that encode prompts, so tokenizing never blocks the event loop (and at least as
    many more for the pieces of a long prompt, encoded side by side)."""
    max_queued: int = 64
    """Encodes waiting for a worker beyond this fall back to load-based routing."""
    max_loaded: int = 8
    """Tokenizers kept in memory at once (least recently used is dropped)."""
    remote_fallback: bool = False
    """Models whose local tokenizer is missing, still loading or failed to load are tokenized by
    their engines meanwhile (else routed by load, reason tokenizer)."""
    remote: RemoteTokenizationConfig = RemoteTokenizationConfig()

    def __post_init__(self) -> None:
        _positive("workers", self.workers)
        _positive("maxQueued", self.max_queued)
        _positive("maxLoaded", self.max_loaded)


class LimitsConfig(_Section):
    max_body_bytes: int = 8 * 1024 * 1024
    """Larger bodies are answered 413 (keep Envoy's per_connection_buffer_limit_bytes above it)."""
    max_messages: int = 4096
    """Chat requests with more messages are answered 400."""
    max_prompt_tokens: int = 1 << 20
    """Longer prompts are routed by load (reason prompt_too_long): the engine decides on them."""
    max_concurrent_streams: int = 4096
    """ext_proc streams served at once; Envoy fails open past it (failure_mode_allow)."""

    def __post_init__(self) -> None:
        _positive("maxBodyBytes", self.max_body_bytes)
        _positive("maxMessages", self.max_messages)
        _positive("maxPromptTokens", self.max_prompt_tokens)
        _positive("maxConcurrentStreams", self.max_concurrent_streams)


class TlsConfig(_Section):
    """TLS for the ext_proc listener; with clientCaFile, clients must present a certificate (mTLS)."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("certFile and keyFile go together")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("clientCaFile (mTLS) needs certFile and keyFile")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


class HealthConfig(_Section):
    require_index: bool = False
    """Report NOT_SERVING while the index is unreachable (routing goes on by load either way)."""
    check_interval: Duration = Duration(5.0)

    def __post_init__(self) -> None:
        _positive("checkInterval", self.check_interval)


class PrefixStoreConfig(_Section):
    enable_pod_mapping_cache: bool = True
    """Cache who holds each block (off: every request asks the index for all its blocks)."""
    pod_mapping_ttl: Duration = msgspec.field(default=Duration(30.0), name="podMappingTTL")
    """How long an answer read from the index is kept (the feed keeps it true meanwhile)."""
    max_pod_sets_per_block: int = 5
    """Accepted for compatibility; owners are now cached per block for every pod, so candidate
    sets no longer split the cache."""
    block_size: int = 256
    """Characters of prompt text per prefix-store chunk at most (chunks also end after each
    added token, such as the end of a chat message)."""
    max_entries: int = 100_000
    """Text chunks kept (LRU); about 0.4 KB each, so ~40 MB at the default."""
    max_prompts: int = 50_000
    """Whole prompts whose block keys are kept (LRU); 8 bytes per block + ~0.2 KB each."""
    max_pod_mappings: int = 200_000
    """Blocks whose owners are kept (LRU), about 0.2 KB each (~45 MB at the default)."""
    mirror: bool = False
    """Load the whole index at start and keep it with the feed: a block not cached is held by
    nobody, so the request path never waits on the index (until maxPodMappings is reached)."""

    def __post_init__(self) -> None:
        _positive("podMappingTTL", self.pod_mapping_ttl)
        for name, value in (("maxPodSetsPerBlock", self.max_pod_sets_per_block), ("blockSize", self.block_size),
                            ("maxEntries", self.max_entries), ("maxPrompts", self.max_prompts),
                            ("maxPodMappings", self.max_pod_mappings)):
            _positive(name, value)


DEFAULT_MEDIUM_WEIGHTS = {"GPU": 1.0, "CPU": 0.8, "STORAGE": 0.25}
"""Measured on the fleet simulator (python -m bench.tiers): see README, KV tiers."""
_MEDIUM = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class TiersConfig(_Section):
    """KV tiers (vLLM's ``medium``: GPU, CPU, STORAGE, ...): what a cached block is worth by
    where the pod holds it."""

    medium_weights: dict[str, float] = msgspec.field(default_factory=lambda: dict(DEFAULT_MEDIUM_WEIGHTS))
    """What one cached block counts for in the prefix score, by medium: a block in CPU memory
    is reloaded, not recomputed, but not free. A medium not listed counts 0 (the run stops
    there). GPU must be listed."""

    def __post_init__(self) -> None:
        for medium, weight in self.medium_weights.items():
            if not _MEDIUM.match(medium) or medium != medium.upper():
                raise ValueError(f"mediumWeights: {medium!r} is not an upper-case medium name like GPU or CPU")
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"mediumWeights.{medium} must be between 0 and 1, got {weight}")
        if self.medium_weights.get("GPU", 0.0) <= 0.0:
            raise ValueError("mediumWeights.GPU must be listed and above 0")


class ScorerConfig(_Section):
    type: str
    """A scorer of extproc/scoring (prefix, ...)."""
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must not be negative, got {self.weight}")


class ScoringConfig(_Section):
    """How a pod is chosen: total = sum of weight x score (each 0..1), then the picker."""

    scorers: list[ScorerConfig] = msgspec.field(default_factory=lambda: [ScorerConfig(type="ttft")])
    picker: str = "max"
    """max: the highest total; ties go to the fewest requests in flight, then take turns.
    weightedRandom: at random, in proportion to the totals."""
    queued_request_tokens: int = 512
    """ttft scorer: what one request ahead in a pod's queue costs on top of what we know of
    it, in prompt tokens to compute (chosen on the fleet simulator among 0..3072)."""
    request_tokens: int = 1536
    """ttft scorer: what one of our open requests costs its pod besides its prefill (its
    decode), in prompt tokens, shrinking over the pod's typical request lifetime (chosen on
    the fleet simulator among 1024..2048)."""
    max_start_ratio: float = 1.25
    """ttft scorer's tail guard: a pod where this request would start later than this x the
    soonest start (+ startSlackTokens) is not chosen for its cache (chosen on the fleet
    simulator among 1.25 and 1.5; 0: off)."""
    start_slack_tokens: int = 256
    """ttft scorer's tail guard: the start difference, in prompt tokens, always allowed."""
    guard_below_queue: float = 2.0
    """ttft scorer's tail guard holds while the candidates' mean requests ahead is below this
    (chosen on the fleet simulator among 1.5, 2, 2.5 and always)."""
    speculative_ttl: Duration = msgspec.field(default=Duration(2.0), name="speculativeTTL")
    """A pod a request was just sent to counts as holding its blocks this long, until its KV
    events say so (0: off), so a burst sharing a new prefix does not scatter."""

    def __post_init__(self) -> None:
        if not self.scorers:
            raise ValueError("scorers must list at least one scorer")
        if min(self.queued_request_tokens, self.request_tokens, self.speculative_ttl, self.start_slack_tokens,
               self.guard_below_queue) < 0:
            raise ValueError("queuedRequestTokens, requestTokens, startSlackTokens, guardBelowQueue and speculativeTTL"
                             " must not be negative")
        if self.max_start_ratio != 0 and not 1 <= self.max_start_ratio < float("inf"):
            raise ValueError(f"maxStartRatio must be a number from 1 (or 0: off), got {self.max_start_ratio}")
        if self.guard_below_queue != self.guard_below_queue:  # NaN
            raise ValueError("guardBelowQueue must be a number")


class LoadConfig(_Section):
    """Engine load signals: every pod's vLLM /metrics, scraped by each serve replica."""

    enabled: bool = True
    path: str = "/metrics"
    interval: Duration = Duration(0.05)
    timeout: Duration = Duration(0.5)
    stale_after: Duration = Duration(2.0)
    """Older readings are unknown, not idle."""
    max_concurrent: int = 16

    def __post_init__(self) -> None:
        _positive("interval", self.interval)
        _positive("timeout", self.timeout)
        _positive("staleAfter", self.stale_after)
        _positive("maxConcurrent", self.max_concurrent)


class PodHealthConfig(_Section):
    enabled: bool = True
    path: str = "/health"
    interval: Duration = Duration(1.0)
    timeout: Duration = Duration(1.0)
    unhealthy_after: Duration = Duration(3.0)
    """Failing this long takes a pod out of the candidate set (back on its first success)."""
    purge_after: Duration = Duration(30.0)
    """Failing this long also drops its index entries (0 = never)."""

    def __post_init__(self) -> None:
        _positive("interval", self.interval)
        _positive("timeout", self.timeout)
        if self.unhealthy_after < 0 or self.purge_after < 0:
            raise ValueError("unhealthyAfter and purgeAfter must not be negative")


class KubernetesDiscovery(_Section):
    """Pods from the Kubernetes API (list + watch), as a GAIE InferencePool selects them."""

    namespace: str = ""
    """Where the pods are; empty = this pod's own namespace (the service account's)."""
    label_selector: str = ""
    """Pods to take, e.g. "app=vllm" (ignored when inferencePool is set: its selector is used)."""
    inference_pool: str = ""
    """A GAIE InferencePool (inference.networking.k8s.io/v1) by name: its selector and targetPorts."""
    target_ports: list[int] = msgspec.field(default_factory=lambda: [8000])
    """Where requests go on each pod (the InferencePool's targetPorts replace these)."""
    kv_events_port: int = 0
    """The engines' KV event port (vLLM's --kv-events-config endpoint); 0 = no subscription.
    With several target ports, target port i publishes on kvEventsPort + i (vLLM adds the rank)."""
    kv_replay_port: int = 0
    model_label: str = ""
    """A pod label naming its served model (compared in label-safe form, e.g. Qwen-Qwen3-0.6B)."""
    models: list[str] = []
    """Models every discovered pod serves when modelLabel is unset (empty = every configured model)."""
    api_server: str = ""
    """Empty: the in-cluster service account; else a URL (e.g. http://127.0.0.1:8001, kubectl proxy)."""
    kubeconfig: str = ""
    watch_timeout: Duration = Duration(300.0)
    """Each watch asks the API server to end it after this long; the next resumes from the last resourceVersion."""

    def __post_init__(self) -> None:
        if not self.label_selector and not self.inference_pool:
            raise ValueError("kubernetes discovery needs labelSelector or inferencePool")
        if not self.target_ports or not all(0 < p < 65536 for p in self.target_ports):
            raise ValueError("targetPorts must list ports between 1 and 65535")
        _positive("watchTimeout", self.watch_timeout)


class DnsDiscovery(_Section):
    """Pods from a headless Service's A/AAAA records, resolved every ``interval``."""

    name: str
    """The name to resolve, e.g. vllm.default.svc.cluster.local."""
    port: int = 8000
    """Where requests go (A records carry no port)."""
    kv_events_port: int = 0
    kv_replay_port: int = 0
    models: list[str] = []
    nameserver: str = ""
    """host:port of the DNS server to ask; empty = the system resolver (/etc/resolv.conf)."""
    interval: Duration = Duration(5.0)
    timeout: Duration = Duration(2.0)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("dns discovery needs a name")
        if self.nameserver:
            _address("nameserver", self.nameserver)
        _positive("interval", self.interval)
        _positive("timeout", self.timeout)


class DiscoveryConfig(_Section):
    """Where the pod list comes from: the config's ``pods`` (static), Kubernetes, or DNS."""

    type: Literal["static", "kubernetes", "dns"] = "static"
    kubernetes: KubernetesDiscovery | None = None
    dns: DnsDiscovery | None = None
    purge_after: Duration = Duration(30.0)
    """A pod that left (deleted, unready, no longer resolved) gets no traffic at once; its index
    entries are dropped this long after, unless it is back by then (0 = at once)."""

    def __post_init__(self) -> None:
        if self.purge_after < 0:
            raise ValueError("purgeAfter must not be negative")
        if self.type == "kubernetes" and self.kubernetes is None:
            raise ValueError("discovery.type kubernetes needs a kubernetes section")
        if self.type == "dns" and self.dns is None:
            raise ValueError("discovery.type dns needs a dns section")


class EndpointPickerConfig(_Section):
    """The GAIE endpoint-picker protocol (proposal 004): what kv-extproc tells the proxy."""

    fallback_endpoints: int = 0
    """Alternates after the chosen pod in the destination list (best first). envoy.yaml (the
    override-host policy) retries down the list: 2. ORIGINAL_DST configs (envoy-original-dst.yaml,
    envoy-full-duplex.yaml) read one address: keep 0 (the default, which every shipped config reads)."""

    def __post_init__(self) -> None:
        if self.fallback_endpoints < 0:
            raise ValueError("fallbackEndpoints must not be negative")


class Config(_Section):
    listen: str = "127.0.0.1:9002"
    metrics_listen: str = "127.0.0.1:9090"
    routing_header: str = "x-gateway-destination-endpoint"
    index: IndexConfig = IndexConfig()
    block_size_to_hash: int = 128
    max_blocks_to_match: int = 128
    hash_scheme: Literal["chained", "kthena"] = "chained"
    decision_timeout: Duration = Duration(0.3)
    """Past this, the request is routed by load instead of waiting on tokenizer or index."""
    tokenization: TokenizationConfig = TokenizationConfig()
    scoring: ScoringConfig = ScoringConfig()
    load: LoadConfig = LoadConfig()
    tiers: TiersConfig = TiersConfig()
    limits: LimitsConfig = LimitsConfig()
    ingest: IngestConfig = IngestConfig()
    enable_pod_mapping_cache: bool = True
    """The prefix cache as a whole; off gives the uncached pipeline (same decisions, slower)."""
    cache_cleanup_interval: Duration = Duration(60.0)
    prefix_store_config: PrefixStoreConfig = PrefixStoreConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    log_prompts: bool = False
    """Include prompt text in debug logs. Off by default: prompts are user data."""
    tls: TlsConfig = TlsConfig()
    health: HealthConfig = HealthConfig()
    pod_health: PodHealthConfig = PodHealthConfig()
    shutdown_delay: Duration = Duration(0.0)
    """On SIGTERM, report NOT_SERVING this long before refusing new streams, so Envoy's health
    checks move traffic to other replicas first (set above Envoy's health-check interval)."""
    reload_interval: Duration = Duration(2.0)
    """How often the config file is checked for changes (0: only on SIGHUP)."""
    models: list[ModelConfig] = []
    pods: list[PodConfig] = []
    discovery: DiscoveryConfig = DiscoveryConfig()
    endpoint_picker: EndpointPickerConfig = EndpointPickerConfig()

    def __post_init__(self) -> None:
        _address("listen", self.listen)
        _address("metricsListen", self.metrics_listen)
        _positive("blockSizeToHash", self.block_size_to_hash)
        _positive("maxBlocksToMatch", self.max_blocks_to_match)
        _positive("decisionTimeout", self.decision_timeout)
        # Only where remote tokenization is in use: a config that never asks an engine keeps any
        # decisionTimeout (one below the default remote timeout included).
        remote_used = self.tokenization.remote_fallback or any(m.remote for m in self.models)
        if remote_used and self.tokenization.remote.timeout >= self.decision_timeout:
            raise ValueError(f"tokenization.remote.timeout ({self.tokenization.remote.timeout * 1000:g}ms) must be "
                             f"below decisionTimeout ({self.decision_timeout * 1000:g}ms) when a model is tokenized "
                             f"remotely (tokenizer: remote or tokenization.remoteFallback)")
        _positive("cacheCleanupInterval", self.cache_cleanup_interval)
        if self.reload_interval < 0:
            raise ValueError("reloadInterval must not be negative")
        if not self.routing_header or self.routing_header != self.routing_header.lower():
            raise ValueError(f"routingHeader must be a non-empty lower-case header name, got {self.routing_header!r}")
        if self.block_size_to_hash % self.ingest.engine_block_size:
            raise ValueError(
                f"blockSizeToHash ({self.block_size_to_hash}) must be a multiple of "
                f"ingest.engineBlockSize ({self.ingest.engine_block_size})"
            )
        _unique("models", [m.name for m in self.models])
        _unique("pods", [p.id for p in self.pods])
        known = {m.name for m in self.models}
        if self.discovery.type != "static" and self.pods:
            raise ValueError(f"pods are listed but discovery.type is {self.discovery.type}: list them or discover them")
        fixed = (self.discovery.kubernetes or self.discovery.dns).models if self.discovery.type != "static" else []
        if [m for m in fixed if m not in known]:
            raise ValueError(f"discovery serves unknown model(s) {[m for m in fixed if m not in known]}; add them under models")
        for pod in self.pods:
            if (pod.kv_events or self.ingest.bind) and not pod.models and len(self.models) > 1:
                raise ValueError(f"pod {pod.id!r} publishes KV events but its models are not listed; list them")
            unknown = [m for m in pod.models if m not in known]
            if unknown:
                raise ValueError(f"pod {pod.id!r} serves unknown model(s) {unknown}; add them under models")


def _unique(section: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{section} lists {name!r} twice")
        seen.add(name)


def _dec_hook(type_: type, value: Any) -> Any:
    if type_ is Duration:
        return Duration.parse(value)
    raise NotImplementedError


def from_dict(data: Any) -> Config:
    try:
        return msgspec.convert(data if data is not None else {}, Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from None


def read_secret(file: str, env: str) -> str | None:
    """A secret from a file (trailing newline dropped) or an environment variable; never logged."""
    import os

    if file:
        try:
            return Path(file).read_text().rstrip("\n")
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {file}: {exc.strerror}") from None
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"environment variable {env} (a secret) is not set")
        return value
    return None


def load(path: str | Path | None) -> Config:
    """Read a YAML or JSON file; None gives the embedded defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"config {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first_line}") from None
    return from_dict(data)


# -- reloads ----------------------------------------------------------------------------

LIVE_KEYS = (
    "routingHeader", "decisionTimeout", "scoring", "tiers", "limits.maxBodyBytes", "limits.maxMessages",
    "limits.maxPromptTokens", "index.maxEntryAge", "ingest.replayTimeout", "ingest.podSilenceTimeout",
    "ingest.janitorInterval", "cacheCleanupInterval", "logLevel", "logFormat", "logPrompts", "health",
    "podHealth", "shutdownDelay", "reloadInterval", "models", "pods",
)
"""Keys (and sections) a reload applies to the running process. Every other change (the
listeners, TLS, the index connection, block keys, tokenizer pool, prefix cache, ingester
sockets) needs a restart and is named so in the log, never silently ignored."""


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted camelCase paths of the settings that differ (lists compare whole)."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in a.keys() | b.keys():
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            out.append(path)

    walk(_builtins(old), _builtins(new), "")
    return sorted(out)


def _builtins(config: Config) -> dict[str, Any]:
    return msgspec.to_builtins(config, enc_hook=lambda value: float(value) if isinstance(value, Duration) else value)


def is_live(key: str) -> bool:
    return any(key == live or key.startswith(live + ".") for live in LIVE_KEYS)


def running_config(old: Config, new: Config, keep: list[str]) -> Config:
    """``new`` with the ``keep`` keys at their ``old`` (running) values: what the process runs
    after a reload that could not apply them. Raises ConfigError if that mix is invalid."""
    merged = _builtins(new)
    running = _builtins(old)
    for key in keep:
        *parents, leaf = key.split(".")
        src, dst = running, merged
        for part in parents:
            src, dst = src[part], dst[part]
        if leaf in src:
            dst[leaf] = src[leaf]
        else:
            dst.pop(leaf, None)
    return from_dict(merged)
