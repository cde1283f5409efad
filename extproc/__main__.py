"""Command line: ``kv-extproc serve|ingest|quickstart``. Builds the objects and owns the event loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc
import uvloop

from . import config as config_mod
from .config import Config, ConfigError
from .events.ingest import Ingester
from .health import Readiness
from .index import open_index
from .indexer import Indexer
from .metrics import Metrics
from .pods import PodPool
from .prefixcache import PrefixCache, PrefixCacheConfig
from .routing import Router
from .server import ExtProcService
from .tokenization import TokenizerManager

log = logging.getLogger("extproc")

SHUTDOWN_GRACE_SECONDS = 10.0


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("grpc").setLevel(logging.WARNING)


async def serve(config: Config) -> None:
    metrics = Metrics()
    tokenizers = TokenizerManager(
        {m.name: m.tokenizer_source for m in config.models},
        workers=config.tokenization.workers,
        max_queued=config.tokenization.max_queued,
        max_loaded=config.tokenization.max_loaded,
    )
    index = open_index(config.index)
    pool = PodPool(config.pods)
    cache = build_cache(config)
    indexer = Indexer(
        tokenizers,
        index,
        block_size=config.block_size_to_hash,
        max_blocks=config.max_blocks_to_match,
        scheme=config.hash_scheme,
        max_entry_age=config.index.max_entry_age,
        cache=cache,
    )
    background: list[asyncio.Future] = []
    if cache is not None:
        metrics.watch_cache(indexer.get_cache_stats)
        await index.subscribe(indexer.on_invalidation)
        background.append(asyncio.ensure_future(_clean_cache(cache, config.cache_cleanup_interval)))
    router = Router(pool, indexer, metrics, decision_timeout=config.decision_timeout)
    service = ExtProcService(
        router, metrics, routing_header=config.routing_header, max_body_bytes=config.limits.max_body_bytes
    )

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((service.handler(),))
    readiness = Readiness(server)
    if server.add_insecure_port(config.listen) == 0:
        raise ConfigError(f"cannot listen on {config.listen}")
    await server.start()

    ingester = None
    if config.ingest.enabled:
        ingester = Ingester(index, config, metrics)
        await ingester.start()
    metrics_server = _serve_metrics(config, metrics)
    log.info(
        "kv-extproc serving ext_proc on %s (index=%s, %d pods, %d models), metrics on http://%s/metrics",
        config.listen, config.index.backend, len(pool), len(config.models), config.metrics_listen,
    )

    preloading = asyncio.ensure_future(readiness.become_ready(tokenizers, [m.name for m in config.models], index))
    try:
        await _until_signal()
    finally:
        log.info("shutting down: finishing open streams (up to %.0fs)", SHUTDOWN_GRACE_SECONDS)
        preloading.cancel()
        for task in background:
            task.cancel()
        await readiness.set(False)
        await server.stop(SHUTDOWN_GRACE_SECONDS)
        if ingester is not None:
            await ingester.stop()
        metrics_server.shutdown()
        await index.close()
        tokenizers.close()


async def ingest(config: Config) -> None:
    """The ingester alone: one per fleet is enough, and two are safe (writes are idempotent)."""
    metrics = Metrics()
    index = open_index(config.index)
    ingester = Ingester(index, config, metrics)
    await ingester.start()
    metrics_server = _serve_metrics(config, metrics)
    log.info("kv-extproc ingesting KV events from %d pod(s) into the %s index", len(ingester.feeds), config.index.backend)
    try:
        await _until_signal()
    finally:
        await ingester.stop()
        metrics_server.shutdown()
        await index.close()


def build_cache(config: Config) -> PrefixCache | None:
    if not config.enable_pod_mapping_cache:
        return None
    store = config.prefix_store_config
    return PrefixCache(PrefixCacheConfig(
        chunk_chars=store.block_size,
        max_chunks=store.max_entries,
        enable_pod_mappings=store.enable_pod_mapping_cache,
        pod_mapping_ttl=store.pod_mapping_ttl,
        max_pod_sets_per_block=store.max_pod_sets_per_block,
        max_mappings=store.max_pod_mappings,
    ))


async def _clean_cache(cache: PrefixCache, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        removed = cache.cleanup_expired_mappings()
        if removed:
            log.debug("prefix cache: %d expired pod mappings removed", removed)


def _serve_metrics(config: Config, metrics: Metrics):
    from prometheus_client import start_http_server

    host, _, port = config.metrics_listen.rpartition(":")
    server, _ = start_http_server(int(port), addr=host, registry=metrics.registry)
    return server


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kv-extproc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the ext_proc server")
    serve_p.add_argument("--config", help="YAML or JSON config file (default: embedded defaults)")
    ingest_p = sub.add_parser("ingest", help="run the KV event ingester alone")
    ingest_p.add_argument("--config", help="YAML or JSON config file (default: embedded defaults)")
    quick_p = sub.add_parser("quickstart", help="run Envoy + kv-extproc + Redis + 3 simulated pods locally")
    quick_p.add_argument("--port", type=int, default=8080, help="Envoy listener port (0 picks a free one)")
    quick_p.add_argument("--exit-after-demo", action="store_true", help="stop after the demo requests")
    args = parser.parse_args(argv)

    if args.command == "quickstart":
        from .quickstart import run

        return run(port=args.port, stay_up=not args.exit_after_demo)
    try:
        config = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"kv-extproc: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    try:
        uvloop.run(serve(config) if args.command == "serve" else ingest(config))
    except ConfigError as exc:
        print(f"kv-extproc: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
