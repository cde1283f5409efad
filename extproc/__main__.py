"""Command line: ``kv-extproc serve|ingest|quickstart``. Builds the objects and owns the event loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
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
from .metrics import Metrics
from .podhealth import PodHealthChecker
from .pods import PodPool
from .prefixcache import PrefixCache
from .routing import Router
from .server import ExtProcService
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


async def serve(config: Config, config_path: str | None = None) -> None:
    profile = scoring.build(config.scoring)
    metrics = Metrics()
    tokenizers = TokenizerManager(
        _tokenizer_sources(config),
        workers=config.tokenization.workers,
        max_queued=config.tokenization.max_queued,
        max_loaded=config.tokenization.max_loaded,
    )
    index = open_index(config.index)
    await index.check_credentials()
    pool = PodPool(config.pods, [m.name for m in config.models])
    cache = build_cache(config)
    indexer = Indexer(
        tokenizers,
        index,
        block_size=config.block_size_to_hash,
        max_blocks=config.max_blocks_to_match,
        scheme=config.hash_scheme,
        max_entry_age=config.index.max_entry_age,
        cache=cache,
        max_prompt_tokens=config.limits.max_prompt_tokens,
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
    _listen(server, config)
    await server.start()
    await readiness.live()
    signals = Signals()

    background: list[asyncio.Future] = []
    if cache is not None:
        metrics.watch_cache(indexer.get_cache_stats)
        await index.subscribe(indexer.on_invalidation)
        background.append(asyncio.ensure_future(_clean_cache(cache, config.cache_cleanup_interval)))
        if config.prefix_store_config.mirror and not index.local:
            background.append(asyncio.ensure_future(_keep_mirror(indexer)))
    membership = None
    if config.discovery.type != "static":
        membership, found = await _discover(config, metrics, background, signals, pool=pool)
        if not found:
            await server.stop(0)
            await index.close()
            tokenizers.close()
            return
    ingester = None
    if config.ingest.enabled:
        ingester = Ingester(index, membership.ingest_config() if membership else config, metrics)
        await ingester.start()
        if membership is not None:
            await membership.attach(ingester.reconfigure)
    if membership is not None and ingester is None:
        membership.purge = index.purge_pod
    if config.pod_health.enabled:
        async def purge(pod_id: str) -> None:
            if ingester is not None:
                await ingester.purge(pod_id, "dead")
            else:
                await index.purge_pod(pod_id)

        ph = config.pod_health
        checker = PodHealthChecker(pool, path=ph.path, interval=ph.interval, timeout=ph.timeout,
                                   unhealthy_after=ph.unhealthy_after, purge_after=ph.purge_after, purge=purge)
        background.append(asyncio.ensure_future(checker.run()))
    metrics.watch_pods(pool, ingester)
    metrics_server = _serve_metrics(config, metrics)
    log.info(
        "kv-extproc serving ext_proc on %s%s (index=%s, %d pods, %d models), metrics on http://%s/metrics",
        config.listen, " (mTLS)" if config.tls.client_ca_file else " (TLS)" if config.tls.enabled else "",
        config.index.backend, len(pool), len(config.models), config.metrics_listen,
    )

    async def reload(new: Config) -> None:
        tokenizers.set_sources(_tokenizer_sources(new))
        if membership is not None:
            await membership.reload(new)
        else:
            pool.update(new.pods, [m.name for m in new.models])
            if ingester is not None:
                await ingester.reconfigure(new)
        for model in new.models:
            background.append(asyncio.ensure_future(_preload(tokenizers, model.name)))
        log.info("config reloaded: %d pods, %d models", len(pool), len(new.models))

    background.append(asyncio.ensure_future(
        readiness.become_ready(tokenizers, [m.name for m in config.models], index,
                               require_index=config.health.require_index, interval=config.health.check_interval,
                               synced=membership.synced if membership else None)))
    if config_path is not None:
        background.append(asyncio.ensure_future(_watch(config_path, config, signals, reload)))
    try:
        await signals.stop.wait()
    finally:
        await readiness.set(False)
        if config.shutdown_delay:
            log.info("shutting down: NOT_SERVING for %.1fs so traffic moves elsewhere", config.shutdown_delay)
            await asyncio.sleep(config.shutdown_delay)
        log.info("shutting down: no new streams, finishing open ones (up to %.0fs)", SHUTDOWN_GRACE_SECONDS)
        await server.stop(SHUTDOWN_GRACE_SECONDS)
        for task in background:
            task.cancel()
        if ingester is not None:
            await ingester.stop()
        metrics_server.shutdown()
        await index.close()
        tokenizers.close()


async def _preload(tokenizers: TokenizerManager, model: str) -> None:
    try:
        await tokenizers.get(model)
    except Exception as exc:  # noqa: BLE001 - logged; its requests fall back meanwhile
        log.warning("%s", exc)


async def _watch(path: str, current: Config, signals: Signals, apply) -> None:
    """Reload pods and models when the file changes or on SIGHUP; a bad file changes nothing."""
    def stamp() -> tuple[float, int] | None:
        try:
            st = os.stat(path)
            return st.st_mtime, st.st_size
        except OSError:
            return None

    seen = stamp()
    interval = current.reload_interval or None
    while True:
        try:
            await asyncio.wait_for(signals.reload.wait(), interval)
        except TimeoutError:
            pass
        asked = signals.reload.is_set()
        signals.reload.clear()
        now = stamp()
        if not asked and now == seen:
            continue
        seen = now
        try:
            new = config_mod.load(path)
        except ConfigError as exc:
            log.error("config not reloaded, keeping the running one: %s", exc)
            continue
        fixed = [name for name in ("listen", "metrics_listen", "index", "tls", "routing_header", "block_size_to_hash",
                                   "hash_scheme", "discovery", "endpoint_picker")
                 if getattr(new, name) != getattr(current, name)]
        if fixed:
            log.warning("config changes to %s need a restart; applying pods and models only", ", ".join(fixed))
        await apply(new)
        current = new


async def _clean_cache(cache: PrefixCache, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
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
    index: BlockIndex = open_index(config.index)
    await index.check_credentials()
    signals = Signals()
    background: list[asyncio.Future] = []
    membership = None
    if config.discovery.type != "static":
        membership, found = await _discover(config, metrics, background, signals)
        if not found:
            await index.close()
            return
    ingester = Ingester(index, membership.ingest_config() if membership else config, metrics)
    await ingester.start()
    if membership is not None:
        await membership.attach(ingester.reconfigure)
    metrics.watch_pods(None, ingester)
    metrics_server = _serve_metrics(config, metrics)
    log.info("kv-extproc ingesting KV events from %d pod(s) into the %s index", len(ingester.feeds), config.index.backend)
    watcher = None
    if config_path is not None:
        async def apply(new: Config) -> None:
            if membership is not None:
                await membership.reload(new)
            else:
                await ingester.reconfigure(new)
            log.info("config reloaded: %d pods with KV events", len(ingester.feeds))

        watcher = asyncio.ensure_future(_watch(config_path, config, signals, apply))
    try:
        await signals.stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        for task in background:
            task.cancel()
        await ingester.stop()
        metrics_server.shutdown()
        await index.close()


async def _discover(config: Config, metrics: Metrics, background: list, signals: Signals, *,
                    pool: PodPool | None = None) -> tuple[Membership, bool]:
    """Start the discovery source; wait for its first pod set (False: asked to stop first)."""
    source = open_source(config, DiscoveryMetrics.on(metrics.registry))
    membership = Membership(config, pool, purge_after=config.discovery.purge_after)
    background.append(asyncio.ensure_future(source.run(membership.apply)))
    background.append(asyncio.ensure_future(membership.run()))
    log.info("discovering pods (%s); waiting for the first pod set", source.name)
    waits = [asyncio.ensure_future(membership.synced.wait()), asyncio.ensure_future(signals.stop.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    if not membership.synced.is_set():
        for task in background:
            task.cancel()
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
    quick_p = sub.add_parser("quickstart", help="run Envoy + kv-extproc + Redis + 3 simulated pods locally")
    quick_p.add_argument("--port", type=int, default=8080, help="Envoy listener port (0 picks a free one)")
    quick_p.add_argument("--exit-after-demo", action="store_true", help="stop after the demo requests")
    args = parser.parse_args(argv)

    if args.command == "simulate-pod":
        from .sim.pod import run_simulated

        run_simulated(args.id, args.listen, kv_events=args.kv_events, tokenizer=args.tokenizer, model=args.model)
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
