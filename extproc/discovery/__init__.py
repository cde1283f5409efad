"""Discovery: where the live pod set comes from.

A source (static.py, kubernetes.py, dns.py) publishes the whole set of ready pods every time
it changes; membership.py applies each set to the running PodPool at once (routing) and to
the ingester's subscriptions (KV events), and purges pods that left after ``purgeAfter``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..config import Config, PodConfig

Publish = Callable[[list[PodConfig]], Awaitable[None]]
"""Called with every ready pod (the whole set), each time the set changes."""


class Source(Protocol):
    name: str

    async def run(self, publish: Publish) -> None:
        """Publish the pod set, then every change, until cancelled; never returns on errors."""


@dataclass
class DiscoveryMetrics:
    errors: Counter
    relists: Counter
    pods: Gauge

    @classmethod
    def on(cls, registry: CollectorRegistry | None) -> "DiscoveryMetrics":
        r = registry or CollectorRegistry()
        return cls(
            Counter("kv_extproc_discovery_errors", "Discovery calls that failed (retried with backoff), by source.",
                    ["source"], registry=r),
            Counter("kv_extproc_discovery_relists",
                    "Full re-lists of the pods, by reason (410 Gone: the watch fell too far behind).",
                    ["reason"], registry=r),
            Gauge("kv_extproc_discovered_pods", "Ready pods the discovery source reports now.", registry=r),
        )


_NOT_LABEL_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def label_safe(name: str) -> str:
    """A model name as a Kubernetes label value can carry it ("Qwen/Qwen3-0.6B" -> "Qwen-Qwen3-0.6B")."""
    return _NOT_LABEL_SAFE.sub("-", name).strip("-_.")[:63]


def open_source(config: Config, metrics: DiscoveryMetrics) -> Source:
    """The configured source; imports its client library only when used."""
    kind = config.discovery.type
    if kind == "kubernetes":
        from .kubernetes import KubernetesSource

        return KubernetesSource(config.discovery.kubernetes, [m.name for m in config.models], metrics)
    if kind == "dns":
        from .dns import DnsSource

        return DnsSource(config.discovery.dns, metrics)
    from .static import StaticSource

    return StaticSource(config.pods)
