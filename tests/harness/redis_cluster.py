"""Real Redis Cluster, Sentinel and standalone setups on free loopback ports, for tests and benchmarks.

- ``start_cluster``: six ``redis-server --cluster-enabled yes`` (3 primaries, 1 replica each),
  joined with ``redis-cli --cluster create``; returns once every slot is served and every
  replica has finished its first sync (a replica killed-over before that refuses to take over
  for good, see /work/shared/README.md).
- ``start_sentinel``: a primary, one replica and three sentinels (quorum 2) watching it.
- ``start_standalone``: one plain ``redis-server`` (the TLS tests' standalone mode).

Faults: ``kill`` (SIGKILL), ``manual_failover`` (CLUSTER FAILOVER on a replica),
``migrate_slot`` (a slot moved key by key, as ``redis-cli --cluster reshard`` does, so clients
see ASK while it runs and MOVED after). Every process is stopped by ``stop``.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import key_slot

from extproc.sim import launcher
from tests.harness.certs import Pki


def redis_cli() -> str:
    return str(Path(launcher.redis_binary()).with_name("redis-cli"))


@dataclass
class Node:
    port: int
    directory: Path
    argv: list[str]
    proc: launcher.Proc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _wait(predicate, timeout: float, what: str, interval: float = 0.05):
    end = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < end:
        try:
            result = predicate()
            if result:
                return result
        except (redis.RedisError, OSError) as exc:
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


@dataclass
class Cluster:
    workdir: Path
    nodes: list[Node]
    password: str | None = None
    tls: Pki | None = None
    _clients: dict[int, redis.Redis] = field(default_factory=dict)

    @property
    def seeds(self) -> list[str]:
        return [n.address for n in self.nodes]

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def client(self, port: int) -> redis.Redis:
        """A plain client to one node (not cluster-aware): for admin commands."""
        if port not in self._clients:
            self._clients[port] = redis.Redis(host="127.0.0.1", port=port, password=self.password,
                                              socket_timeout=5, socket_connect_timeout=2, **_tls_client(self.tls))
        return self._clients[port]

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and n.proc.alive()]

    def topology(self) -> dict[int, dict]:
        """port -> {id, role, master (port or None), slots: [(lo, hi)]}, as a live node sees it."""
        for node in self.alive():
            try:
                text = self.client(node.port).execute_command("CLUSTER", "NODES")
                break
            except (redis.RedisError, OSError):
                continue
        else:
            raise RuntimeError("no cluster node answers")
        if isinstance(text, bytes):
            text = text.decode()
        rows = {}
        by_id = {}
        for line in text.strip().splitlines():
            parts = line.split()
            node_id, addr, flags, master = parts[0], parts[1], parts[2].split(","), parts[3]
            port = int(addr.split("@")[0].rpartition(":")[2])
            slots = []
            for item in parts[8:]:
                if item.startswith("["):
                    continue  # a slot being migrated or imported
                lo, _, hi = item.partition("-")
                slots.append((int(lo), int(hi or lo)))
            rows[port] = {"id": node_id, "role": "primary" if "master" in flags else "replica",
                          "failed": "fail" in flags, "master_id": None if master == "-" else master, "slots": slots}
            by_id[node_id] = port
        for row in rows.values():
            row["master"] = by_id.get(row.pop("master_id"))
        return rows

    def primaries(self) -> list[int]:
        """Ports of live primaries that serve slots."""
        alive = {n.port for n in self.alive()}
        return sorted(p for p, row in self.topology().items()
                      if row["role"] == "primary" and row["slots"] and not row["failed"] and p in alive)

    def replica_of(self, primary: int) -> int:
        return next(p for p, row in self.topology().items() if row["master"] == primary and not row["failed"])

    def primary_of_slot(self, slot: int) -> int:
        for port, row in self.topology().items():
            if row["role"] == "primary" and any(lo <= slot <= hi for lo, hi in row["slots"]):
                return port
        raise KeyError(slot)

    def info(self, port: int, section: str) -> dict[str, str]:
        raw = self.client(port).execute_command("INFO", section)
        text = raw.decode() if isinstance(raw, bytes) else raw
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Every live node says cluster_state:ok and agrees that 3 primaries serve every slot."""
        def ok() -> bool:
            for node in self.alive():
                if b"cluster_state:ok" not in self.client(node.port).execute_command("CLUSTER", "INFO"):
                    return False
            covered = sum(hi - lo + 1 for p in self.primaries() for lo, hi in self.topology()[p]["slots"])
            return covered == 16384
        _wait(ok, timeout, "cluster_state:ok on every node")

    def wait_synced(self, timeout: float = 30.0) -> None:
        """Every live replica has finished its sync with its primary (master_link_status:up)."""
        def synced() -> bool:
            for port, row in self.topology().items():
                if row["role"] == "replica" and port in {n.port for n in self.alive()}:
                    info = self.client(port).info("replication")
                    if info.get("master_link_status") != "up" or info.get("master_sync_in_progress") not in (0, None):
                        return False
            return True
        _wait(synced, timeout, "replicas in sync", interval=0.1)

    def kill(self, port: int) -> None:
        node = self.node(port)
        assert node.proc is not None
        node.proc.kill()
        self._clients.pop(port, None)

    def restart(self, port: int) -> None:
        """Start a killed node again with its nodes.conf (it rejoins, as a replica if it was failed over)."""
        node = self.node(port)
        node.proc = launcher._spawn(f"redis-cluster-{port}", node.argv, node.directory)
        launcher.wait_tcp("127.0.0.1", port, timeout=10, proc=node.proc)

    def manual_failover(self, replica: int, timeout: float = 15.0) -> None:
        """CLUSTER FAILOVER on ``replica``: it takes over its primary's slots with no write lost."""
        self.client(replica).execute_command("CLUSTER", "FAILOVER")
        _wait(lambda: self.client(replica).info("replication").get("role") == "master", timeout,
              f"{replica} promoted")

    def migrate_slot(self, slot: int, dest: int, *, batch: int = 10, pause: float = 0.0,
                     first: list[str] = ()) -> int:
        """Move ``slot`` to primary ``dest`` key by key (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE).

        While it runs, a key already moved answers ASK on the source; afterwards the slot answers
        MOVED. ``pause`` seconds between batches keep the slot half-migrated longer. Returns keys moved.
        """
        source = self.primary_of_slot(slot)
        if source == dest:
            return 0
        topo = self.topology()
        src_id, dst_id = topo[source]["id"], topo[dest]["id"]
        src, dst = self.client(source), self.client(dest)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        auth = ["AUTH", self.password] if self.password else []
        for key in first:  # these move at once: until the slot is handed over, they answer ASK
            src.execute_command("MIGRATE", "127.0.0.1", dest, "", 0, 5000, *auth, "KEYS", key)
            moved += 1
        while True:
            if pause:
                time.sleep(pause)
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            src.execute_command("MIGRATE", "127.0.0.1", dest, "", 0, 5000, *auth, "KEYS", *keys)
            moved += len(keys)
        for port in (dest, source, *[n.port for n in self.alive() if n.port not in (dest, source)]):
            try:
                self.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            except redis.ResponseError:
                pass  # replicas refuse SETSLOT; they learn it from their primary
        return moved

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        for node in self.nodes:
            if node.proc is not None:
                node.proc.stop()


def low_port() -> int:
    """A free port a cluster node accepts: Redis 7.0 refuses data ports above 55535 even when
    ``cluster-port`` names the bus port."""
    for _ in range(200):
        port = random.randrange(20000, 55535)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 55536")


def _tls_client(tls: Pki | None) -> dict:
    if tls is None:
        return {}
    return {"ssl": True, "ssl_ca_certs": str(tls.ca), "ssl_certfile": str(tls.client_cert),
            "ssl_keyfile": str(tls.client_key)}


def _tls_cli(tls: Pki | None) -> list[str]:
    if tls is None:
        return []
    return ["--tls", "--cacert", str(tls.ca), "--cert", str(tls.client_cert), "--key", str(tls.client_key)]


def _listen(port: int, tls: Pki | None, *, cluster: bool = False) -> list[tuple[str, str]]:
    """Where a node listens, as (directive, value) pairs: ``port``, or with ``tls`` TLS only
    (clients, replication, Sentinel links and with ``cluster`` the bus; client certificates required)."""
    if tls is None:
        return [("port", str(port))]
    return [("port", "0"), ("tls-port", str(port)), ("tls-cert-file", str(tls.server_cert)),
            ("tls-key-file", str(tls.server_key)), ("tls-ca-cert-file", str(tls.ca)),
            *([("tls-cluster", "yes")] if cluster else []), ("tls-replication", "yes")]


def _as_argv(directives: list[tuple[str, str]]) -> list[str]:
    return [arg for name, value in directives for arg in (f"--{name}", value)]


def _node_argv(port: int, directory: Path, password: str | None, tls: Pki | None = None) -> list[str]:
    listen = _as_argv(_listen(port, tls, cluster=True))
    argv = [launcher.redis_binary(), "--bind", "127.0.0.1", *listen, "--cluster-enabled", "yes",
            "--cluster-port", str(low_port()),
            "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000", "--save", "",
            "--appendonly", "no", "--dir", str(directory)]
    if password:
        argv += ["--requirepass", password, "--masterauth", password]
    return argv


def keys_in_slot(slot: int, count: int, prefix: str = "filler") -> list[str]:
    """``count`` key names that hash to ``slot`` (through a hash tag found by trying)."""
    found, n = [], 0
    while len(found) < count:
        n += 1
        if key_slot(str(n).encode()) == slot:
            found.append(f"{prefix}:{{{n}}}")
    return found


def start_cluster(workdir: Path, *, primaries: int = 3, replicas: int = 1, password: str | None = None,
                  acl_user: tuple[str, str] | None = None, tls: Pki | None = None) -> Cluster:
    """A fresh cluster on free ports, every slot served and every replica synced. ``acl_user``
    (name, password) is created on every node (ACLs are per node)."""
    nodes = []
    for _ in range(primaries * (1 + replicas)):
        port = low_port()
        directory = Path(workdir) / f"cluster-{port}"
        directory.mkdir(parents=True)
        node = Node(port, directory, _node_argv(port, directory, password, tls))
        node.proc = launcher._spawn(f"redis-cluster-{port}", node.argv, directory)
        nodes.append(node)
    cluster = Cluster(Path(workdir), nodes, password, tls)
    try:
        for node in nodes:
            launcher.wait_tcp("127.0.0.1", node.port, timeout=10, proc=node.proc)
        auth = ["-a", password, "--no-auth-warning"] if password else []
        subprocess.run([redis_cli(), *auth, *_tls_cli(tls), "--cluster", "create", *cluster.seeds, "--cluster-replicas",
                        str(replicas), "--cluster-yes"], check=True, capture_output=True, timeout=60)
        cluster.wait_ok()
        if acl_user:
            for node in nodes:
                cluster.client(node.port).execute_command("ACL", "SETUSER", acl_user[0], "on", f">{acl_user[1]}",
                                                          "~*", "&*", "+@all")
        cluster.wait_synced()
    except BaseException:
        cluster.stop()
        raise
    return cluster


# -- Standalone ---------------------------------------------------------------------------


def _start_data_node(workdir: Path, password: str | None, tls: Pki | None, replica_of: int | None = None,
                     started: list[Node] | None = None) -> Node:
    """One plain (non-cluster) ``redis-server`` on a free port, spawned (not yet waited for);
    appended to ``started`` as soon as it runs."""
    port = launcher.free_port()
    directory = Path(workdir) / f"redis-{port}"
    directory.mkdir(parents=True)
    argv = [launcher.redis_binary(), "--bind", "127.0.0.1", *_as_argv(_listen(port, tls)), "--save", "",
            "--appendonly", "no", "--dir", str(directory)]
    if password:
        argv += ["--requirepass", password, "--masterauth", password]
    if replica_of:
        argv += ["--replicaof", "127.0.0.1", str(replica_of)]
    node = Node(port, directory, argv)
    node.proc = launcher._spawn(f"redis-{port}", argv, directory)
    if started is not None:
        started.append(node)
    return node


@dataclass
class Standalone:
    node: Node
    password: str | None = None
    tls: Pki | None = None

    @property
    def port(self) -> int:
        return self.node.port

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5,
                           socket_connect_timeout=2, **_tls_client(self.tls))

    def stop(self) -> None:
        self.node.proc.stop()


def start_standalone(workdir: Path, *, password: str | None = None, tls: Pki | None = None) -> Standalone:
    """One standalone ``redis-server``; with ``tls`` on TLS only (client certificates required)."""
    node = _start_data_node(workdir, password, tls)
    try:
        launcher.wait_tcp("127.0.0.1", node.port, timeout=10, proc=node.proc)
    except BaseException:
        node.proc.stop()
        raise
    return Standalone(node, password, tls)


# -- Sentinel ---------------------------------------------------------------------------


@dataclass
class SentinelSetup:
    workdir: Path
    service: str
    primary: Node
    replica: Node
    sentinels: list[Node]
    password: str | None = None
    tls: Pki | None = None

    @property
    def sentinel_addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=5,
                           socket_connect_timeout=2, **_tls_client(self.tls))

    def sentinel_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, socket_connect_timeout=2,
                           **_tls_client(self.tls))

    def current_primary(self) -> int:
        """The primary's port as the sentinels report it."""
        for sentinel in self.sentinels:
            if sentinel.proc is None or not sentinel.proc.alive():
                continue
            try:
                with self.sentinel_client(sentinel.port) as c:
                    host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                return int(port)
            except (redis.RedisError, OSError):
                continue
        raise RuntimeError("no sentinel answers")

    def data_nodes(self) -> list[Node]:
        return [self.primary, self.replica]

    def node(self, port: int) -> Node:
        return next(n for n in self.data_nodes() if n.port == port)

    def wait_synced(self, timeout: float = 30.0) -> None:
        def synced() -> bool:
            for node in self.data_nodes():
                if node.proc is None or not node.proc.alive():
                    continue
                with self.client(node.port) as c:
                    info = c.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
            return True
        _wait(synced, timeout, "replica in sync", interval=0.1)

    def wait_sentinels_know_replica(self, timeout: float = 30.0) -> None:
        """Every sentinel lists the replica and its fellow sentinels (else it cannot fail over)."""
        def known() -> bool:
            for sentinel in self.sentinels:
                with self.sentinel_client(sentinel.port) as c:
                    master = c.sentinel_master(self.service)
                    if int(master["num-slaves"]) < 1 or int(master["num-other-sentinels"]) < len(self.sentinels) - 1:
                        return False
            return True
        _wait(known, timeout, "sentinels to know the replica and each other", interval=0.2)

    def kill(self, port: int) -> None:
        self.node(port).proc.kill()

    def restart(self, port: int) -> None:
        node = self.node(port)
        node.proc = launcher._spawn(f"redis-{port}", node.argv, node.directory)
        launcher.wait_tcp("127.0.0.1", port, timeout=10, proc=node.proc)

    def wait_failover(self, old: int, timeout: float = 30.0) -> int:
        """Until the sentinels name another primary and it says it is one; returns its port."""
        def moved() -> int | None:
            port = self.current_primary()
            if port == old:
                return None
            with self.client(port) as c:
                return port if c.info("replication")["role"] == "master" else None
        return _wait(moved, timeout, "sentinel failover", interval=0.1)

    def stop(self) -> None:
        for node in [*self.sentinels, self.primary, self.replica]:
            if node.proc is not None:
                node.proc.stop()


def start_sentinel(workdir: Path, *, service: str = "kvindex", password: str | None = None,
                   down_after_ms: int = 1000, tls: Pki | None = None) -> SentinelSetup:
    """A primary, one synced replica and three sentinels (quorum 2) that know both. With ``tls``
    every process listens on TLS only and replication and the Sentinels' links go over TLS
    (``tls-replication yes``, which is also what makes a Sentinel talk TLS to the data nodes
    and to its fellow Sentinels)."""
    workdir = Path(workdir)
    started: list[Node] = []

    def data_node(replica_of: int | None) -> Node:
        node = _start_data_node(workdir, password, tls, replica_of, started)
        launcher.wait_tcp("127.0.0.1", node.port, timeout=10, proc=node.proc)
        return node

    try:
        primary = data_node(None)
        replica = data_node(primary.port)
        sentinels = []
        for _ in range(3):
            port = launcher.free_port()
            directory = workdir / f"sentinel-{port}"
            directory.mkdir(parents=True)
            conf = directory / "sentinel.conf"
            lines = [*(f"{name} {value}" for name, value in _listen(port, tls)), "bind 127.0.0.1", f"dir {directory}",
                     f"sentinel monitor {service} 127.0.0.1 {primary.port} 2",
                     f"sentinel down-after-milliseconds {service} {down_after_ms}",
                     f"sentinel failover-timeout {service} 10000", f"sentinel parallel-syncs {service} 1"]
            if password:
                lines.append(f"sentinel auth-pass {service} {password}")
            conf.write_text("\n".join(lines) + "\n")
            # redis-server in Sentinel mode: the same program the redis-sentinel package links to,
            # so Debian's redis-server alone is enough.
            argv = [launcher.redis_binary(), str(conf), "--sentinel"]
            node = Node(port, directory, argv)
            node.proc = launcher._spawn(f"sentinel-{port}", argv, directory)
            started.append(node)
            sentinels.append(node)
        for node in sentinels:
            launcher.wait_tcp("127.0.0.1", node.port, timeout=10, proc=node.proc)
        setup = SentinelSetup(workdir, service, primary, replica, sentinels, password, tls)
        setup.wait_synced()
        setup.wait_sentinels_know_replica()
    except BaseException:
        for node in started:
            node.proc.stop()
        raise
    return setup
