"""A simulated vLLM engine cache that publishes real vLLM KV events.

It keeps an LRU of 16-token engine blocks, hashed with its own random seed (opaque to
the router, like a real engine's hashes), and publishes on ZMQ exactly what vLLM does:
``[topic, seq (8 bytes big-endian), msgpack batch]``, in the 0.32 layout (the batch as
``[ts, events, rank]``, events as maps tagged ``"type"``), with a ROUTER replay endpoint.
Used by the fake pods of the tests, the quickstart and the fleet simulator.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence

import msgspec
import zmq

END_SEQ = (2**64 - 1).to_bytes(8, "big")


class KVEventPublisher:
    def __init__(self, endpoint: str, *, replay_endpoint: str | None = None, topic: str = "kv-events",
                 buffer_steps: int = 10_000, ctx: zmq.Context | None = None, bind: bool | None = None,
                 rank: int | None = None):
        self._ctx = ctx or zmq.Context.instance()
        self._lock = threading.Lock()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        if bind is None:  # vLLM's rule: bind when the endpoint has a wildcard, else connect
            bind = "*" in endpoint or endpoint.startswith(("ipc://", "inproc://"))
        if bind:
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self.endpoint = self._pub.getsockopt(zmq.LAST_ENDPOINT).decode() if bind else endpoint
        self.topic = topic.encode()
        self.rank = rank
        """data_parallel_rank of every batch (vLLM tags each rank's batches)."""
        self.seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._encode = msgspec.msgpack.Encoder().encode
        self._running = True
        self._replay_thread = None
        self.replay_endpoint = None
        if replay_endpoint:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.bind(replay_endpoint)
            self.replay_endpoint = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
            self._replay_thread = threading.Thread(target=self._serve_replay, daemon=True, name="kv-replay")
            self._replay_thread.start()

    def publish(self, events: list[dict], *, ts: float | None = None, send: bool = True) -> int:
        """Publish one batch; ``send=False`` buffers it for replay but drops it on the wire (a lost message)."""
        payload = self._encode([ts if ts is not None else time.time(), events, self.rank])
        with self._lock:
            seq = self.seq
            self.seq += 1
            self._buffer.append((seq, payload))
            if send:
                self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def restart(self) -> None:
        """Like a restarted engine process: sequence from 0, empty replay buffer."""
        with self._lock:
            self.seq = 0
            self._buffer.clear()

    def _serve_replay(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        while self._running:
            if not poller.poll(100):
                continue
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            if len(frames) != 3:
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            with self._lock:
                buffered = [(s, p) for s, p in self._buffer if s >= start_seq]
            for seq, payload in buffered:
                self._router.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
            self._router.send_multipart([client, b"", END_SEQ, b""])

    def close(self) -> None:
        self._running = False
        if self._replay_thread is not None:
            self._replay_thread.join(2)
            self._router.close()
        self._pub.close()


def stored_event(hashes: Sequence[int], parent: int | None, tokens: Sequence[int], block_size: int,
                 lora_name: str | None = None, medium: str = "GPU") -> dict:
    return {"type": "BlockStored", "block_hashes": list(hashes), "parent_block_hash": parent,
            "token_ids": list(tokens), "block_size": block_size, "lora_id": None, "medium": medium,
            "lora_name": lora_name}


def placeholder_event(last_hash: int, medium: str = "CPU") -> dict:
    """vLLM's offloading connector without self_describing_kv_events: a chunk named by its last block."""
    return {"type": "BlockStored", "block_hashes": [last_hash], "parent_block_hash": None, "token_ids": [],
            "block_size": 0, "lora_id": None, "medium": medium, "lora_name": None}


def removed_event(hashes: Sequence[int], medium: str = "GPU") -> dict:
    return {"type": "BlockRemoved", "block_hashes": list(hashes), "medium": medium}


CLEARED_EVENT = {"type": "AllBlocksCleared"}


class EngineCache:
    """An engine's prefix cache: LRU over full blocks, each named by a seeded chained hash."""

    def __init__(self, capacity_blocks: int = 4096, block_size: int = 16, seed: int | None = None):
        self.capacity = capacity_blocks
        self.block_size = block_size
        self.seed = (seed if seed is not None else random.getrandbits(64)).to_bytes(8, "big")
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.lock = threading.Lock()

    def _hash(self, parent: int | None, tokens: Sequence[int]) -> int:
        data = self.seed + (parent or 0).to_bytes(8, "big") + b"".join(t.to_bytes(4, "big") for t in tokens)
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")  # full 64 bits, like vLLM's

    def hashes(self, tokens: Sequence[int]) -> list[int]:
        parent, out = None, []
        for i in range(len(tokens) // self.block_size):
            parent = self._hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            out.append(parent)
        return out

    def admit(self, tokens: Sequence[int]) -> tuple[int, list[dict]]:
        """Serve a prompt: returns (tokens that were cached, the events the engine emits)."""
        hashes = self.hashes(tokens)
        with self.lock:
            hit = 0
            while hit < len(hashes) and hashes[hit] in self.blocks:
                self.blocks.move_to_end(hashes[hit])
                hit += 1
            new = hashes[hit:]
            for h in new:
                self.blocks[h] = None
            evicted = []
            keep = set(hashes)
            while len(self.blocks) > self.capacity:
                oldest = next(iter(self.blocks))
                if oldest in keep:
                    break
                del self.blocks[oldest]
                evicted.append(oldest)
        events = []
        if evicted:
            events.append(removed_event(evicted))
        if new:
            bs = self.block_size
            events.append(stored_event(new, hashes[hit - 1] if hit else None, tokens[hit * bs : len(hashes) * bs], bs))
        return hit * self.block_size, events

    def clear(self) -> list[dict]:
        with self.lock:
            self.blocks.clear()
        return [CLEARED_EVENT]


class OffloadingEngineCache(EngineCache):
    """An engine that also keeps blocks in CPU memory, as vLLM's OffloadingConnector does with
    ``self_describing_kv_events``: every block of a prompt is written to the CPU tier (LRU of
    ``cpu_blocks``), events name the medium; a prompt's run continues from the GPU into CPU
    memory, and those blocks are loaded back onto the GPU instead of computed."""

    def __init__(self, capacity_blocks: int = 4096, block_size: int = 16, seed: int | None = None, *,
                 cpu_blocks: int = 16384):
        super().__init__(capacity_blocks, block_size, seed)
        self.cpu_capacity = cpu_blocks
        self.cpu: OrderedDict[int, None] = OrderedDict()

    def admit(self, tokens: Sequence[int]) -> tuple[int, list[dict]]:
        gpu, cpu, events = self.admit_tiered(tokens)
        return gpu + cpu, events

    def admit_tiered(self, tokens: Sequence[int]) -> tuple[int, int, list[dict]]:
        """Serve a prompt: (tokens cached on the GPU, tokens loaded from CPU memory, events)."""
        hashes = self.hashes(tokens)
        bs = self.block_size
        with self.lock:
            gpu = 0
            while gpu < len(hashes) and hashes[gpu] in self.blocks:
                self.blocks.move_to_end(hashes[gpu])
                gpu += 1
            cpu = gpu
            while cpu < len(hashes) and hashes[cpu] in self.cpu:
                cpu += 1
            for h in hashes[gpu:]:
                self.blocks[h] = None
            keep = set(hashes)
            evicted = self._evict(self.blocks, self.capacity, keep)
            offload = [i for i, h in enumerate(hashes) if h not in self.cpu]
            for h in hashes:
                self.cpu[h] = None
                self.cpu.move_to_end(h)
            dropped = self._evict(self.cpu, self.cpu_capacity, keep)
        events = []
        if evicted:
            events.append(removed_event(evicted))
        if gpu < len(hashes):
            events.append(stored_event(hashes[gpu:], hashes[gpu - 1] if gpu else None, tokens[gpu * bs : len(hashes) * bs],
                                       bs))
        if dropped:
            events.append(removed_event(dropped, "CPU"))
        start = 0
        while start < len(offload):  # one event per run of consecutive blocks, as chunks chain
            end = start
            while end + 1 < len(offload) and offload[end + 1] == offload[end] + 1:
                end += 1
            first, last = offload[start], offload[end]
            events.append(stored_event(hashes[first : last + 1], hashes[first - 1] if first else None,
                                       tokens[first * bs : (last + 1) * bs], bs, medium="CPU"))
            start = end + 1
        return gpu * bs, (cpu - gpu) * bs, events

    @staticmethod
    def _evict(blocks: OrderedDict, capacity: int, keep: set[int]) -> list[int]:
        evicted = []
        while len(blocks) > capacity:
            oldest = next(iter(blocks))
            if oldest in keep:
                break
            del blocks[oldest]
            evicted.append(oldest)
        return evicted

    def clear(self) -> list[dict]:
        """vLLM's /reset_prefix_cache: the GPU's blocks go; what is offloaded stays."""
        return super().clear()


class SimulatedEngine:
    """What a vLLM pod does with its cache and its time per request.

    Look up, store, evict, publish; and, when ``prefill_tokens_per_s`` is set, take time as an
    engine does: prompts are prefilled one at a time (a queue), for as long as their uncached
    tokens take, then decode for ``decode_s`` alongside the others. KV events are published
    after the prefill, as vLLM does. ``waiting``/``running`` are what its /metrics report.
    """

    def __init__(self, tokenize, cache: EngineCache, publisher: KVEventPublisher | None, *,
                 prefill_tokens_per_s: float = 0.0, decode_s: float = 0.0):
        self.tokenize = tokenize
        self.cache = cache
        self.publisher = publisher
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.decode_s = decode_s
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.queries = 0
        self.waiting = 0
        self.running = 0
        self.peak_running = 0
        """The most requests it has run at once (two or more: it has been seen batching)."""
        self._prefill = threading.Lock()
        self._counts = threading.Lock()

    def serve(self, path: str, body: bytes, headers: dict[str, str] | None = None, first_token=None) -> int:
        """Returns how many of the prompt's tokens were already cached; calls ``first_token()``
        when the prefill is done (streaming answers send their first chunk then)."""
        try:
            tokens = self.tokenize(path, body)
        except Exception:  # noqa: BLE001 - a prompt the engine cannot read caches nothing
            tokens = []
        with self._counts:
            self.waiting += 1
        try:
            with self._prefill:
                with self._counts:
                    self.waiting -= 1
                    self.running += 1
                    self.peak_running = max(self.peak_running, self.running)
                hit, events = self.cache.admit(tokens) if tokens else (0, [])
                if self.prefill_tokens_per_s:
                    time.sleep((len(tokens) - hit) / self.prefill_tokens_per_s)
                with self._counts:
                    self.queries += 1
                    self.prompt_tokens += len(tokens)
                    self.cached_tokens += hit
                if events and self.publisher is not None:
                    self.publisher.publish(events)
            if first_token is not None:
                first_token()
            if self.decode_s:
                time.sleep(self.decode_s)
        finally:
            with self._counts:
                self.running -= 1
        return hit

    def metrics_text(self) -> str:
        """vLLM's names, in Prometheus text format."""
        with self._counts:
            waiting, running = self.waiting, self.running
            queries, hits = self.prompt_tokens, self.cached_tokens
        usage = len(self.cache.blocks) / self.cache.capacity if self.cache.capacity else 0.0
        label = '{engine="0",model_name="sim"}'
        return (f"vllm:num_requests_waiting{label} {waiting}.0\n"
                f"vllm:num_requests_running{label} {running}.0\n"
                f"vllm:kv_cache_usage_perc{label} {usage}\n"
                f"vllm:prefix_cache_queries_total{label} {queries}.0\n"
                f"vllm:prefix_cache_hits_total{label} {hits}.0\n")

    def reset(self) -> None:
        events = self.cache.clear()
        if self.publisher is not None:
            self.publisher.publish(events)

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()


class DataParallelEngine:
    """vLLM with --data-parallel-size N behind one address: N engines, each with its own cache
    and publisher (port + rank, batches tagged with the rank). A request carrying
    X-data-parallel-rank runs on that rank (vLLM 0.11.0+); without it, the ranks take turns
    (vLLM balances by load). A rank outside 0..N-1 is refused, as vLLM refuses it."""

    def __init__(self, ranks: list[SimulatedEngine]):
        self.ranks = ranks
        self.publisher = None
        self.served_by: list[int] = []
        """The rank of each request served, in order."""
        self._turn = 0
        self._lock = threading.Lock()

    def serve(self, path: str, body: bytes, headers: dict[str, str] | None = None, first_token=None) -> int:
        value = {k.lower(): v for k, v in (headers or {}).items()}.get("x-data-parallel-rank")
        with self._lock:
            if value is None:
                rank, self._turn = self._turn % len(self.ranks), self._turn + 1
            else:
                rank = int(value)
                if not 0 <= rank < len(self.ranks):
                    raise ValueError(f"data_parallel_rank {rank} is out of range [0, {len(self.ranks)})")
            self.served_by.append(rank)
        return self.ranks[rank].serve(path, body, first_token=first_token)

    def metrics_text(self) -> str:
        """One set of vLLM metrics per rank, labelled by engine as vLLM labels them."""
        return "".join(engine.metrics_text().replace('engine="0"', f'engine="{rank}"')
                       for rank, engine in enumerate(self.ranks))

    def reset(self) -> None:
        for engine in self.ranks:
            engine.reset()

    def close(self) -> None:
        for engine in self.ranks:
            engine.close()
