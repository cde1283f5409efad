"""The janitor: drops what no event will ever correct.

- A pod silent for ``ingest.podSilenceTimeout`` (off by default: idle engines publish
  nothing) has its entries dropped, once, until it speaks again.
- With ``index.maxEntryAge``, entries stored longer ago are removed (lookups already ignore them).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..config import Config
from ..index import BlockIndex, IndexUnavailable
from ..metrics import Metrics
from .sequencing import Sequencer

log = logging.getLogger("extproc.events")


class Janitor:
    def __init__(self, sequencer: Sequencer, index: BlockIndex, config: Config, metrics: Metrics):
        self.sequencer = sequencer
        self.index = index
        self.config = config
        self.metrics = metrics
        self._wake = asyncio.Event()

    def reconfigure(self, config: Config) -> None:
        """Adopt reloaded settings now, not after the interval the old config asked for."""
        self.config = config
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.ingest.janitor_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.sweep()

    async def sweep(self) -> None:
        silence = self.config.ingest.pod_silence_timeout
        now = time.monotonic()
        for feed in list(self.sequencer.feeds.values()):
            if silence and not feed.silent_purged and now - feed.last_seen > silence:
                async with self.sequencer.lock(feed.pod):
                    if feed.closed or feed.silent_purged or time.monotonic() - feed.last_seen <= silence:
                        continue
                    feed.silent_purged = await self.sequencer.purge(feed.pod, "silent")
        max_age = self.config.index.max_entry_age
        if not max_age:
            return
        try:
            pods = await self.index.pods()
        except IndexUnavailable as exc:
            log.warning("janitor: %s", exc)
            return
        for pod in pods:
            try:
                expired = await self.index.expire(pod, time.time() - max_age)
            except IndexUnavailable as exc:
                log.warning("janitor: %s", exc)
                return
            if expired:
                self.metrics.expired_entries.inc(expired)
