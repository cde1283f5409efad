"""A minimal HTTP/1.1 GET for the pod probes (health, /metrics), on the event loop.

Pods are probed every few tens of milliseconds; a general client (connection pools, redirects,
cookies) costs more per call than the probe itself, and the probes need none of it.
"""

from __future__ import annotations

import asyncio


async def get(address: str, path: str, timeout: float, *, max_bytes: int = 0) -> tuple[int, bytes]:
    """Status and body (the body only if ``max_bytes`` > 0, and at most that many bytes).
    Raises OSError, TimeoutError or ValueError when the pod does not answer in HTTP."""
    host, _, port = address.rpartition(":")
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            status_line = (await reader.readline()).split()
            if len(status_line) < 2 or not status_line[1].isdigit():
                raise ValueError(f"not an HTTP status line: {b' '.join(status_line)[:80]!r}")
            status = int(status_line[1])
            if max_bytes <= 0:
                return status, b""
            return status, await _body(reader, max_bytes)
    finally:
        if writer is not None:
            writer.close()


async def _body(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    length = None
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        key, _, value = line.decode("latin-1").partition(":")
        if key.lower() == "content-length":
            length = int(value)
        elif key.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        return await (reader.readexactly(min(length, max_bytes)) if length is not None else reader.read(max_bytes))
    parts, size_read = [], 0
    while size_read < max_bytes:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            break
        parts.append(await reader.readexactly(size))
        size_read += size
        await reader.readline()
    return b"".join(parts)[:max_bytes]
