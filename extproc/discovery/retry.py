"""The one place a discovery loop survives its errors: log, count, back off, go again.

Kept small and alone so it can move under the process supervisor (supervise.py) later.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

log = logging.getLogger("extproc.discovery")


async def keep_running(name: str, step: Callable[[], Awaitable[None]], errors: Counter, *,
                       first_delay: float = 0.2, max_delay: float = 30.0,
                       passthrough: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``step`` forever. Returning means "go again now"; raising is logged, counted and
    retried after an exponential, jittered backoff that resets once a step succeeds. Exceptions
    in ``passthrough`` end the loop (they are the caller's signal, not failures)."""
    delay = first_delay
    while True:
        try:
            await step()
            delay = first_delay
        except (asyncio.CancelledError, *passthrough):
            raise
        except Exception as exc:  # noqa: BLE001 - discovery must outlive any error; the pod set is kept
            errors.inc()
            log.warning("%s failed (%s: %s); retrying in %.1fs, keeping the last pod set",
                        name, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(max_delay, delay * 2)
