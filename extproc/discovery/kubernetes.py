"""Kubernetes discovery: the Ready pods a label selector (or a GAIE InferencePool) selects.

List, then watch from the list's resourceVersion with bookmarks; a watch that ends (the
server's timeout) or drops (an error) resumes from the last resourceVersion seen, after a
backoff when it failed (retry.py); ``410 Gone`` (the watch fell behind the server's history)
re-lists at once. A failed list is retried with backoff. The last pod set is kept meanwhile.

The InferencePool is read as ``inference.networking.k8s.io/v1`` (spec.selector.matchLabels,
spec.targetPorts[].number) and watched too: a change of selector or ports re-lists the pods.
The v1 API has no model field: models come from a pod label or the config.

Client: kubernetes_asyncio (the official client generated for asyncio): the same API and
models as the official ``kubernetes`` package, with list/watch, resourceVersion and bookmarks
under our control. Objects are read as plain JSON (no model classes on the hot path).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from kubernetes_asyncio import client, config as kube_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

from ..config import KubernetesDiscovery, PodConfig
from . import DiscoveryMetrics, Publish, label_safe
from .retry import keep_running

log = logging.getLogger("extproc.discovery")

POOL_GROUP, POOL_VERSION, POOL_PLURAL = "inference.networking.k8s.io", "v1", "inferencepools"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class Gone(Exception):
    """410 from a watch: the resourceVersion we hold is no longer in the server's history."""


@dataclass(frozen=True)
class Selection:
    """Which pods, and where on them: from the config or the InferencePool."""

    selector: str
    ports: tuple[int, ...]


def is_ready(pod: dict) -> bool:
    """Ready condition True, an IP, and not being deleted."""
    status = pod.get("status") or {}
    if not status.get("podIP") or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_configs(pod: dict, selection: Selection, conf: KubernetesDiscovery, models: list[str]) -> list[PodConfig]:
    """One endpoint per target port; its id is the pod name (``name:port`` with several ports)."""
    meta = pod["metadata"]
    ip = pod["status"]["podIP"]
    host = f"[{ip}]" if ":" in ip else ip
    if conf.model_label:
        value = (meta.get("labels") or {}).get(conf.model_label, "")
        served = [m for m in models if value and value in (m, label_safe(m))]
        if not served:
            raise ValueError(f"pod {meta['name']}: label {conf.model_label}={value!r} names no configured model")
    else:
        served = list(conf.models)
    several = len(selection.ports) > 1
    out = []
    for rank, port in enumerate(selection.ports):
        events = conf.kv_events_port + rank if conf.kv_events_port else 0
        replay = conf.kv_replay_port + rank if conf.kv_replay_port else 0
        out.append(PodConfig(
            id=f"{meta['name']}:{port}" if several else meta["name"], address=f"{host}:{port}", models=served,
            kv_events=f"tcp://{host}:{events}" if events else "", kv_replay=f"tcp://{host}:{replay}" if replay else "",
        ))
    return out


def pool_selection(pool: dict) -> Selection:
    spec = pool.get("spec") or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    ports = tuple(int(p["number"]) for p in spec.get("targetPorts") or [])
    if not labels or not ports:
        raise ValueError(f"InferencePool {pool.get('metadata', {}).get('name')} has no selector or no targetPorts")
    return Selection(",".join(f"{k}={v}" for k, v in sorted(labels.items())), ports)


class KubernetesSource:
    name = "kubernetes"

    def __init__(self, conf: KubernetesDiscovery, models: list[str], metrics: DiscoveryMetrics):
        self.conf = conf
        self.models = models
        self.metrics = metrics
        self.namespace = conf.namespace or _own_namespace()
        self.pods: dict[str, dict] = {}
        """Every pod the selector matches (ready or not), by name, as last seen."""
        self._published: list[PodConfig] | None = None
        self._skipped: set[str] = set()
        self.api: client.ApiClient | None = None
        self.version = ""
        """The last resourceVersion seen (list, event or bookmark): where the next watch starts."""

    async def _client(self) -> client.ApiClient:
        configuration = client.Configuration()
        if self.conf.api_server:
            configuration.host = self.conf.api_server
        elif self.conf.kubeconfig:
            await kube_config.load_kube_config(config_file=self.conf.kubeconfig, client_configuration=configuration)
        else:
            kube_config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)

    async def run(self, publish: Publish) -> None:
        try:
            await keep_running("kubernetes discovery", lambda: self.cycle(publish), self.metrics.errors.labels("kubernetes"))
        finally:
            if self.api is not None:
                await self.api.close()

    async def cycle(self, publish: Publish) -> None:
        """One list, then watches until a 410 (re-list now) or an error (re-list after backoff)."""
        if self.api is None:
            self.api = await self._client()
        if not self.conf.inference_pool:
            await self._list_and_watch(Selection(self.conf.label_selector, tuple(self.conf.target_ports)), publish)
            return
        pool, pool_version = await self._read_pool()
        selection = pool_selection(pool)
        pods = asyncio.ensure_future(self._list_and_watch(selection, publish))
        changed = asyncio.ensure_future(self._until_pool_changes(selection, pool_version))
        try:
            done, _ = await asyncio.wait({pods, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pods, changed):
                task.cancel()
            await asyncio.gather(pods, changed, return_exceptions=True)
        for task in done:
            task.result()  # raise what failed
        if changed in done:
            self.metrics.relists.labels("inferencepool_changed").inc()
            log.info("InferencePool %s changed its selector or ports: re-listing pods", self.conf.inference_pool)

    async def _list_and_watch(self, selection: Selection, publish: Publish) -> None:
        core = client.CoreV1Api(self.api)
        reply = await core.list_namespaced_pod(self.namespace, label_selector=selection.selector,
                                               _preload_content=False, _request_timeout=30)
        listed = json.loads(await reply.read())
        self.pods = {p["metadata"]["name"]: p for p in listed.get("items") or []}
        version = listed["metadata"]["resourceVersion"]
        log.info("kubernetes: listed %d pod(s) matching %s in %s at resourceVersion %s",
                 len(self.pods), selection.selector, self.namespace, version)
        await self._publish(selection, publish)
        self.version = version

        async def watch_once() -> None:
            try:
                self.version = await self._watch(core, selection, publish)
            except ApiException as exc:
                if exc.status == 410:
                    raise Gone(str(exc)) from None
                raise

        try:
            await keep_running("kubernetes pod watch", watch_once, self.metrics.errors.labels("kubernetes"),
                               passthrough=(Gone,))
        except Gone:
            self.metrics.relists.labels("gone").inc()
            log.info("kubernetes: resourceVersion %s is gone (410): re-listing", self.version)

    async def _watch(self, core: client.CoreV1Api, selection: Selection, publish: Publish) -> str:
        """One watch from the last resourceVersion seen; returns the last one seen when the server
        ends it (an error keeps what was seen so far in ``self.version``)."""
        version = self.version
        timeout = int(self.conf.watch_timeout)
        await self._publish(selection, publish)  # a set whose publishing failed is tried again
        async with Watch(return_type="object") as watch:
            stream = watch.stream(core.list_namespaced_pod, self.namespace, label_selector=selection.selector,
                                  resource_version=version, allow_watch_bookmarks=True, timeout_seconds=timeout,
                                  _request_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=timeout + 30))
            async for event in stream:
                kind, obj = event["type"], event["raw_object"]
                version = self.version = obj["metadata"].get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                name = obj["metadata"]["name"]
                if kind == "DELETED":
                    self.pods.pop(name, None)
                elif kind in ("ADDED", "MODIFIED"):
                    self.pods[name] = obj
                await self._publish(selection, publish)
        return version

    async def _publish(self, selection: Selection, publish: Publish) -> None:
        ready: list[PodConfig] = []
        for name, pod in sorted(self.pods.items()):
            if not is_ready(pod):
                continue
            try:
                ready.extend(pod_configs(pod, selection, self.conf, self.models))
                self._skipped.discard(name)
            except ValueError as exc:
                if name not in self._skipped:
                    self._skipped.add(name)
                    log.warning("kubernetes: skipping %s", exc)
        if ready != self._published:
            self.metrics.pods.set(len(ready))
            log.info("kubernetes: %d ready endpoint(s): %s", len(ready), ", ".join(p.id for p in ready) or "none")
            await publish(ready)
            self._published = ready  # only once applied: a failed publish is tried again

    async def _read_pool(self) -> tuple[dict, str]:
        custom = client.CustomObjectsApi(self.api)
        reply = await custom.get_namespaced_custom_object(POOL_GROUP, POOL_VERSION, self.namespace, POOL_PLURAL,
                                                          self.conf.inference_pool, _preload_content=False,
                                                          _request_timeout=30)
        pool = json.loads(await reply.read())
        return pool, pool["metadata"]["resourceVersion"]

    async def _until_pool_changes(self, selection: Selection, version: str) -> None:
        """Watch the InferencePool; return once its selector or ports differ from ``selection``."""
        custom = client.CustomObjectsApi(self.api)
        timeout = int(self.conf.watch_timeout)
        while True:
            async with Watch(return_type="object") as watch:
                stream = watch.stream(custom.list_namespaced_custom_object, POOL_GROUP, POOL_VERSION, self.namespace,
                                      POOL_PLURAL, field_selector=f"metadata.name={self.conf.inference_pool}",
                                      resource_version=version, allow_watch_bookmarks=True, timeout_seconds=timeout,
                                      _request_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=timeout + 30))
                async for event in stream:
                    obj = event["raw_object"]
                    version = obj["metadata"].get("resourceVersion") or version
                    if event["type"] == "BOOKMARK":
                        continue
                    if event["type"] == "DELETED":
                        raise RuntimeError(f"InferencePool {self.conf.inference_pool} was deleted")
                    if pool_selection(obj) != selection:
                        return


def _own_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"
