"""ZMQ transport: frames from vLLM publishers to the sequencer, and replay requests.

One SUB socket per pod (``pods[].kvEvents``), or one bound socket that every pod connects
to with topic ``kv@<pod-id>@<model>`` (central mode). Messages waiting on a socket are
taken together (up to DRAIN_MAX) and applied as one run, in one index write.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from ..metrics import Metrics
from .decode import END_OF_REPLAY, DecodeError, decode_replay
from .sequencing import Feed, Sequencer

log = logging.getLogger("extproc.events")

DRAIN_MAX = 512
"""Messages taken from a socket before one write; bounds the write size and the delay."""

CENTRAL_TOPIC_PREFIX = b"kv@"
CENTRAL = "\0central"
"""Name of the central socket (no pod id can clash with it)."""
INBOX_MAX = 10_000
"""Central mode: messages waiting per pod; beyond, they are dropped (a gap, then a resync)."""
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Larger ZMQ messages make ZMQ drop the connection (then a gap): bounds what one publisher costs."""


async def fetch_replay(ctx: zmq.asyncio.Context, timeout: float, feed: Feed, start: int) -> list[tuple[int, bytes]] | None:
    """Every batch the pod's replay endpoint holds from ``start`` on, in order; None if it did not answer."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    replies: list[tuple[int, bytes]] = []
    try:
        sock.connect(feed.replay)
        await sock.send_multipart([b"", start.to_bytes(8, "big")])
        async with asyncio.timeout(timeout):
            while True:
                seq, payload = decode_replay(await sock.recv_multipart())
                if seq == END_OF_REPLAY:
                    break
                if seq >= start:
                    replies.append((seq, payload))
    except (TimeoutError, DecodeError, zmq.ZMQError) as exc:
        log.warning("pod %s: replay from %d failed: %s", feed.pod, start, exc or type(exc).__name__)
        return None
    finally:
        sock.close()
    return sorted(replies)


class Transport:
    def __init__(self, sequencer: Sequencer, ctx: zmq.asyncio.Context, metrics: Metrics, *, topic: str = ""):
        self.sequencer = sequencer
        self.ctx = ctx
        self.metrics = metrics
        self.topic = topic
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._inboxes: dict[str, asyncio.Queue[list[bytes]]] = {}
        """Central mode: each configured pod's messages, waiting for its feed task."""

    def _sub(self, name: str) -> zmq.asyncio.Socket:
        self.close(name)  # a restarted task replaces its socket
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        self._sockets[name] = sock
        return sock

    def close(self, name: str) -> None:
        sock = self._sockets.pop(name, None)
        if sock is not None:
            sock.close(linger=0)
        self._inboxes.pop(name, None)

    def close_all(self) -> None:
        for name in list(self._sockets) + list(self._inboxes):
            self.close(name)

    async def listen_pod(self, feed: Feed, *, catch_up: bool = False) -> None:
        """A pod's own publisher: subscribe, rebuild from its replay buffer if asked, then apply."""
        sock = self._sub(feed.pod)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        watcher = asyncio.ensure_future(self._watch_connection(sock, feed))
        try:
            sock.connect(feed.endpoint)
            log.info("pod %s: subscribed to KV events at %s", feed.pod, feed.endpoint)
            if catch_up:
                await self.sequencer.catch_up(feed)  # live messages queue in the socket meanwhile
            while True:
                batch = await self._drain(sock)
                await self.sequencer.process(feed, batch)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)  # its cleanup needs the socket open
            if self._sockets.get(feed.pod) is sock:
                self.close(feed.pod)

    async def _watch_connection(self, sock: zmq.asyncio.Socket, feed: Feed) -> None:
        """Notice a publisher that went away and came back (a restarted engine, usually)."""
        from zmq.utils.monitor import parse_monitor_message

        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        dropped = False
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_DISCONNECTED:
                    dropped = True
                elif event == zmq.EVENT_CONNECTED and dropped:
                    dropped = False
                    feed.reconnected = True
                    log.info("pod %s: KV event publisher reconnected", feed.pod)
        finally:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(linger=0)

    def open_inbox(self, pod: str) -> asyncio.Queue[list[bytes]]:
        """Central mode: where the listener puts this configured pod's messages."""
        inbox = self._inboxes.get(pod)
        if inbox is None:
            inbox = self._inboxes[pod] = asyncio.Queue(INBOX_MAX)
        return inbox

    async def consume(self, feed: Feed, *, catch_up: bool = False) -> None:
        """Central mode: one pod's messages, applied by its own task, so a failure of one pod
        restarts (and resyncs) that pod only."""
        inbox = self.open_inbox(feed.pod)
        if catch_up:
            await self.sequencer.catch_up(feed)
        while True:
            frames = [await inbox.get()]
            while len(frames) < DRAIN_MAX and not inbox.empty():
                frames.append(inbox.get_nowait())
            await self.sequencer.process(feed, frames)

    async def listen_central(self, endpoint: str) -> None:
        """One bound socket for every pod; messages of pods not configured are counted and
        dropped, so a stray or hostile publisher cannot grow feeds, locks or label sets."""
        sock = self._sub(CENTRAL)
        try:
            sock.setsockopt(zmq.SUBSCRIBE, CENTRAL_TOPIC_PREFIX)
            sock.bind(endpoint)
            log.info("listening for KV events from pods at %s (topic kv@<pod>@<model>)", endpoint)
            while True:
                for frames in await self._drain(sock):
                    inbox = self._inbox_for(frames[0]) if frames else None
                    if inbox is None:
                        self.metrics.unknown_topics.inc()
                        continue
                    try:
                        inbox.put_nowait(frames)
                    except asyncio.QueueFull:
                        self.metrics.events_dropped.inc()  # the sequence gap it leaves resyncs the pod
        finally:
            if self._sockets.get(CENTRAL) is sock:
                self.close(CENTRAL)

    def _inbox_for(self, topic: bytes) -> asyncio.Queue[list[bytes]] | None:
        parts = topic.split(b"@", 2)
        if len(parts) != 3 or parts[0] + b"@" != CENTRAL_TOPIC_PREFIX or not parts[1] or not parts[2]:
            return None
        return self._inboxes.get(parts[1].decode(errors="replace"))

    async def _drain(self, sock: zmq.asyncio.Socket) -> list[list[bytes]]:
        frames = [await sock.recv_multipart()]
        while len(frames) < DRAIN_MAX:
            try:
                frames.append(await sock.recv_multipart(flags=zmq.NOBLOCK))
            except zmq.Again:
                break
        return frames
