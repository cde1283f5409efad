"""Every Prometheus metric the process exports, defined in one place.

Metrics live on a registry owned by the process entry point (no module-level globals),
so tests can build as many independent servers as they like.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _Children:
    """A labelled metric whose children are looked up once per label set: prometheus_client's
    labels() takes a lock and validates its arguments on every call, a cost on every request.
    Everything else goes to the metric itself."""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric):
        self._metric = metric
        self._children: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child

    def __getattr__(self, name: str):
        return getattr(self._metric, name)


class LoopHistogram(Collector):
    """A histogram observed on the event loop only, for what every decision observes (six
    times). prometheus_client's takes a lock and walks its buckets in Python on each
    observation; here it is a bisect and two additions, safe under the GIL with one writing
    thread. A scrape (another thread) copies the counts, then reads the sum: it may see an
    observation in the sum and not yet in a bucket, never a count going back. Unlike
    prometheus_client's, it exports no ``_created`` series."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry):
        self._name, self._documentation, self._labelnames = name, documentation, list(labelnames)
        self._bounds = tuple(float(b) for b in buckets if b != float("inf"))
        self._children: dict[tuple[str, ...], _Observations] = {}
        self._unlabelled = None if labelnames else self.labels()
        registry.register(self)

    def labels(self, *values: str) -> _Observations:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            child = self._children[values] = _Observations(self._bounds)
        return child

    def observe(self, amount: float) -> None:
        """For a histogram without labels."""
        self._unlabelled.observe(amount)  # type: ignore[union-attr]

    def describe(self):
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self):
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for le, count in zip(les, counts):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(values), buckets, total)
        yield family


class _Observations:
    __slots__ = ("counts", "sum", "_bounds")

    def __init__(self, bounds: tuple[float, ...]):
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        """Per bucket, not cumulative; the last is +Inf."""
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self._bounds, amount)] += 1  # the first bucket whose bound is >= amount
        self.sum += amount


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kv_extproc_requests",
            "Requests seen, by outcome: cache (routed by prefix), load (no prefix match), "
            "fallback (routed by load after a failure), rejected (4xx), passthrough (not a completion call).",
            ["outcome"],
            registry=r,
        )
        self.fallbacks = Counter(
            "kv_extproc_fallbacks", "Requests routed without cache awareness, by reason.", ["reason"], registry=r
        )
        self.stage_seconds = LoopHistogram(
            "kv_extproc_stage_seconds",
            "Time spent per routing stage (parse, tokenize, hash, lookup, score, decision).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefix_ratio = LoopHistogram(
            "kv_extproc_matched_prefix_ratio",
            "Fraction of the prompt's blocks cached on the chosen pod.",
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=r,
        )
        self.index_errors = Counter(
            "kv_extproc_index_errors", "Index lookups that failed or timed out.", registry=r
        )
        self.events = Counter(
            "kv_extproc_kv_events", "KV events ingested, by type.", ["type"], registry=r
        )
        self.event_decode_errors = Counter(
            "kv_extproc_kv_event_decode_errors", "KV event frames or events that could not be used.", registry=r
        )
        self.sequence_gaps = Counter(
            "kv_extproc_kv_event_sequence_gaps", "Gaps in a publisher's sequence numbers.", ["pod"], registry=r
        )
        self.replays = Counter(
            "kv_extproc_kv_event_replays", "Replay requests, by result (ok, incomplete, failed).", ["result"], registry=r
        )
        self.pod_purges = Counter(
            "kv_extproc_pod_purges",
            "Times a pod's index entries were dropped, by reason (cleared, restart, gap, silent, unconfigured, ...).",
            ["reason"],
            registry=r,
        )
        self.router_blocks_written = Counter(
            "kv_extproc_router_blocks_written", "Router blocks recorded in the index for a pod.", registry=r
        )
        self.expired_entries = Counter(
            "kv_extproc_expired_entries", "Index entries removed for being older than maxEntryAge.", registry=r
        )
        self.ingest_lag = Histogram(
            "kv_extproc_kv_event_lag_seconds",
            "From the engine's batch timestamp to the ingester applying it.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "kv_extproc_prefix_cache_lookups", "Routing decisions by prefix cache outcome (hit, partial, miss).",
            ["outcome"], registry=r,
        )
        self.task_restarts = Counter(
            "kv_extproc_task_restarts", "Background tasks restarted after an unexpected exception, by task.",
            ["task"], registry=r,
        )
        self.events_rejected = Counter(
            "kv_extproc_kv_events_rejected",
            "Well-formed KV events that failed validation and were skipped, by reason.", ["reason"], registry=r,
        )
        self.unknown_topics = Counter(
            "kv_extproc_kv_event_unknown_topic",
            "Central-mode messages whose topic names no configured pod (dropped).", registry=r,
        )
        self.events_dropped = Counter(
            "kv_extproc_kv_event_dropped",
            "Central-mode messages dropped because the pod's queue was full (seen later as a gap).", registry=r,
        )
        self.index_lost = Counter(
            "kv_extproc_index_lost",
            "Times the ingester found the index emptied (e.g. Redis restarted without persistence) and rebuilt it.",
            registry=r,
        )
        self.load_scrape_errors = Counter(
            "kv_extproc_load_scrape_errors", "Engine /metrics scrapes that failed or timed out.", ["pod"], registry=r
        )
        self.internal_errors = Counter(
            "kv_extproc_internal_errors",
            "Requests that hit a bug of ours and were passed on unrouted (Envoy's own pool chose).", registry=r,
        )
        self.in_flight = Gauge(
            "kv_extproc_pod_in_flight_requests", "Requests this process routed that are still open.", ["pod"], registry=r
        )
        # Touched by every request: each label set is looked up once.
        self.requests, self.fallbacks, self.cache_lookups, self.in_flight = (
            _Children(m) for m in (self.requests, self.fallbacks, self.cache_lookups, self.in_flight))

    def watch_pods(self, pool, ingester) -> None:
        """Export the configured pods and, with an ingester, how old each pod's index view is."""
        self.registry.register(_PodCollector(pool, ingester))

    def watch_tasks(self, failing_by_kind: Callable[[], dict[str, int]]) -> None:
        """Export how many critical background tasks keep failing, by task."""
        self.registry.register(_TaskCollector(failing_by_kind))

    def watch_cache(self, get_stats: Callable) -> None:
        """Export the prefix cache's own statistics, read at scrape time."""
        self.registry.register(_CacheCollector(get_stats))


class _TaskCollector(Collector):
    def __init__(self, failing_by_kind: Callable[[], dict[str, int]]):
        self._failing_by_kind = failing_by_kind

    def collect(self):
        failing = GaugeMetricFamily("kv_extproc_tasks_failing",
                                    "Critical background tasks failing again and again (readiness reports them).",
                                    labels=["task"])
        for kind, count in sorted(self._failing_by_kind().items()):
            failing.add_metric([kind], float(count))
        yield failing


class _CacheCollector(Collector):
    def __init__(self, get_stats: Callable):
        self._get_stats = get_stats

    def collect(self):
        s = self._get_stats()
        yield GaugeMetricFamily("kv_extproc_prefix_cache_entries", "Text chunks in the prefix store.", value=s.entries)
        yield GaugeMetricFamily("kv_extproc_prefix_cache_prompts", "Whole prompts whose block keys are cached.",
                                value=s.prompts)
        yield GaugeMetricFamily("kv_extproc_prefix_cache_block_owners", "Blocks whose owners are cached.",
                                value=s.owners)
        yield GaugeMetricFamily("kv_extproc_prefix_cache_mirror_complete",
                                "1 while the owner cache holds the whole index (mirror mode).",
                                value=1.0 if s.mirror_complete else 0.0)
        yield GaugeMetricFamily("kv_extproc_prefix_cache_memory_bytes", "Estimated memory of the cache.",
                                value=s.memory_bytes)
        yield CounterMetricFamily("kv_extproc_prefix_cache_evictions", "Entries evicted (LRU).", value=s.evictions)
        yield CounterMetricFamily("kv_extproc_prefix_cache_feed_updates",
                                  "Cached block owners changed by the invalidation feed.", value=s.updates)


class _PodCollector(Collector):
    def __init__(self, pool, ingester):
        self._pool = pool
        self._ingester = ingester

    def collect(self):
        import time

        if self._pool is not None:
            yield GaugeMetricFamily("kv_extproc_pods", "Candidate pods configured.", value=len(self._pool))
            healthy = GaugeMetricFamily("kv_extproc_pod_healthy", "1 if the pod answers its health checks.",
                                        labels=["pod"])
            engine = {name: GaugeMetricFamily(f"kv_extproc_pod_engine_{name}", text, labels=["pod"]) for name, text in (
                ("requests_waiting", "The engine's vllm:num_requests_waiting, last scraped (absent while stale)."),
                ("requests_running", "The engine's vllm:num_requests_running, last scraped."),
                ("kv_cache_usage", "The engine's vllm:kv_cache_usage_perc, last scraped (0..1)."))}
            owed = GaugeMetricFamily("kv_extproc_pod_owed_prefill_tokens",
                                     "Uncached prompt tokens of this process's open requests to the pod, as each "
                                     "decision estimated them, whole until each stream ends (the ttft scorer "
                                     "counts them with a decode each, shrinking over the pod's request lifetime).",
                                     labels=["pod"])
            lifetime = GaugeMetricFamily("kv_extproc_pod_request_lifetime_seconds",
                                         "A typical request of this process's to the pod, routing to the end of its "
                                         "ext_proc stream (EWMA; absent until one ended).", labels=["pod"])
            batching = GaugeMetricFamily("kv_extproc_pod_engine_batching",
                                         "1 once the engine has reported two requests running at once: it batches, "
                                         "and the ttft scorer counts no decodes ahead.", labels=["pod"])
            serial = GaugeMetricFamily("kv_extproc_pod_engine_serial",
                                       "1 once the engine has reported requests waiting beside a single one "
                                       "running: unless another was seen batching, the ttft scorer counts the "
                                       "decodes ahead (engines are taken to batch until one shows this).",
                                       labels=["pod"])
            for pod in self._pool.all():
                healthy.add_metric([pod.id], 1.0 if pod.healthy else 0.0)
                batching.add_metric([pod.id], 1.0 if pod.batching else 0.0)
                serial.add_metric([pod.id], 1.0 if pod.serial else 0.0)
                owed.add_metric([pod.id], float(pod.open_tokens))
                if pod.ledger.lifetime is not None:
                    lifetime.add_metric([pod.id], pod.ledger.lifetime)
                if pod.engine is not None:
                    engine["requests_waiting"].add_metric([pod.id], pod.engine.waiting)
                    engine["requests_running"].add_metric([pod.id], pod.engine.running)
                    engine["kv_cache_usage"].add_metric([pod.id], pod.engine.kv_usage)
            yield healthy
            yield batching
            yield serial
            yield owed
            yield lifetime
            yield from engine.values()
        if self._ingester is not None:
            age = GaugeMetricFamily("kv_extproc_pod_index_age_seconds",
                                    "Seconds since the pod's last KV event reached the index.", labels=["pod"])
            now = time.monotonic()
            for pod, feed in list(self._ingester.feeds.items()):
                age.add_metric([pod], now - feed.last_seen)
            yield age
