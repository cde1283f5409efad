"""An authoritative DNS server on loopback for discovery tests: dnslib's own DNSServer (UDP and
TCP) answering from a zone the test can change while it runs, like a headless Service's
records change as pods come and go."""

from __future__ import annotations

import threading

from dnslib import AAAA, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSServer

from extproc.sim.launcher import free_port


class Zone(BaseResolver):
    """name -> addresses; authoritative answers, NXDOMAIN for names it does not hold."""

    def __init__(self, ttl: int = 1):
        self.ttl = ttl
        self.records: dict[str, list[str]] = {}
        self.queries: list[tuple[str, str]] = []
        self.fail = False
        self._lock = threading.Lock()

    def set(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self.records[name.rstrip(".").lower()] = list(addresses)

    def resolve(self, request, handler):
        reply = request.reply()
        reply.header.aa = 1
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((qname, qtype))
            if self.fail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            addresses = self.records.get(qname)
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for address in addresses:
            if qtype == "A" and ":" not in address:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=self.ttl))
            elif qtype == "AAAA" and ":" in address:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=self.ttl))
        return reply


class _Quiet:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class DnsTestServer:
    def __init__(self, zone: Zone, host: str = "127.0.0.1"):
        self.zone = zone
        self.host = host
        self.port = free_port(host)
        self._udp = DNSServer(zone, address=host, port=self.port, logger=_Quiet())
        self._tcp = DNSServer(zone, address=host, port=self.port, tcp=True, logger=_Quiet())

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "DnsTestServer":
        self._udp.start_thread()
        self._tcp.start_thread()
        return self

    def stop(self) -> None:
        self._udp.stop()
        self._tcp.stop()
        self._udp.server.server_close()
        self._tcp.server.server_close()
