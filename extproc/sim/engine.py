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
                 buffer_steps: int = 10_000, ctx: zmq.Context | None = None, bind: bool | None = None):
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
        payload = self._encode([ts if ts is not None else time.time(), events, None])
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


class SimulatedEngine:
    """What a vLLM pod does with its cache per request: look up, store, evict, publish."""

    def __init__(self, tokenize, cache: EngineCache, publisher: KVEventPublisher | None):
        self.tokenize = tokenize
        self.cache = cache
        self.publisher = publisher
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def serve(self, path: str, body: bytes) -> int:
        """Returns how many of the prompt's tokens were already cached."""
        try:
            tokens = self.tokenize(path, body)
        except Exception:  # noqa: BLE001 - a prompt the engine cannot read caches nothing
            return 0
        hit, events = self.cache.admit(tokens)
        self.prompt_tokens += len(tokens)
        self.cached_tokens += hit
        if events and self.publisher is not None:
            self.publisher.publish(events)
        return hit

    def reset(self) -> None:
        events = self.cache.clear()
        if self.publisher is not None:
            self.publisher.publish(events)
