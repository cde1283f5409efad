"""Static discovery: the config file's ``pods`` (reloaded with the file, as before)."""

from __future__ import annotations

import asyncio

from ..config import PodConfig
from . import Publish


class StaticSource:
    name = "static"

    def __init__(self, pods: list[PodConfig]):
        self.pods = list(pods)

    async def run(self, publish: Publish) -> None:
        await publish(self.pods)
        await asyncio.Event().wait()  # nothing changes until the config is reloaded
