"""A minimal HTTP/1.1 GET for the pod probes (health, /metrics), on the event loop.

Pods are probed every few tens of milliseconds; a general client (connection pools, redirects,
cookies) costs more per call than the probe itself, and the probes need none of it. The
frequent ones keep their connection (``Connection``): a new one per scrape was 20 connects a
second per pod and replica, each leaving a socket in TIME_WAIT on a busy engine.
"""

from __future__ import annotations

import asyncio

KEEP_BODY_BYTES = 1 << 20
"""A body up to this long is read to its end, so the connection can serve the next probe."""


class Connection:
    """One pod's kept-alive HTTP/1.1 connection, for one probe at a time. A connection the pod
    closed while idle is replaced once, at no cost to the probe; any other failure closes it,
    and the next probe connects again."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.opened = 0
        """Connections made so far."""
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str, timeout: float, *, max_bytes: int = 0, keep_alive: bool = True) -> tuple[int, bytes]:
        """Status and body (the body only if ``max_bytes`` > 0, and at most that many bytes).
        Raises OSError, TimeoutError or ValueError when the pod does not answer in HTTP."""
        close = b"" if keep_alive else b"Connection: close\r\n"
        request = f"GET {path} HTTP/1.1\r\nHost: {self.address}\r\n".encode() + close + b"\r\n"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    reused = self._streams is not None
                    reader, writer = self._streams or await self._connect()
                    try:
                        writer.write(request)
                        await writer.drain()
                        status_line = await reader.readline()
                    except ConnectionError:
                        if not reused:
                            raise
                        status_line = b""
                    if not status_line and reused:
                        self.close()  # closed by the pod while idle: once more, on a new connection
                        continue
                    if not keep_alive and max_bytes <= 0 and (status := _status(status_line)) >= 200:
                        self.close()
                        return status, b""
                    status, body, keep = await _response(reader, status_line, max_bytes)
                    if not keep or not keep_alive:
                        self.close()
                    return status, body
        except asyncio.IncompleteReadError:
            self.close()
            raise ValueError("the pod closed the connection in the middle of its answer") from None
        except BaseException:
            self.close()
            raise

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, _, port = self.address.rpartition(":")
        self._streams = await asyncio.open_connection(host, int(port))
        self.opened += 1
        return self._streams

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def get(address: str, path: str, timeout: float, *, max_bytes: int = 0) -> tuple[int, bytes]:
    """One GET on a connection of its own (for probes seconds apart)."""
    return await Connection(address).get(path, timeout, max_bytes=max_bytes, keep_alive=False)


async def _response(reader: asyncio.StreamReader, status_line: bytes, max_bytes: int) -> tuple[int, bytes, bool]:
    """(status, body up to max_bytes, whether the connection can serve another request)."""
    while True:
        status = _status(status_line)
        keep, length, chunked = await _headers(reader, status_line.startswith(b"HTTP/1.1 "))
        if not 100 <= status < 200 or status == 101:
            break
        status_line = await reader.readline()  # an interim answer (103 Early Hints...): the final one follows
    if status == 101:
        return status, b"", False  # not asked for: whatever the pod switched to, it is not HTTP
    if status in (204, 304):
        return status, b"", keep
    limit = max(max_bytes, KEEP_BODY_BYTES) if keep else max_bytes
    if chunked:
        body, complete = await _chunks(reader, limit)
        return status, body[:max_bytes], keep and complete
    if length is not None:
        body = await reader.readexactly(min(length, limit))
        return status, body[:max_bytes], keep and length <= limit
    parts, size = [], 0  # no length: the body ends with the connection
    while size < max_bytes:
        data = await reader.read(max_bytes - size)
        if not data:
            break
        parts.append(data)
        size += len(data)
    return status, b"".join(parts), False


async def _headers(reader: asyncio.StreamReader, keep: bool) -> tuple[bool, int | None, bool]:
    """(keep the connection, Content-Length, chunked) from the header lines."""
    length = None
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            return keep, length, chunked
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        key, _, value = line.decode("latin-1").partition(":")
        key = key.strip().lower()
        if key == "content-length":
            length = int(value)
        elif key == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif key == "connection" and "close" in value.lower():
            keep = False


def _status(status_line: bytes) -> int:
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {status_line[:80]!r}")
    return int(parts[1])


async def _chunks(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    """A chunked body up to ``limit`` bytes, and whether it was read to its end."""
    parts, size_read = [], 0
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(parts), True
        if size_read + size > limit:
            return b"".join(parts), False
        parts.append(await reader.readexactly(size))
        size_read += size
        await reader.readline()
