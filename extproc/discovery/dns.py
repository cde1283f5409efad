"""DNS discovery: a headless Service name resolved every few seconds (A and AAAA records).

For plain Envoy or compose deployments: each address is one pod, reached on the configured
port (A records carry none). A failed lookup keeps the last pod set (a DNS hiccup must not
empty the fleet); a name that does not exist, or has no records, means no pods.
"""

from __future__ import annotations

import asyncio
import logging

import dns.asyncresolver
import dns.resolver

from ..config import DnsDiscovery, PodConfig
from . import DiscoveryMetrics, Publish
from .retry import keep_running

log = logging.getLogger("extproc.discovery")


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def pods_for(ips: list[str], conf: DnsDiscovery) -> list[PodConfig]:
    """One pod per address; its id is its address (no names in A records)."""
    pods = []
    for ip in sorted(set(ips)):
        host = _host(ip)
        address = f"{host}:{conf.port}"
        pods.append(PodConfig(
            id=address, address=address, models=list(conf.models),
            kv_events=f"tcp://{host}:{conf.kv_events_port}" if conf.kv_events_port else "",
            kv_replay=f"tcp://{host}:{conf.kv_replay_port}" if conf.kv_replay_port else "",
        ))
    return pods


class DnsSource:
    name = "dns"

    def __init__(self, conf: DnsDiscovery, metrics: DiscoveryMetrics):
        self.conf = conf
        self.metrics = metrics
        self.resolver = dns.asyncresolver.Resolver(configure=not conf.nameserver)
        if conf.nameserver:
            host, _, port = conf.nameserver.rpartition(":")
            self.resolver.nameservers = [host.strip("[]")]
            self.resolver.port = int(port)
        self.resolver.lifetime = conf.timeout
        self._last: list[str] | None = None

    async def resolve(self) -> list[str]:
        """Every A and AAAA address of the name; [] when it has none."""
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(self.conf.name, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            found.extend(r.address for r in answer)
        return sorted(set(found))

    async def _step(self, publish: Publish) -> None:
        ips = await self.resolve()
        if ips != self._last:
            log.info("dns %s: %d pod(s): %s", self.conf.name, len(ips), ", ".join(ips) or "none")
            self.metrics.pods.set(len(ips))
            await publish(pods_for(ips, self.conf))
            self._last = ips  # only once applied: a failed publish is tried again next round
        await asyncio.sleep(self.conf.interval)

    async def run(self, publish: Publish) -> None:
        await keep_running(f"dns discovery of {self.conf.name}", lambda: self._step(publish),
                           self.metrics.errors.labels("dns"), max_delay=max(self.conf.interval, 1.0))
