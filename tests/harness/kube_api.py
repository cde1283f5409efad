"""A small Kubernetes API server for discovery tests (no real one can run here).

It follows the list/watch protocol of the real API server for the two resources kv-extproc
reads (core/v1 Pods, inference.networking.k8s.io/v1 InferencePools):

- every change bumps one global resourceVersion (as etcd's revision does) and is kept in a
  history; a list returns the items and the list's resourceVersion;
- ``watch=true&resourceVersion=X`` streams (chunked JSON lines) every change after X, then
  new ones; equality label selectors and ``metadata.name`` field selectors filter, and an
  object modified out of the selector is sent as DELETED, into it as ADDED;
- ``allowWatchBookmarks=true`` adds BOOKMARK events (kind + metadata.resourceVersion only);
- ``timeoutSeconds`` ends the stream cleanly; a resourceVersion older than the compacted
  history gets an ERROR event carrying a 410 Status (reason Expired), as the real server sends;
- tests can compact the history and drop every open watch mid-stream (connection cut,
  no final chunk).
Every request is recorded (path and query) so tests can check what the client asked.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

POOL_PATH = "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"


@dataclass
class Change:
    version: int
    kind: str  # "Pod" or "InferencePool"
    namespace: str
    name: str
    old: dict | None
    new: dict | None


class FakeKubeApi:
    def __init__(self, *, bookmark_interval: float = 0.5):
        self.bookmark_interval = bookmark_interval
        self.version = 1000
        self.compacted = 1000
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.history: list[Change] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.cond = threading.Condition()
        self._watch_sockets: set[socket.socket] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-kube-api")

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeKubeApi":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.drop_watches()
        self._server.shutdown()
        self._server.server_close()

    # -- what tests change -------------------------------------------------------------------
    def put_pod(self, name: str, *, ip: str, labels: dict[str, str], ready: bool = True, namespace: str = "default",
                deleting: bool = False) -> None:
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels), "uid": f"uid-{name}"},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
        }
        if deleting:
            pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        self._put("Pod", namespace, name, pod)

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        self._put("Pod", namespace, name, None)

    def put_pool(self, name: str, *, match_labels: dict[str, str], ports: list[int], namespace: str = "default") -> None:
        pool = {
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
            "spec": {"selector": {"matchLabels": dict(match_labels)}, "targetPorts": [{"number": p} for p in ports],
                     "endpointPickerRef": {"name": "kv-extproc", "port": {"number": 9002}}},
        }
        self._put("InferencePool", namespace, name, pool)

    def compact(self) -> None:
        """Forget the history so far: a watch from any earlier resourceVersion gets 410."""
        with self.cond:
            self.compacted = self.version
            self.history.clear()

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream."""
        with self.cond:
            sockets = list(self._watch_sockets)
            self._watch_sockets.clear()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def open_watches(self) -> int:
        with self.cond:
            return len(self._watch_sockets)

    def watch_versions(self, resource: str = "pods") -> list[str]:
        """resourceVersion of every watch request on that resource, in order."""
        return [q.get("resourceVersion", "") for path, q in self.requests
                if path.endswith("/" + resource) and _bool(q.get("watch"))]

    def lists(self, resource: str = "pods") -> int:
        return sum(1 for path, q in self.requests if path.endswith("/" + resource) and not _bool(q.get("watch")))

    # -- internals ---------------------------------------------------------------------------
    def _put(self, kind: str, namespace: str, name: str, obj: dict | None) -> None:
        with self.cond:
            key = (kind, namespace, name)
            old = self.objects.get(key)
            if obj is None and old is None:
                return
            self.version += 1
            if obj is None:
                del self.objects[key]
                gone = json.loads(json.dumps(old))
                gone["metadata"]["resourceVersion"] = str(self.version)
                self.history.append(Change(self.version, kind, namespace, name, old, None))
            else:
                obj["metadata"]["resourceVersion"] = str(self.version)
                self.objects[key] = obj
                self.history.append(Change(self.version, kind, namespace, name, old, obj))
            self.cond.notify_all()


def _matches(obj: dict | None, labels: dict[str, str], name: str | None) -> bool:
    if obj is None:
        return False
    meta = obj["metadata"]
    if name is not None and meta["name"] != name:
        return False
    have = meta.get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


def _bool(value: str | None) -> bool:
    """Query booleans as the API server parses them (Go's strconv.ParseBool)."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def _selector(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        out[key.strip()] = value.lstrip("=").strip()
    return out


def _status(code: int, reason: str, message: str) -> dict:
    return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _handler(api: FakeKubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass

        def _json(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            api.requests.append((url.path, query))
            parts = url.path.strip("/").split("/")
            if len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
                kind, namespace, name = "Pod", parts[3], None
            elif len(parts) in (6, 7) and parts[:4] == ["apis", "inference.networking.k8s.io", "v1", "namespaces"] \
                    and parts[5] == "inferencepools":
                kind, namespace, name = "InferencePool", parts[4], (parts[6] if len(parts) == 7 else None)
            else:
                self._json(404, _status(404, "NotFound", f"the server could not find the requested resource {url.path}"))
                return
            labels = _selector(query.get("labelSelector", ""))
            field = query.get("fieldSelector", "")
            by_name = field.split("=", 1)[1] if field.startswith("metadata.name=") else None
            if name is not None:  # GET one object
                with api.cond:
                    obj = api.objects.get((kind, namespace, name))
                if obj is None:
                    self._json(404, _status(404, "NotFound", f'{kind.lower()}s "{name}" not found'))
                else:
                    self._json(200, obj)
                return
            if _bool(query.get("watch")):
                self._watch(kind, namespace, labels, by_name, query)
                return
            with api.cond:
                items = [o for (k, ns, _), o in sorted(api.objects.items())
                         if k == kind and ns == namespace and _matches(o, labels, by_name)]
                version = api.version
            self._json(200, {"apiVersion": "v1" if kind == "Pod" else "inference.networking.k8s.io/v1",
                             "kind": f"{kind}List", "metadata": {"resourceVersion": str(version)}, "items": items})

        def _chunk(self, event: dict) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _watch(self, kind: str, namespace: str, labels: dict[str, str], by_name: str | None, query: dict) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
            bookmarks = _bool(query.get("allowWatchBookmarks"))
            start = query.get("resourceVersion", "")
            sock = self.connection
            with api.cond:
                api._watch_sockets.add(sock)
                if start in ("", "0"):  # "any version": the current state as ADDED events first
                    pending = [{"type": "ADDED", "object": o} for (k, ns, _), o in sorted(api.objects.items())
                               if k == kind and ns == namespace and _matches(o, labels, by_name)]
                    cursor = api.version
                elif int(start) < api.compacted:
                    pending, cursor = None, 0
                else:
                    pending, cursor = [], int(start)
            try:
                if pending is None:
                    self._chunk({"type": "ERROR", "object": _status(
                        410, "Expired", f"too old resource version: {start} ({api.compacted})")})
                    self.wfile.write(b"0\r\n\r\n")
                    return
                for event in pending:
                    self._chunk(event)
                last_bookmark = time.monotonic()
                while True:
                    with api.cond:
                        if sock not in api._watch_sockets:
                            return  # dropped by the test: no final chunk
                        changes = [c for c in api.history if c.version > cursor]
                        if not changes:
                            api.cond.wait(0.05)
                            changes = [c for c in api.history if c.version > cursor]
                        if changes:
                            cursor = changes[-1].version
                        now_version = api.version
                    for change in changes:
                        if change.kind != kind or change.namespace != namespace:
                            continue
                        was, now = _matches(change.old, labels, by_name), _matches(change.new, labels, by_name)
                        if now:
                            self._chunk({"type": "MODIFIED" if was else "ADDED", "object": change.new})
                        elif was:
                            obj = json.loads(json.dumps(change.old))
                            obj["metadata"]["resourceVersion"] = str(change.version)
                            self._chunk({"type": "DELETED", "object": obj})
                    if bookmarks and time.monotonic() - last_bookmark >= api.bookmark_interval:
                        last_bookmark = time.monotonic()
                        api_version = "v1" if kind == "Pod" else "inference.networking.k8s.io/v1"
                        self._chunk({"type": "BOOKMARK", "object": {
                            "kind": kind, "apiVersion": api_version,
                            "metadata": {"resourceVersion": str(max(cursor, now_version))}}})
                    if time.monotonic() >= deadline:
                        self.wfile.write(b"0\r\n\r\n")
                        return
            except OSError:
                return
            finally:
                with api.cond:
                    api._watch_sockets.discard(sock)
                self.close_connection = True

    return Handler
