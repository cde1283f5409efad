"""Command line: ``kv-extproc serve|ingest|quickstart``. Builds the objects and owns the event loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import uvloop

from . import config as config_mod
from . import logs, scoring
from .config import Config, ConfigError
from .discovery import DiscoveryMetrics, open_source
from .discovery.membership import Membership
from .events.ingest import Ingester
from .health import Readiness
from .index import BlockIndex, IndexUnavailable, open_index
from . import indexer as indexer_mod
from .indexer import Indexer
from .load import LoadScraper
from .prefixcache.speculation import Speculation
from .metrics import Metrics
from .podhealth import PodHealthChecker
from .pods import PodPool
from .prefixcache import PrefixCache
from .remotetok import RemoteTokenizer, RemoteTokenizerMetrics
from .routing import Router
from .server import ExtProcService
from .supervise import Supervisor
from .tokenization import TokenizerManager

log = logging.getLogger("extproc")

SHUTDOWN_GRACE_SECONDS = 10.0


def build_cache(config: Config) -> PrefixCache | None:
    if not config.enable_pod_mapping_cache:
        return None
    return indexer_mod.build_cache(config.prefix_store_config, block_size=config.block_size_to_hash,
                                   max_blocks=config.max_blocks_to_match, scheme=config.hash_scheme)


def _tokenizer_sources(config: Config) -> dict[str, str]:
    return {m.name: m.tokenizer_source for m in config.models}


def _awaited_tokenizers(config: Config) -> list[str]:
    """Models whose local tokenizer readiness waits for: none for ``tokenizer: remote``, and none
    with remoteFallback (their engines tokenize while the local one loads)."""
    if config.tokenization.remote_fallback:
        return []
    return [m.name for m in config.models if not m.remote]


def build_remote_tokenizer(config: Config, pool: PodPool, metrics: Metrics) -> RemoteTokenizer:
    remote = config.tokenization.remote
    return RemoteTokenizer(pool, timeout=remote.timeout, max_in_flight_per_pod=remote.max_in_flight_per_pod,
                           attempts=remote.attempts, breaker_failures=remote.breaker_failures,
                           breaker_open_for=remote.breaker_open_for, fallback=config.tokenization.remote_fallback,
                           metrics=RemoteTokenizerMetrics.on(metrics.registry))


def _listen(server: grpc.aio.Server, config: Config) -> None:
    tls = config.tls
    if tls.enabled:
        try:
            key, cert = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()
            ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
        except OSError as exc:
            raise ConfigError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
        credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
        bound = server.add_secure_port(config.listen, credentials)
    else:
        bound = server.add_insecure_port(config.listen)
    if bound == 0:
        raise ConfigError(f"cannot listen on {config.listen}")


class Signals:
    """SIGTERM/SIGINT end the process; SIGHUP asks for a config reload."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.reload = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload.set)


@dataclass
class Served:
    """Everything a reload can change in a running ``serve``; ``apply`` changes it."""

    config: Config
    """The running config: what was applied, never merely what a file said."""
    supervisor: Supervisor
    pool: PodPool
    tokenizers: TokenizerManager
    indexer: Indexer
    router: Router
    service: ExtProcService
    readiness: Readiness
    checker: PodHealthChecker
    ingester: Ingester | None = None
    membership: Membership | None = None
    """With discovery: the discovered pods (a reload changes models and settings, not pods)."""

    def start_pod_health(self) -> None:
        if self.config.pod_health.enabled:
            self.supervisor.spawn("podhealth", self.checker.run)

    async def apply(self, new: Config) -> None:
        """Apply a reloaded config's live settings (config.LIVE_KEYS); the caller has already
        named the others as needing a restart and kept their running values in ``new``."""
        profile = scoring.build(new.scoring)  # may refuse the file: before anything changes
        old, self.config = self.config, new
        before, after = _tokenizer_sources(old), _tokenizer_sources(new)
        self.tokenizers.set_sources(after)
        if self.indexer.cache is not None:
            for model in before.keys() & after.keys():
                if before[model] != after[model]:
                    self.indexer.cache.store.forget_model(model)
        if self.membership is not None:
            await self.membership.reload(new)  # subscriptions follow the discovered pods
        else:
            self.pool.update(new.pods, [m.name for m in new.models])
            if self.ingester is not None:
                await self.ingester.reconfigure(new)
        self.router.profile = profile
        self.indexer.speculation.ttl = new.scoring.speculative_ttl
        self.router.decision_timeout = new.decision_timeout
        self.router.log_prompts = new.log_prompts
        self.service.routing_header = new.routing_header
        self.service.max_body_bytes = new.limits.max_body_bytes
        self.service.max_messages = new.limits.max_messages
        self.indexer.max_prompt_tokens = new.limits.max_prompt_tokens
        self.indexer.max_entry_age = new.index.max_entry_age
        self.indexer.medium_weights = dict(new.tiers.medium_weights)
        self.readiness.reconfigure(require_index=new.health.require_index, interval=new.health.check_interval)
        self.checker.reconfigure(**_pod_health_settings(new))
        if new.pod_health.enabled != old.pod_health.enabled:
            if new.pod_health.enabled:
                self.start_pod_health()
            else:
                await self.supervisor.stop("podhealth")
                for pod in self.pool.all():
                    pod.healthy, pod.failing_since = True, None
        if (new.log_level, new.log_format) != (old.log_level, old.log_format):
            logs.setup(new.log_level, new.log_format)
        for model in new.models:
            if not model.remote and not self.tokenizers.loaded(model.name):
                self.supervisor.spawn(f"preload {model.name}", partial(_preload, self.tokenizers, model.name),
                                      kind="preload")
        log.info("config reloaded: %d pods, %d models", len(self.pool), len(new.models))


def _pod_health_settings(config: Config) -> dict:
    ph = config.pod_health
    return {"path": ph.path, "interval": ph.interval, "timeout": ph.timeout, "unhealthy_after": ph.unhealthy_after,
            "purge_after": ph.purge_after}


async def serve(config: Config, config_path: str | None = None) -> None:
    profile = scoring.build(config.scoring)
    metrics = Metrics()
    supervisor = Supervisor(metrics)
    metrics.watch_tasks(supervisor.failing_by_kind)
    tokenizers = TokenizerManager(
        _tokenizer_sources(config),
        workers=config.tokenization.workers,
        max_queued=config.tokenization.max_queued,
        max_loaded=config.tokenization.max_loaded,
    )
    index = open_index(config.index)
    log.info("index: %s", getattr(index, "where", "memory, in this process"))
    await index.check_credentials()
    pool = PodPool(config.pods, [m.name for m in config.models])
    cache = build_cache(config)
    remote_tokenizer = build_remote_tokenizer(config, pool, metrics)
    indexer = Indexer(
        tokenizers,
        index,
        block_size=config.block_size_to_hash,
        max_blocks=config.max_blocks_to_match,
        scheme=config.hash_scheme,
        max_entry_age=config.index.max_entry_age,
        cache=cache,
        max_prompt_tokens=config.limits.max_prompt_tokens,
        speculation=Speculation(config.scoring.speculative_ttl),  # ttl 0: off, and a reload may turn it on
        remote=remote_tokenizer,
        medium_weights=dict(config.tiers.medium_weights),
    )
    router = Router(pool, indexer, profile, metrics, decision_timeout=config.decision_timeout,
                    log_prompts=config.log_prompts)
    service = ExtProcService(router, metrics, routing_header=config.routing_header,
                             max_body_bytes=config.limits.max_body_bytes, max_messages=config.limits.max_messages,
                             fallback_endpoints=config.endpoint_picker.fallback_endpoints)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                             maximum_concurrent_rpcs=config.limits.max_concurrent_streams)
    server.add_generic_rpc_handlers((service.handler(),))
    readiness = Readiness(server)
    await readiness.set(False)  # grpc's health servicer starts out SERVING: not before we are ready
    _listen(server, config)
    await server.start()
    await readiness.live()
    signals = Signals()

    membership = None
    if config.discovery.type != "static":
        membership, found = await _discover(config, metrics, supervisor, signals, pool=pool)
        if not found:
            await supervisor.stop_all()
            await server.stop(0)
            await index.close()
            tokenizers.close()
            return
    ingester = None
    if config.ingest.enabled:
        ingester = Ingester(index, membership.ingest_config() if membership else config, metrics, supervisor=supervisor)
        await ingester.start()
        if membership is not None:
            await membership.attach(ingester.reconfigure)
    if membership is not None and ingester is None:
        membership.purge = index.purge_pod

    async def purge(pod_id: str) -> None:
        if ingester is not None:
            await ingester.purge(pod_id, "dead")
        else:
            await index.purge_pod(pod_id)

    checker = PodHealthChecker(pool, **_pod_health_settings(config), purge=purge)
    served = Served(config, supervisor, pool, tokenizers, indexer, router, service, readiness, checker, ingester,
                    membership)
    if cache is not None:
        metrics.watch_cache(indexer.get_cache_stats)
        await index.subscribe(indexer.on_invalidation, supervisor=supervisor)
        supervisor.spawn("cache_cleanup", lambda: _clean_cache(cache, served))
        if config.prefix_store_config.mirror and not index.local:
            supervisor.spawn("mirror", lambda: _keep_mirror(indexer))
    served.start_pod_health()
    if config.load.enabled:
        lc = config.load
        scraper = LoadScraper(pool, path=lc.path, interval=lc.interval, timeout=lc.timeout, stale_after=lc.stale_after,
                              concurrency=lc.max_concurrent, metrics=metrics)
        supervisor.spawn("load", scraper.run)
    metrics.watch_pods(pool, ingester)
    metrics_server = _serve_metrics(config, metrics)
    log.info(
        "kv-extproc serving ext_proc on %s%s (index=%s, %d pods, %d models), metrics on http://%s/metrics",
        config.listen, " (mTLS)" if config.tls.client_ca_file else " (TLS)" if config.tls.enabled else "",
        config.index.backend, len(pool), len(config.models), config.metrics_listen,
    )
    supervisor.spawn("readiness", lambda: readiness.become_ready(
        tokenizers, _awaited_tokenizers(config), index, require_index=served.config.health.require_index,
        interval=served.config.health.check_interval, supervisor=supervisor,
        synced=membership.synced if membership else None))
    if config.tokenization.remote_fallback:
        for model in config.models:
            if not model.remote:
                supervisor.spawn(f"preload {model.name}", partial(_preload, tokenizers, model.name), kind="preload")
    if config_path is not None:
        watcher = ConfigWatcher(config_path, signals, lambda: served.config, served.apply)
        supervisor.spawn("reload", watcher.run)
    try:
        await signals.stop.wait()
    finally:
        await readiness.close()
        delay = served.config.shutdown_delay
        if delay:
            log.info("shutting down: NOT_SERVING for %.1fs so traffic moves elsewhere", delay)
            await asyncio.sleep(delay)
        log.info("shutting down: no new streams, finishing open ones (up to %.0fs)", SHUTDOWN_GRACE_SECONDS)
        await server.stop(SHUTDOWN_GRACE_SECONDS)
        if ingester is not None:
            await ingester.stop()
        await supervisor.stop_all()
        metrics_server.shutdown()
        await index.close()
        await remote_tokenizer.close()
        tokenizers.close()


async def _preload(tokenizers: TokenizerManager, model: str) -> None:
    try:
        await tokenizers.get(model)
    except Exception as exc:  # noqa: BLE001 - logged; its requests fall back meanwhile
        log.warning("%s", exc)


@dataclass
class ConfigWatcher:
    """Reloads the config file when it changes or on SIGHUP. A bad file changes nothing;
    changes that cannot be applied live are named, in one line, as needing a restart, and
    the running config keeps their old values, so every later reload is compared against
    what really runs."""

    path: str
    signals: Signals
    running: Callable[[], Config]
    apply: Callable[[Config], Awaitable[None]]
    _seen: tuple[float, int] | None = field(default=None, init=False)

    def _stamp(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.path)
            return st.st_mtime, st.st_size
        except OSError:
            return None

    async def run(self) -> None:
        if self._seen is None:
            self._seen = self._stamp()
        while True:
            try:
                await asyncio.wait_for(self.signals.reload.wait(), self.running().reload_interval or None)
            except TimeoutError:
                pass
            asked = self.signals.reload.is_set()
            self.signals.reload.clear()
            now = self._stamp()
            if not asked and now == self._seen:
                continue
            self._seen = now
            await self.reload()

    async def reload(self) -> None:
        try:
            new = config_mod.load(self.path)
        except ConfigError as exc:
            log.error("config not reloaded, keeping the running one: %s", exc)
            return
        current = self.running()
        changed = config_mod.changed_keys(current, new)
        if not changed:
            return
        fixed = [key for key in changed if not config_mod.is_live(key)]
        if fixed:
            log.warning("config changes to %s need a restart to take effect; the running values stay until then",
                        ", ".join(fixed))
            try:
                new = config_mod.running_config(current, new, fixed)
            except ConfigError as exc:
                log.error("config not reloaded: its live changes do not fit the running settings: %s", exc)
                return
        try:
            await self.apply(new)
        except ConfigError as exc:
            log.error("config not reloaded, keeping the running one: %s", exc)


async def _clean_cache(cache: PrefixCache, served: Served) -> None:
    while True:
        await asyncio.sleep(served.config.cache_cleanup_interval)
        removed = cache.owners.sweep()
        if removed:
            log.debug("prefix cache: %d expired block owner answers removed", removed)


async def _keep_mirror(indexer: Indexer) -> None:
    """Load the index into the owner cache, and again whenever it stops being complete (a lost
    feed); stop trying once the entry bound has been reached (the cache works per block then)."""
    owners = indexer.cache.owners
    while True:
        if not owners.complete and not owners.evictions:
            started = time.monotonic()
            try:
                if await indexer.load_mirror():
                    log.info("block owner mirror loaded: %d blocks in %.2fs", owners.size()[0],
                             time.monotonic() - started)
            except IndexUnavailable as exc:
                log.warning("block owner mirror not loaded (%s); lookups ask the index meanwhile", exc)
        await asyncio.sleep(1.0)


async def ingest(config: Config, config_path: str | None = None) -> None:
    """The ingester alone: one per fleet is enough, and two are safe (writes are idempotent)."""
    metrics = Metrics()
    supervisor = Supervisor(metrics)
    metrics.watch_tasks(supervisor.failing_by_kind)
    index: BlockIndex = open_index(config.index)
    log.info("index: %s", getattr(index, "where", "memory, in this process"))
    await index.check_credentials()
    signals = Signals()
    membership = None
    if config.discovery.type != "static":
        membership, found = await _discover(config, metrics, supervisor, signals)
        if not found:
            await supervisor.stop_all()
            await index.close()
            return
    ingester = Ingester(index, membership.ingest_config() if membership else config, metrics, supervisor=supervisor)
    await ingester.start()
    if membership is not None:
        await membership.attach(ingester.reconfigure)
    metrics.watch_pods(None, ingester)
    metrics_server = _serve_metrics(config, metrics)
    log.info("kv-extproc ingesting KV events from %d pod(s) into the %s index", len(ingester.feeds), config.index.backend)
    if config_path is not None:
        running = [config]

        async def apply(new: Config) -> None:
            if (new.log_level, new.log_format) != (running[0].log_level, running[0].log_format):
                logs.setup(new.log_level, new.log_format)
            if membership is not None:
                await membership.reload(new)
            else:
                await ingester.reconfigure(new)
            running[0] = new
            log.info("config reloaded: %d pods with KV events", len(ingester.feeds))

        supervisor.spawn("reload", ConfigWatcher(config_path, signals, lambda: running[0], apply).run)
    try:
        await signals.stop.wait()
    finally:
        await ingester.stop()
        await supervisor.stop_all()
        metrics_server.shutdown()
        await index.close()


async def _discover(config: Config, metrics: Metrics, supervisor: Supervisor, signals: Signals, *,
                    pool: PodPool | None = None) -> tuple[Membership, bool]:
    """Start the discovery source; wait for its first pod set (False: asked to stop first)."""
    source = open_source(config, DiscoveryMetrics.on(metrics.registry))
    membership = Membership(config, pool, purge_after=config.discovery.purge_after)
    supervisor.spawn("discovery", lambda: source.run(membership.apply), critical=True)
    supervisor.spawn("discovery_expiry", membership.run)
    log.info("discovering pods (%s); waiting for the first pod set", source.name)
    waits = [asyncio.ensure_future(membership.synced.wait()), asyncio.ensure_future(signals.stop.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    if not membership.synced.is_set():
        return membership, False
    return membership, True


def _serve_metrics(config: Config, metrics: Metrics):
    from prometheus_client import start_http_server

    host, _, port = config.metrics_listen.rpartition(":")
    server, _ = start_http_server(int(port), addr=host, registry=metrics.registry)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kv-extproc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the ext_proc server"), ("ingest", "run the KV event ingester alone")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--config", help="YAML or JSON config file (default: embedded defaults)")
    sim = sub.add_parser("simulate-pod", help="run one simulated vLLM pod (demos, compose)")
    sim.add_argument("--id", required=True)
    sim.add_argument("--listen", default="127.0.0.1:8000")
    sim.add_argument("--kv-events", default="", help="publish KV events here, e.g. tcp://*:5557")
    sim.add_argument("--tokenizer", default="", help="tokenizer dir (default: the bundled Qwen3 one)")
    sim.add_argument("--model", default="Qwen/Qwen3-0.6B")
    sim.add_argument("--prefill-tokens-per-s", type=float, default=0.0,
                     help="prefill time for uncached prompt tokens (0: instant); prompts queue for it")
    sim.add_argument("--decode-ms", type=float, default=0.0, help="decode time per request, after the first token")
    quick_p = sub.add_parser("quickstart", help="run Envoy + kv-extproc + Redis + 3 simulated pods locally")
    quick_p.add_argument("--port", type=int, default=8080, help="Envoy listener port (0 picks a free one)")
    quick_p.add_argument("--exit-after-demo", action="store_true", help="stop after the demo requests")
    args = parser.parse_args(argv)

    if args.command == "simulate-pod":
        from .sim.pod import run_simulated

        run_simulated(args.id, args.listen, kv_events=args.kv_events, tokenizer=args.tokenizer, model=args.model,
                      prefill_tokens_per_s=args.prefill_tokens_per_s, decode_s=args.decode_ms / 1000)
        return 0
    if args.command == "quickstart":
        from .sim.quickstart import run

        return run(port=args.port, stay_up=not args.exit_after_demo)
    try:
        config = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"kv-extproc: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
    try:
        uvloop.run((serve if args.command == "serve" else ingest)(config, args.config))
    except ConfigError as exc:
        print(f"kv-extproc: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
