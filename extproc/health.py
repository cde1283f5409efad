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

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from .index import BlockIndex
from .server import SERVICE_NAME
from .tokenization import TokenizerManager

log = logging.getLogger("extproc.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


LIVENESS = "liveness"
READINESS = "readiness"


class Readiness:
    SERVICES = ("", READINESS, SERVICE_NAME)

    def __init__(self, server: grpc.aio.Server):
        self.servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self.ready = False

    async def live(self) -> None:
        """The process answers gRPC: liveness is SERVING from now on, whatever readiness says."""
        await self.servicer.set(LIVENESS, SERVING)

    async def set(self, ready: bool) -> None:
        self.ready = ready
        for service in self.SERVICES:
            await self.servicer.set(service, SERVING if ready else NOT_SERVING)

    async def become_ready(self, tokenizers: TokenizerManager, models: list[str], index: BlockIndex, *,
                           require_index: bool = False, interval: float = 5.0,
                           synced: asyncio.Event | None = None) -> None:
        """Wait for tokenizers, a first index answer and (with discovery) a first pod set; then,
        if asked, follow the index's health."""
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
        await self.set(True)
        log.info("ready: %d tokenizer(s) loaded, index answered", len(models))
        while require_index:
            await asyncio.sleep(interval)
            try:
                await index.ping()
                healthy = True
            except Exception:  # noqa: BLE001 - any failure means "index unreachable"
                healthy = False
            if healthy != self.ready:
                log.warning("index %s: readiness now %s", "back" if healthy else "unreachable",
                            "SERVING" if healthy else "NOT_SERVING")
                await self.set(healthy)
