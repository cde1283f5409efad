"""Connections to Redis in each ``index.mode``: standalone, cluster, sentinel.

RedisIndex keeps the index's rules; a Backend knows its mode's:
- where commands go. Cluster: redis-py's RedisCluster, whose non-transactional pipeline sends
  one batch per node involved, in parallel (one round trip per node for a lookup), and follows
  MOVED/ASK per command. It is built with no retries of its own: a failed node is reported at
  once (routing falls back to load) and the slot map is refreshed in the background instead of
  redis-py closing every connection and sleeping on the request path.
- where the invalidation feed lives. Cluster: sharded pub/sub (SPUBLISH/SSUBSCRIBE) on the
  channel's slot, measured sound here: a subscriber misses a message only together with a
  broken connection or a ``sunsubscribe`` (its shard failed over or moved), while classic
  PUBLISH crosses the cluster bus, which drops messages to a node it cannot reach without the
  subscriber's connection ever breaking (133 of 3,552 lost silently with a node stalled 4 s).
  Subscriber connections never reconnect by themselves (a silent reconnect would hide a gap).
- which replication histories hold the data: the ``master_replid`` of every primary. A
  history that disappears (a replica promoted, a primary restarted empty) may have taken
  acknowledged writes with it: RedisIndex turns that into a new epoch, and the ingester
  rebuilds every pod, as after any other loss of the index.
- whether the servers are what the mode says (one clear start-up error otherwise).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff
from redis.cluster import key_slot
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)

from ..config import ConfigError, IndexConfig, read_secret

log = logging.getLogger("extproc.index.redis")

REFRESH_INTERVAL = 0.25
"""Cluster: at most one slot-map refresh this often after failures (a failover ends with one)."""
ADMIN_TIMEOUT = 2.0


_asking: contextvars.ContextVar[str | None] = contextvars.ContextVar("kv_extproc_asking", default=None)


def _install_asking_on_one_connection() -> None:
    """Make redis-py's cluster client send ASKING on the same connection as the command it is for.

    On an ASK redirect, redis-py (asyncio, 5.x to 8.x) calls ``ClusterNode.execute_command("ASKING")``
    and then the command, each on a connection taken from the node's pool (first in, first out):
    with more than one idle connection the command goes out on another connection than ASKING,
    the importing node answers MOVED back to the source, which answers ASK again, until "TTL
    exhausted" (seen here: every lookup of a key already migrated failed while its slot moved).
    ASKING holds for the next command on its connection only, so this defers it and sends
    both in one write on one connection. Scope: the calling task (a context variable), so
    concurrent commands are not affected.
    """
    if getattr(ClusterNode.execute_command, "_kv_asking", False):
        return
    original = ClusterNode.execute_command

    async def execute_command(self: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and str(args[0]).upper() == "ASKING":
            _asking.set(self.name)
            return b"OK"
        if _asking.get() is None:
            return await original(self, *args, **kwargs)
        target, _ = _asking.get(), _asking.set(None)
        if target != self.name or kwargs.get("asking"):
            return await original(self, *args, **kwargs)
        asking, command = PipelineCommand(0, "ASKING"), PipelineCommand(1, *args, **kwargs)
        await self.execute_pipeline([asking, command])
        for cmd in (asking, command):
            if isinstance(cmd.result, Exception):
                raise cmd.result
        return command.result

    execute_command._kv_asking = True  # type: ignore[attr-defined]
    ClusterNode.execute_command = execute_command  # type: ignore[method-assign]


def redact(url: str) -> str:
    """The URL without any password in it, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    auth, _, host = rest.rpartition("@")
    user = auth.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':***@' if user else '***@'}{host}"


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _auth_note(username: str, password: str | None, tls: bool) -> str:
    parts = [f"user {username}" if username else "", "password ***" if password is not None else "", "TLS" if tls else ""]
    return f" ({', '.join(p for p in parts if p)})" if any(parts) else ""


def _is_auth_error(exc: BaseException) -> bool:
    if isinstance(exc, (AuthenticationError, AuthenticationWrongNumberOfArgsError)):
        return True
    text = str(exc)
    return isinstance(exc, ResponseError) and any(code in text for code in ("NOAUTH", "WRONGPASS", "NOPERM"))


def _info_fields(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


class Backend:
    """One mode's connections. ``client`` runs commands and pipelines for RedisIndex."""

    mode = "standalone"
    sharded_feed = False
    """Publish with SPUBLISH and listen with SSUBSCRIBE (cluster) instead of PUBLISH/SUBSCRIBE."""
    ordered_pipelines = True
    """A pipeline runs in order on one connection (not so in a cluster: one batch per node, in parallel)."""
    where = "redis"
    client: Any

    def __init__(self, config: IndexConfig):
        self._options = self._connection_options(config)
        self._password = self._options.get("password")

    @staticmethod
    def _connection_options(config: IndexConfig) -> dict[str, Any]:
        options: dict[str, Any] = {"socket_connect_timeout": max(config.timeout, 1.0), "health_check_interval": 30}
        password = read_secret(config.password_file, config.password_env)
        if password is not None:
            options["password"] = password
        if config.username:
            options["username"] = config.username
        return options

    @staticmethod
    def _tls_options(config: IndexConfig) -> dict[str, Any]:
        return {k: v for k, v in (("ssl_ca_certs", config.tls_ca_file), ("ssl_certfile", config.tls_cert_file),
                                  ("ssl_keyfile", config.tls_key_file)) if v}

    def pipeline(self):
        return self.client.pipeline(transaction=False)

    def publish(self, pipe, channel: str, data: bytes) -> None:
        pipe.publish(channel, data)

    async def ping(self) -> None:
        """The servers that hold the data answer (a cluster: every primary)."""
        await self.client.ping()

    def failed(self, exc: BaseException) -> None:
        """A command failed (connection, timeout, cluster down): adapt if the mode can."""

    async def feed_client(self) -> tuple[aioredis.Redis, str]:
        """A fresh connection for the invalidation feed, to the node that carries it, that
        never reconnects by itself; and that node's address."""
        raise NotImplementedError

    async def feed_moved(self, address: str) -> bool:
        """True if the feed no longer lives at ``address`` (a failover the subscriber did not
        see as a broken connection); False when it does, or nobody can say."""
        return False

    async def histories(self) -> set[str]:
        """Replication ids of the primaries that hold the data (empty: not tracked)."""
        return set()

    async def scan_targets(self) -> tuple[list[Any], Any]:
        """(what to SCAN: every primary in a cluster, else the one server; a topology stamp
        that changes if the data moved meanwhile)."""
        return [None], None

    async def scan(self, target: Any, cursor: int, match: str, count: int) -> tuple[int, list[bytes]]:
        return await self.client.scan(cursor, match=match, count=count)

    async def check(self) -> None:
        """Raise ConfigError if the servers refuse our credentials or are not what the mode says;
        an unreachable server is only logged (routing goes by load until it answers)."""

    async def close(self) -> None:
        await self.client.aclose()


class Standalone(Backend):
    def __init__(self, config: IndexConfig):
        super().__init__(config)
        self._url = config.redis_url
        if config.redis_url.startswith("rediss://"):
            self._options.update(self._tls_options(config))
        self.client = aioredis.from_url(config.redis_url, **self._options)
        self.where = f"standalone {redact(config.redis_url)}{_auth_note(config.username, self._password, False)}"

    async def feed_client(self) -> tuple[aioredis.Redis, str]:
        client = aioredis.from_url(self._url, **self._options, retry=Retry(NoBackoff(), 0))
        return client, redact(self._url)

    async def check(self) -> None:
        try:
            info = _info_fields(await asyncio.wait_for(self.client.info("server"), 5.0))
        except RedisError as exc:
            if _is_auth_error(exc):
                if "NOPERM" in str(exc):
                    return await self._ping_only()
                raise ConfigError(f"redis at {redact(self._url)} rejected the credentials: {exc}") from None
            if isinstance(exc, ResponseError):
                return await self._ping_only()
            log.warning("redis at %s is not reachable yet (%s); routing by load until it is", redact(self._url), exc)
            return
        except (OSError, TimeoutError) as exc:
            log.warning("redis at %s is not reachable yet (%s); routing by load until it is", redact(self._url), exc)
            return
        mode = info.get("redis_mode", "standalone")
        if mode == "cluster":
            raise ConfigError(f"index.mode is standalone but redis at {redact(self._url)} is a cluster node: "
                              f"set index.mode: cluster and list index.nodes")
        if mode == "sentinel":
            raise ConfigError(f"index.mode is standalone but redis at {redact(self._url)} is a Sentinel: "
                              f"set index.mode: sentinel with index.sentinels and index.sentinelService")

    async def _ping_only(self) -> None:
        """An ACL user without INFO: the mode cannot be checked, the credentials can."""
        try:
            await asyncio.wait_for(self.client.ping(), 5.0)
        except RedisError as exc:
            if _is_auth_error(exc):
                raise ConfigError(f"redis at {redact(self._url)} rejected the credentials: {exc}") from None
            raise


class _FoundFeed(Backend):
    """A feed whose node is found by asking (a slot's owner, the Sentinels' primary), so it can
    move under a subscriber that keeps its connection."""

    async def _feed_address(self) -> tuple[str, int]:
        raise NotImplementedError

    async def feed_client(self) -> tuple[aioredis.Redis, str]:
        host, port = await self._feed_address()
        client = aioredis.Redis(host=host, port=port, retry=Retry(NoBackoff(), 0), **self._options)
        return client, f"{host}:{port}"

    async def feed_moved(self, address: str) -> bool:
        try:
            host, port = await self._feed_address()
        except (RedisError, OSError, TimeoutError):
            return False
        return f"{host}:{port}" != address


class Cluster(_FoundFeed):
    mode = "cluster"
    sharded_feed = True
    ordered_pipelines = False

    def __init__(self, config: IndexConfig, channel: str):
        super().__init__(config)
        if config.tls:
            self._options.update(ssl=True, **self._tls_options(config))
        self._seeds = [_host_port(node) for node in config.nodes]
        self._slot = key_slot(channel.encode())
        _install_asking_on_one_connection()
        self.client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self._seeds],
                                   retry=Retry(NoBackoff(), 0), **self._options)
        self.where = f"cluster, seed nodes {','.join(config.nodes)}{_auth_note(config.username, self._password, config.tls)}"
        self._refreshing: asyncio.Task | None = None
        self._last_refresh = 0.0

    def publish(self, pipe, channel: str, data: bytes) -> None:
        pipe.spublish(channel, data)

    async def ping(self) -> None:
        await self.client.ping(target_nodes=RedisCluster.PRIMARIES)

    # -- topology --------------------------------------------------------------------

    def failed(self, exc: BaseException) -> None:
        """Refresh the slot map in the background after a node failed (one refresh at a
        time, at most every REFRESH_INTERVAL): the commands that failed are not retried,
        the next ones go to the new owners."""
        if self._refreshing is not None and not self._refreshing.done():
            return
        now = time.monotonic()
        if now - self._last_refresh < REFRESH_INTERVAL:
            return
        self._last_refresh = now
        self._refreshing = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        try:
            if self.client._initialize:  # never initialized yet: the first command does it
                await self.client.initialize()
            else:
                await asyncio.wait_for(self.client.nodes_manager.initialize(), ADMIN_TIMEOUT * 2)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("cluster slot map refresh failed: %s", exc)

    async def _ask_any(self, *args: Any) -> Any:
        """A command answered by any node that can (the seeds too, if no known node answers)."""
        await self._ready()
        nodes = list(self.client.get_nodes())
        for host, port in self._seeds:
            if not any((n.host, n.port) == (host, port) for n in nodes):
                nodes.append(ClusterNode(host, port, **self._node_options()))
        last: BaseException | None = None
        for node in nodes:
            try:
                return await asyncio.wait_for(node.execute_command(*args), ADMIN_TIMEOUT)
            except (RedisError, OSError, TimeoutError) as exc:
                last = exc
        raise last or RedisError("no cluster node known")

    def _node_options(self) -> dict[str, Any]:
        options = {k: v for k, v in self._options.items() if k != "ssl"}
        if self._options.get("ssl"):
            from redis.asyncio.connection import SSLConnection

            options["connection_class"] = SSLConnection
        return options

    async def _ready(self) -> None:
        if self.client._initialize:
            await self.client.initialize()

    async def _slots(self) -> dict[tuple[int, int], tuple[str, int]]:
        """Slot range -> primary (host, port), as a live node sees it now."""
        raw = await self._ask_any("CLUSTER SLOTS")
        out = {}
        for entry in raw:
            lo, hi, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
            out[(lo, hi)] = (host, int(primary[1]))
        return out

    async def _primaries(self) -> tuple[list[ClusterNode], Any]:
        slots = await self._slots()
        addresses = sorted(set(slots.values()))
        nodes = []
        for host, port in addresses:
            node = self.client.get_node(host=host, port=port)
            if node is None:
                self.failed(RedisError("unknown node"))
                raise SlotNotCoveredError(f"{host}:{port} serves slots but is not in the slot map yet")
            nodes.append(node)
        return nodes, tuple(sorted(slots.items()))

    async def histories(self) -> set[str]:
        nodes, _ = await self._primaries()
        infos = await asyncio.gather(*(asyncio.wait_for(node.execute_command("INFO", "replication"), ADMIN_TIMEOUT)
                                       for node in nodes))
        ids = set()
        for node, raw in zip(nodes, infos):
            info = _info_fields(raw)
            if info.get("role") != "master":
                self.failed(RedisError("stale slot map"))
                raise ClusterDownError(f"{node.name} is no longer a primary (the slot map is changing)")
            ids.add(info["master_replid"])
        return ids

    async def scan_targets(self) -> tuple[list[Any], Any]:
        return await self._primaries()

    async def scan(self, target: ClusterNode, cursor: int, match: str, count: int) -> tuple[int, list[bytes]]:
        cursor, keys = await target.execute_command("SCAN", cursor, "MATCH", match, "COUNT", count)
        return int(cursor), keys

    # -- feed ------------------------------------------------------------------------

    async def _feed_address(self) -> tuple[str, int]:
        for (lo, hi), address in (await self._slots()).items():
            if lo <= self._slot <= hi:
                return address
        raise SlotNotCoveredError(f"slot {self._slot} of the invalidation channel is not served")

    # -- start-up --------------------------------------------------------------------

    async def check(self) -> None:
        where = ",".join(f"{h}:{p}" for h, p in self._seeds)
        try:
            await asyncio.wait_for(self.client.initialize(), 10.0)
        except RedisClusterException as exc:
            text = str(exc)
            if "not enabled" in text or "unknown command" in text.lower():
                raise ConfigError(f"index.mode is cluster but index.nodes ({where}) are not cluster nodes "
                                  f"({text.splitlines()[0]}): set index.mode: standalone with redisUrl, or "
                                  f"sentinel") from None
            if _is_auth_error(exc) or "auth" in text.lower() or "password" in text.lower():
                raise ConfigError(f"redis cluster at {where} rejected the credentials: {text.splitlines()[0]}") from None
            log.warning("redis cluster at %s is not reachable yet (%s); routing by load until it is", where,
                        text.splitlines()[0])
        except RedisError as exc:
            if _is_auth_error(exc):
                raise ConfigError(f"redis cluster at {where} rejected the credentials: {exc}") from None
            if isinstance(exc, ResponseError) and "unknown command" in str(exc).lower():
                raise ConfigError(f"index.mode is cluster but index.nodes ({where}) are not cluster nodes "
                                  f"({exc})") from None
            log.warning("redis cluster at %s is not reachable yet (%s); routing by load until it is", where, exc)
        except (OSError, TimeoutError) as exc:
            log.warning("redis cluster at %s is not reachable yet (%s); routing by load until it is", where, exc)

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
        await self.client.aclose()


class SentinelBackend(_FoundFeed):
    mode = "sentinel"

    def __init__(self, config: IndexConfig):
        super().__init__(config)
        if config.tls:
            self._options.update(ssl=True, **self._tls_options(config))
        self._service = config.sentinel_service
        self._addresses = [_host_port(s) for s in config.sentinels]
        sentinel_options: dict[str, Any] = {"socket_connect_timeout": self._options["socket_connect_timeout"],
                                            "socket_timeout": ADMIN_TIMEOUT}
        secret = read_secret(config.sentinel_password_file, config.sentinel_password_env)
        if secret is not None:
            sentinel_options["password"] = secret
        if config.tls:
            sentinel_options.update(ssl=True, **self._tls_options(config))
        self.sentinel = Sentinel(self._addresses, sentinel_kwargs=sentinel_options, **self._options)
        self.client = self.sentinel.master_for(self._service)
        self.where = (f"sentinel, service {self._service} via {','.join(config.sentinels)}"
                      f"{_auth_note(config.username, self._password, config.tls)}")

    async def _feed_address(self) -> tuple[str, int]:
        """The current primary, as the Sentinels say."""
        host, port = await self.sentinel.discover_master(self._service)
        return (host.decode() if isinstance(host, bytes) else host), int(port)

    async def histories(self) -> set[str]:
        info = _info_fields(await self.client.info("replication"))
        if info.get("role") != "master":
            # A connection still open to a demoted primary: drop it, ask the Sentinels again.
            await self.client.connection_pool.disconnect()
            raise ClusterDownError("the primary was demoted (a Sentinel failover is under way)")
        return {info["master_replid"]}

    async def check(self) -> None:
        where = ",".join(f"{h}:{p}" for h, p in self._addresses)
        answered = []
        for sentinel in self.sentinel.sentinels:
            try:
                masters = await asyncio.wait_for(sentinel.sentinel_masters(), 5.0)
            except ResponseError as exc:
                if _is_auth_error(exc):
                    raise ConfigError(f"sentinel at {where} rejected the credentials (index.sentinelPassword*): "
                                      f"{exc}") from None
                raise ConfigError(f"index.mode is sentinel but {_describe(sentinel)} is not a Sentinel ({exc}): "
                                  f"set index.mode: standalone or cluster") from None
            except AuthenticationError as exc:
                raise ConfigError(f"sentinel at {where} rejected the credentials (index.sentinelPassword*): "
                                  f"{exc}") from None
            except (RedisError, OSError, TimeoutError):
                continue
            answered.append(set(masters))
        if not answered:
            log.warning("no sentinel at %s is reachable yet; routing by load until one is", where)
            return
        if not any(self._service in names for names in answered):
            known = sorted(set().union(*answered))
            raise ConfigError(f"no sentinel at {where} monitors index.sentinelService {self._service!r} "
                              f"(they monitor {known})")
        try:
            await asyncio.wait_for(self.client.ping(), 5.0)
        except MasterNotFoundError as exc:
            log.warning("sentinels at %s know no reachable primary yet (%s); routing by load until then", where, exc)
        except RedisError as exc:
            if _is_auth_error(exc):
                raise ConfigError(f"the primary of {self._service} rejected the credentials: {exc}") from None
            log.warning("the primary of %s is not reachable yet (%s); routing by load until it is", self._service, exc)
        except (OSError, TimeoutError) as exc:
            log.warning("the primary of %s is not reachable yet (%s); routing by load until it is", self._service, exc)

    async def close(self) -> None:
        await self.client.aclose()
        await self.sentinel.aclose()


def _describe(client: aioredis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


def open_backend(config: IndexConfig, channel: str) -> Backend:
    if config.mode == "cluster":
        return Cluster(config, channel)
    if config.mode == "sentinel":
        return SentinelBackend(config)
    return Standalone(config)

