"""Liveness and readiness on the standard gRPC health service, on the ext_proc port itself.

Service names as the endpoint-picker protocol (GAIE proposal 004) expects: ``liveness`` is
SERVING while the process answers; ``readiness``, the ext_proc service name and "" are
NOT_SERVING until every configured model's tokenizer is loaded, the index has answered once
and discovery has its first pod set (before that, requests would fall back or find no pod),
and again from SIGTERM on.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from .index import BlockIndex
from .server import SERVICE_NAME
from .supervise import Supervisor
from .tokenization import TokenizerManager

log = logging.getLogger("extproc.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


LIVENESS = "liveness"
READINESS = "readiness"


class Readiness:
    """NOT_SERVING until ready; then also while the index is unreachable (with
    ``health.requireIndex``) or a critical background task keeps failing (a dead KV feed would
    leave routing wrong, so Envoy should send streams to another replica)."""

    SERVICES = ("", READINESS, SERVICE_NAME)

    def __init__(self, server: grpc.aio.Server):
        self.servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self.ready = False
        self.closing = False
        self.require_index = False
        self.interval = 5.0

    async def live(self) -> None:
        """The process answers gRPC: liveness is SERVING from now on, whatever readiness says."""
        await self.servicer.set(LIVENESS, SERVING)

    async def set(self, ready: bool) -> None:
        self.ready = ready
        for service in self.SERVICES:
            await self.servicer.set(service, SERVING if ready else NOT_SERVING)

    async def close(self) -> None:
        """NOT_SERVING for good (shutting down): nothing turns it back."""
        self.closing = True
        await self.set(False)

    def reconfigure(self, *, require_index: bool, interval: float) -> None:
        self.require_index, self.interval = require_index, interval

    async def become_ready(self, tokenizers: TokenizerManager, models: list[str], index: BlockIndex, *,
                           require_index: bool = False, interval: float = 5.0,
                           synced: asyncio.Event | None = None, supervisor: Supervisor | None = None) -> None:
        """Wait for tokenizers, a first index answer and (with discovery) a first pod set; then
        follow the index (if asked) and the critical background tasks."""
        self.reconfigure(require_index=require_index, interval=interval)
        await self.set(False)
        if synced is not None:
            await synced.wait()
        for model in models:
            while True:
                try:
                    await tokenizers.get(model)
                    break
                except Exception as exc:  # noqa: BLE001 - keep trying; requests fall back meanwhile
                    log.warning("not ready: %s", exc)
                    await asyncio.sleep(tokenizers.RETRY_FAILED_LOAD_AFTER)
        while True:
            try:
                await index.ping()
                break
            except Exception as exc:  # noqa: BLE001
                log.warning("not ready: index did not answer: %s", exc)
                await asyncio.sleep(1.0)
        if self.closing:
            return
        await self.set(True)
        log.info("ready: %d tokenizer(s) loaded, index answered", len(models))
        index_ok, pinged = True, time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.interval))
            if not self.require_index:
                index_ok = True
            elif time.monotonic() - pinged >= self.interval:
                pinged = time.monotonic()
                try:
                    await index.ping()
                    index_ok = True
                except Exception:  # noqa: BLE001 - any failure means "index unreachable"
                    index_ok = False
            failing = supervisor.failing() if supervisor is not None else []
            ready = index_ok and not failing
            if ready != self.ready and not self.closing:
                why = "index unreachable" if not index_ok else \
                    f"failing: {', '.join(f'{t.name} ({t.last_error})' for t in failing)}" if failing else "all well again"
                log.warning("readiness now %s: %s", "SERVING" if ready else "NOT_SERVING", why)
                await self.set(ready)
