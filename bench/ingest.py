"""Ingest: engine blocks per second decoded and applied to a local Redis, and the delay from
a BlockStored being published to its router key being readable (median, p99).

The publisher runs in its own process (as a vLLM engine would), the ingester in this one.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import textwrap
import time

import redis.asyncio as aioredis
import uvloop

from extproc import config as config_mod
from extproc.sim import launcher
from extproc.blocks import block_keys
from extproc.events.ingest import Ingester
from extproc.sim.engine import EngineCache, KVEventPublisher
from extproc.index.redis import RedisIndex
from extproc.metrics import Metrics

from .common import write

ENGINE_BLOCK = 16
ROUTER_BLOCK = 128
SHAPES = ((64, 1500), (8, 6000))
"""(engine blocks per BlockStored, batches): a 1k-token prefill in one step; a 128-token one."""
DELAY_SAMPLES = 200

_BLASTER = textwrap.dedent("""
    import sys, time, random, msgspec, zmq
    endpoint, batches, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ctx = zmq.Context(); pub = ctx.socket(zmq.PUB); pub.setsockopt(zmq.SNDHWM, 0); pub.bind(endpoint)
    rng = random.Random(7); enc = msgspec.msgpack.Encoder()
    payloads = []
    for b in range(batches):
        tokens = [rng.randrange(150000) for _ in range(per * 16)]
        hashes = [rng.getrandbits(64) for _ in range(per)]
        ev = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None, "token_ids": tokens,
              "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None}
        payloads.append(enc.encode([time.time(), [ev], None]))
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # the subscriber is connected: go
    for seq, p in enumerate(payloads):
        pub.send_multipart([b"kv-events", seq.to_bytes(8, "big"), p])
    sys.stdin.readline()
""")


async def _throughput(redis_url: str, per_event: int, batches: int, *, index: dict | None = None) -> dict:
    """``index``: the index section to ingest into (default: standalone at ``redis_url``)."""
    endpoint = f"tcp://127.0.0.1:{launcher.free_port()}"
    warm = subprocess.Popen([sys.executable, "-c", _BLASTER, endpoint, str(batches), str(per_event)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert warm.stdout.readline().strip() == "ready"
    conf = config_mod.from_dict({
        "index": index or {"backend": "redis", "redisUrl": redis_url},
        "blockSizeToHash": ROUTER_BLOCK, "models": [{"name": "m"}],
        "pods": [{"id": "pod-a", "address": "127.0.0.1:1", "kvEvents": endpoint}],
    })
    ingester = Ingester(RedisIndex.from_config(conf.index), conf, Metrics())
    await ingester.start()
    await asyncio.sleep(0.5)  # let the subscription land before the blast
    feed = ingester.feeds["pod-a"]
    t0 = time.perf_counter()
    warm.stdin.write("go\n")
    warm.stdin.flush()
    while feed.last_seq != batches - 1:
        await asyncio.sleep(0.001)
    # process() returns only after its pipeline is written, so the last batch is in Redis now.
    async with ingester.sequencer.lock(feed.pod):
        elapsed = time.perf_counter() - t0
    warm.stdin.write("done\n")
    warm.stdin.flush()
    warm.wait(10)
    gaps = ingester.metrics.sequence_gaps.labels("pod-a")._value.get()
    await ingester.stop()
    await ingester.index.close()
    blocks = batches * per_event
    return {"engine_blocks_per_event": per_event, "engine_blocks": blocks, "router_blocks": blocks * ENGINE_BLOCK // ROUTER_BLOCK, "seconds": elapsed,
            "engine_blocks_per_s": blocks / elapsed, "router_blocks_per_s": blocks * ENGINE_BLOCK / ROUTER_BLOCK / elapsed,
            "sequence_gaps": gaps}


async def _delay(redis_url: str) -> dict:
    publisher = KVEventPublisher("tcp://127.0.0.1:*")
    conf = config_mod.from_dict({
        "index": {"backend": "redis", "redisUrl": redis_url},
        "blockSizeToHash": ROUTER_BLOCK, "models": [{"name": "m"}],
        "pods": [{"id": "pod-b", "address": "127.0.0.1:1", "kvEvents": publisher.endpoint}],
    })
    ingester = Ingester(RedisIndex.from_config(conf.index), conf, Metrics())
    await ingester.start()
    reader = aioredis.from_url(redis_url)
    feed = ingester.feeds["pod-b"]
    while feed.last_seq is None:
        publisher.publish([])
        await asyncio.sleep(0.02)
    samples = []
    engine = EngineCache(capacity_blocks=10**6, block_size=ENGINE_BLOCK)
    for i in range(DELAY_SAMPLES):
        tokens = [(i * 7919 + j) % 150000 for j in range(ROUTER_BLOCK)]
        key = f"matrix:kv:block:m@{block_keys(tokens, ROUTER_BLOCK, 1)[0]}"
        events = engine.admit(tokens)[1]
        t0 = time.perf_counter()
        publisher.publish(events)
        while not await reader.hexists(key, "pod-b"):
            await asyncio.sleep(0)
        samples.append(time.perf_counter() - t0)
    await reader.aclose()
    await ingester.stop()
    await ingester.index.close()
    publisher.close()
    samples.sort()
    return {"samples": len(samples), "p50_ms": statistics.median(samples) * 1e3,
            "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1e3}


async def run_async() -> dict:
    workdir = launcher.workdir("kv-extproc-bench-")
    server = launcher.start_redis(workdir)
    try:
        throughput = [await _throughput(server.url, per_event, batches) for per_event, batches in SHAPES]
        delay = await _delay(server.url)
    finally:
        server.proc.stop()
    result = {"throughput": throughput, "delay": delay, "target": {"engine_blocks_per_s": 50_000, "p50_ms": 5.0}}
    for row in throughput:
        print(f"ingest    {row['engine_blocks_per_s']:>9,.0f} engine blocks/s ({row['router_blocks_per_s']:,.0f} router "
              f"blocks/s) into Redis, {row['engine_blocks_per_event']} blocks per event, gaps {row['sequence_gaps']:.0f}")
    print(f"ingest    publish -> readable in Redis: p50 {delay['p50_ms']:.2f} ms, p99 {delay['p99_ms']:.2f} ms")
    write("ingest", result)
    return result


def run() -> dict:
    return uvloop.run(run_async())


if __name__ == "__main__":
    run()
