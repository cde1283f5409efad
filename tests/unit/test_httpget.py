"""The pod probes' HTTP client: the frequent /metrics scrape keeps one connection per pod, and
every way a pod can end or break a connection costs at most that probe, never the next."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from extproc import httpget
from extproc.config import PodConfig
from extproc.load import LoadScraper
from extproc.pods import PodPool

METRICS = b'vllm:num_requests_waiting{engine="0"} 2.0\nvllm:num_requests_running{engine="0"} 1.0\n'


class Pod:
    """A TCP server answering each GET with ``answer(n)`` (n: requests so far); counts connections."""

    def __init__(self, answer, *, close_after: int = 0):
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.requests = 0
        self.server = None

    async def _serve(self, reader, writer):
        self.connections += 1
        served = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                served += 1
                reply = self.answer(self.requests)
                if reply is None:
                    await asyncio.sleep(3600)
                writer.write(reply)
                await writer.drain()
                if self.close_after and served >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc):
        self.server.close()


async def scrape_until(scraper: LoadScraper, pod: Pod, requests: int) -> None:
    """Run the scraper until the pod has served ``requests`` reads (3 s at most), then stop it."""
    task = asyncio.ensure_future(scraper.run())
    for _ in range(300):
        await asyncio.sleep(0.01)
        if pod.requests >= requests:
            break
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def ok(body: bytes = METRICS) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body


async def test_the_scraper_keeps_one_connection_per_pod():
    pod = Pod(lambda n: ok())
    async with pod as address:
        pool = PodPool([PodConfig(id="a", address=address)])
        await scrape_until(LoadScraper(pool, interval=0.01, timeout=0.5), pod, 10)
    assert pod.requests >= 10 and pod.connections == 1
    assert pool.get("a").engine.waiting == 2.0


async def test_a_pod_that_closes_each_connection_is_still_read_every_time():
    pod = Pod(lambda n: ok(), close_after=1)
    async with pod as address:
        connection = httpget.Connection(address)
        bodies = [(await connection.get("/metrics", 1.0, max_bytes=1 << 16))[1] for _ in range(5)]
    assert bodies == [METRICS] * 5
    assert connection.opened == pod.connections == 5, "each probe after the first found its connection closed"


async def test_connection_close_and_http_1_0_answers_are_not_kept():
    answers = [b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
               b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    for answer in answers:
        async with Pod(lambda n: answer) as address:
            connection = httpget.Connection(address)
            assert await connection.get("/", 1.0, max_bytes=10) == (200, b"ok")
            assert await connection.get("/", 1.0, max_bytes=10) == (200, b"ok")
        assert connection.opened == 2


async def test_chunked_and_long_bodies():
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\n"
    async with Pod(lambda n: chunked) as address:
        connection = httpget.Connection(address)
        assert await connection.get("/", 1.0, max_bytes=100) == (200, b"hello world")
        assert await connection.get("/", 1.0, max_bytes=7) == (200, b"hello w"), "cut at max_bytes"
        assert connection.opened == 1, "a chunked body read to its end keeps the connection"
    huge = ok(b"x" * (httpget.KEEP_BODY_BYTES + 1))
    async with Pod(lambda n: huge) as address:
        connection = httpget.Connection(address)
        assert await connection.get("/", 5.0, max_bytes=3) == (200, b"xxx")
        assert await connection.get("/", 5.0, max_bytes=3) == (200, b"xxx")
        assert connection.opened == 2, "a body past KEEP_BODY_BYTES is not read to its end: the connection goes"


async def test_an_answer_cut_short_is_a_value_error_and_the_next_probe_connects_again():
    answers = {1: b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", 2: ok()}
    pod = Pod(lambda n: answers[n], close_after=1)
    async with pod as address:
        connection = httpget.Connection(address)
        with pytest.raises(ValueError, match="closed the connection"):
            await connection.get("/metrics", 1.0, max_bytes=1 << 16)
        assert (await connection.get("/metrics", 1.0, max_bytes=1 << 16))[1] == METRICS
    assert connection.opened == 2


async def test_a_pod_that_does_not_answer_times_out_and_its_connection_is_dropped():
    answers = {1: None, 2: ok()}
    pod = Pod(lambda n: answers[n])
    async with pod as address:
        connection = httpget.Connection(address)
        with pytest.raises(TimeoutError):
            await connection.get("/metrics", 0.1, max_bytes=1 << 16)
        assert (await connection.get("/metrics", 1.0, max_bytes=1 << 16))[1] == METRICS
    assert connection.opened == 2, "an answer still owed on the old connection must not be read as the next one"


async def test_a_removed_pod_s_connection_is_closed():
    pod = Pod(lambda n: ok())
    async with pod as address:
        pool = PodPool([PodConfig(id="a", address=address)])
        scraper = LoadScraper(pool, interval=0.01, timeout=0.5)
        await scraper._scrape_engine([pool.get("a")], asyncio.Semaphore(1))
        kept = scraper._connections[address]
        scraper._forget([])
        assert address not in scraper._connections and kept._streams is None
        await scraper._scrape_engine([pool.get("a")], asyncio.Semaphore(1))
    assert pod.connections == 2


async def test_the_ranks_of_one_engine_share_one_read_of_its_page():
    """Data-parallel ranks are pods at one address: one connection and one read of the page per
    round, each rank's numbers from its own series."""
    page = (b'vllm:num_requests_waiting{engine="0"} 1.0\nvllm:num_requests_running{engine="0"} 2.0\n'
            b'vllm:num_requests_waiting{engine="1"} 5.0\nvllm:num_requests_running{engine="1"} 0.0\n')
    pod = Pod(lambda n: ok(page))
    async with pod as address:
        pool = PodPool([PodConfig(id="a", address=address, data_parallel_size=2)])  # candidates a#0, a#1
        scraper = LoadScraper(pool, interval=0.01, timeout=0.5)
        await scrape_until(scraper, pod, 5)
        reads = pod.requests
        await scraper._scrape_engine(pool.all(), asyncio.Semaphore(1))
    assert pod.requests == reads + 1, "one read for both ranks"
    assert pod.connections == 2, "one kept connection while running (the run's end closed it), then one more"
    assert (pool.get("a#0").engine.waiting, pool.get("a#0").engine.running) == (1.0, 2.0)
    assert (pool.get("a#1").engine.waiting, pool.get("a#1").engine.running) == (5.0, 0.0)


async def test_the_one_off_get_asks_the_pod_to_close():
    seen = []

    async def serve(reader, writer):
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        status, body = await httpget.get(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", "/health", 1.0)
    finally:
        server.close()
    assert (status, body) == (503, b"") and b"Connection: close" in seen[0]


async def test_an_interim_1xx_answer_is_skipped_and_the_connection_stays_in_step():
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n"
    pod = Pod(lambda n: early + ok(b"body %d" % n))
    async with pod as address:
        connection = httpget.Connection(address)
        replies = [await connection.get("/", 1.0, max_bytes=100) for _ in range(3)]
        assert await httpget.get(address, "/health", 1.0) == (200, b""), "the health probe too"
    assert replies == [(200, b"body 1"), (200, b"body 2"), (200, b"body 3")]
    assert connection.opened == 1


async def test_no_content_answers_keep_the_connection():
    pod = Pod(lambda n: b"HTTP/1.1 204 No Content\r\n\r\n" if n == 1 else ok())
    async with pod as address:
        connection = httpget.Connection(address)
        assert await connection.get("/", 1.0, max_bytes=100) == (204, b"")
        assert (await connection.get("/", 1.0, max_bytes=1 << 16))[1] == METRICS
    assert connection.opened == 1


async def test_a_body_without_length_is_read_to_the_end_of_the_connection():
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nfirst part, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"second part")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        connection = httpget.Connection(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        assert await connection.get("/", 1.0, max_bytes=100) == (200, b"first part, second part")
        assert connection._streams is None, "such a body ends with its connection"
    finally:
        server.close()
