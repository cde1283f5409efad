"""Through the real Envoy binary on loopback, with wrk, side by side in one run.

Backends are Envoy direct responses (a second Envoy process listening on 127.0.0.2-4), so
the measurement is the proxy path, not a Python HTTP server. Variants:
- ``envoy``: Envoy alone, no ext_proc (routes to the backends by plain load balancing);
- ``noop``: Envoy + a no-op ext_proc (headers only, answers at once);
- ``floor``: the shipped config (BUFFERED body) + an ext_proc that parses nothing and answers
  each message with bytes serialized at start-up (the body answer routes to one pod): the
  cheapest possible Python ext_proc doing the same Envoy work, the baseline for kv-extproc;
- ``hit``: kv-extproc, the same prompt every time;
- ``turn``: kv-extproc, the same system prompt and a new user question every time (the
  common request of a real fleet);
- ``miss``: kv-extproc, a new prompt every time;
- ``nocache``: kv-extproc with the prefix cache off, same prompt every time;
- ``memory``: the hit workload with the in-process index instead of Redis;
- ``noload``: the hit workload without the engines' /metrics scraper (load.enabled false);
- ``mirror``: the turn workload with the whole index mirrored in the replica
  (``prefixStoreConfig.mirror``): the new text's blocks are answered without asking Redis;
- ``pass``: kv-extproc (the hit's process) on a path it does not route, so it answers the
  headers and the body at once: what its server costs beyond the floor before any decision
  (Envoy's answer to that path need not be a 200: the ext_proc's CPU per request is the figure).
Each at 1 and 8 connections; ratios are to Envoy alone, the no-op and the floor, and for the
variants whose bodies wrk makes unique per request (``turn``, ``mirror``, ``miss``) also to the floor driven
by that same wrk script (``*_floor_same_client``: the Lua that makes each body runs on the same
two cores, and the plain floor does not pay it). For the floor, the no-op and kv-extproc, the
CPU the ext_proc process spent per request (``cpu_us``, and kv-extproc's over the floor's): at 8
connections the cores are shared by wrk, two Envoys, Redis and the ext_proc, so CPU per
request is what throughput follows; at 1 connection the machine idles between requests and
the same code runs several times slower than in a busy loop (a 10 KB JSON parse: 18 us hot,
65 us with 0.5 ms idle before it, 110 us with 2 ms), which latency there includes. Then
``doc``: a unique 1 MB document after a cached system prompt, sent one at a time (median of
several), through the floor and kv-extproc, in both body modes.

Environment: BENCH_SIZES (e.g. "2000"), BENCH_VARIANTS (e.g. "floor,hit,turn"),
BENCH_DURATION (seconds per wrk run, default 5), BENCH_ROUNDS (default 1: with more, the variants
are measured in turn that many times and the median of each round's ratios is printed and
kept under "medians"), BENCH_DOC=0 to skip the 1 MB document.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import re
import subprocess
import tempfile
import time
from pathlib import Path

from extproc.requests import CHAT_PATH
from extproc.sim import launcher
from extproc.tokenization import load_tokenizer

from . import floors
from .common import text_of_tokens, write

MODEL = "Qwen/Qwen3-0.6B"
DURATION = int(os.environ.get("BENCH_DURATION", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1"))
BACKENDS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def backend_config(ports: list[int], admin: int) -> dict:
    """One Envoy answering every request on each backend address with a fixed completion."""
    body = json.dumps({"id": "x", "object": "chat.completion", "model": MODEL,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})
    listeners = []
    for host, port in zip(BACKENDS, ports):
        listeners.append({
            "name": f"backend-{host}", "address": {"socket_address": {"address": host, "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "backend", "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                    "match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}]}]},
            }}]}],
        })
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": listeners}}


def without_ext_proc(conf: dict) -> dict:
    conf = copy.deepcopy(conf)
    hcm = conf["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    return conf


def headers_only(conf: dict) -> dict:
    conf = copy.deepcopy(conf)
    hcm = conf["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for f in hcm["http_filters"]:
        if f["name"] == "envoy.filters.http.ext_proc":
            f["typed_config"]["processing_mode"]["request_body_mode"] = "NONE"
    return conf


LUA = """
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local template = [[%s]]
local unique = %s
local run = "%s"
local counter = 0
request = function()
  counter = counter + 1
  local body = template
  if unique then body = string.gsub(template, "@@N@@", run .. "-" .. tostring(counter)) end
  return wrk.format(nil, "%s", nil, body)
end
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, body: str, *, connections: int, unique: bool, workdir: Path, pid: int | None = None,
        path: str = CHAT_PATH) -> dict:
    """wrk's figures; with ``pid``, also the CPU that process spent per request (``cpu_us``):
    what decides throughput once the cores are busy, and far steadier than latency here."""
    script = workdir / f"load-{connections}-{int(unique)}.lua"
    # Every run gets its own prefix for "unique" bodies: a repeat of an earlier run would hit the cache.
    script.write_text(LUA % (body, "true" if unique else "false", f"{time.time_ns():x}", path))
    cpu = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{DURATION}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=DURATION + 30).stdout
    cpu = cpu_seconds(pid) - cpu if pid else 0.0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))

    def pct(name: str) -> float:
        value, unit = re.search(rf"\s{name}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    stats = {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"), "non_2xx": int(errors.group(1)) if errors else 0}
    if pid:
        stats["cpu_us"] = 1e6 * cpu / max(1, requests)
    return stats


ALL_VARIANTS = ("envoy", "noop", "floor", "hit", "turn", "miss", "nocache", "memory", "noload", "mirror", "pass")
PASS_PATH = "/v1/not-routed"
"""The ``pass`` variant's path: kv-extproc answers its headers and body at once, as the floor does."""
REFERENCES = ("envoy", "noop", "floor")


def chat_body(system: str, user: str) -> str:
    return json.dumps({"model": MODEL, "messages": [{"role": "system", "content": system},
                                                    {"role": "user", "content": user}]})


def variant_body(variant: str, system: str) -> tuple[str, bool]:
    """The wrk body template and whether @@N@@ in it is replaced per request."""
    if variant == "miss":
        return chat_body("@@N@@ " + system, "hi"), True
    if variant in ("turn", "mirror"):
        return chat_body(system, "Question @@N@@: what changed since the last release, and why?"), True
    return chat_body(system, "hi"), False


def post_timed(url: str, body: bytes) -> float:
    import urllib.request

    req = urllib.request.Request(f"{url}{CHAT_PATH}", data=body, headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as reply:
        reply.read()
        assert reply.status == 200
    return time.perf_counter() - t0


def run(sizes: tuple[int, ...] | None = None, variants: tuple[str, ...] | None = None, name: str = "envoy_load") -> dict:
    sizes = sizes or tuple(int(x) for x in os.environ.get("BENCH_SIZES", "500,2000,8000").split(","))
    variants = variants or tuple(os.environ.get("BENCH_VARIANTS", ",".join(ALL_VARIANTS)).split(","))
    workdir = Path(tempfile.mkdtemp(prefix="kv-extproc-load-"))
    tokenizer_dir = launcher.bundled_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    ports = [launcher.free_port(h) for h in BACKENDS]
    backend = launcher.start_envoy(backend_config(ports, launcher.free_port()), workdir)
    pods = [{"id": f"pod-{i}", "address": f"{h}:{p}"} for i, (h, p) in enumerate(zip(BACKENDS, ports))]
    redis_server = launcher.start_redis(workdir)
    started: list = [backend, redis_server]
    results: dict = {"duration_s": DURATION, "rounds": ROUNDS, "rows": [], "medians": [], "doc": []}
    pids: dict[str, int] = {}
    header = "x-gateway-destination-endpoint"
    try:
        def extproc(**extra):
            conf = {"index": {"backend": "redis", "redisUrl": redis_server.url}, "logLevel": "warning",
                    "limits": {"maxBodyBytes": 4 * 1024 * 1024},
                    "models": [{"name": MODEL, "tokenizer": tokenizer_dir}], "pods": pods, **extra}
            proc = launcher.start_extproc(conf, workdir)
            started.append(proc)
            pids[proc.listen] = proc.proc.popen.pid
            return proc.listen

        def proxy(conf_fn, listen_ext, template="envoy.yaml"):
            conf = launcher.render_envoy(template, listen=f"127.0.0.1:{launcher.free_port()}",
                                         admin=f"127.0.0.1:{launcher.free_port()}", extproc=[listen_ext],
                                         pods=[p["address"] for p in pods])
            envoy = launcher.start_envoy(conf_fn(conf), workdir)
            started.append(envoy)
            return envoy.url

        # The no-op and the floor run in processes of their own, as kv-extproc does (bench/floors.py).
        noop = floors.start("noop", workdir)
        started.append(noop)
        floor = floors.start("floor", workdir, header=header, address=pods[0]["address"])
        started.append(floor)
        urls: dict[str, str] = {}
        cpu_of: dict[str, int] = {"noop": noop.pid, "floor": floor.pid}
        if "envoy" in variants:
            urls["envoy"] = proxy(without_ext_proc, noop.listen)
        if "noop" in variants:
            urls["noop"] = proxy(headers_only, noop.listen)
        if "floor" in variants:
            urls["floor"] = proxy(lambda c: c, floor.listen)
        kv = None
        if {"hit", "miss", "turn", "pass"} & set(variants):
            kv = extproc()
            urls["hit"] = urls["miss"] = urls["turn"] = urls["pass"] = proxy(lambda c: c, kv)
            cpu_of["hit"] = cpu_of["miss"] = cpu_of["turn"] = cpu_of["pass"] = pids[kv]
        extras = {"nocache": {"enablePodMappingCache": False}, "memory": {"index": {"backend": "memory"}},
                  "noload": {"load": {"enabled": False}},  # noload: what scraping the engines' /metrics costs
                  "mirror": {"prefixStoreConfig": {"mirror": True}}}  # the turn workload, index mirrored in-process
        for variant, extra in extras.items():
            if variant in variants:
                listen = extproc(**extra)
                urls[variant], cpu_of[variant] = proxy(lambda c: c, listen), pids[listen]
        for size in sizes:
            system = text_of_tokens(tokenizer, size, seed=size)
            for connections in (1, 8):
                rounds_rows: list[dict] = []
                for round_ in range(ROUNDS):
                    rounds_rows += measure_round(urls, variants, system, size, connections, round_, workdir, cpu_of)
                results["rows"] += rounds_rows
                if ROUNDS > 1:
                    results["medians"] += medians(rounds_rows, size, connections)
        if kv is not None and "floor" in variants and os.environ.get("BENCH_DOC", "1") != "0":
            duplex = floors.start("duplex", workdir, header=header, address=pods[0]["address"])
            started.append(duplex)
            results["doc"] = measure_document(tokenizer, proxy, kv, {"envoy.yaml": floor.port,
                                                                      "envoy-full-duplex.yaml": duplex.port})
    finally:
        for part in reversed(started):
            part.proc.stop()
    write(name, results)
    return results


def measure_round(urls: dict[str, str], variants: tuple[str, ...], system: str, size: int, connections: int,
                  round_: int, workdir: Path, cpu_of: dict[str, int]) -> list[dict]:
    """Every variant once, in order, each against the references measured in this same round."""
    rows, row_base = [], {}
    for variant in variants:
        body, unique = variant_body(variant, system)
        path = PASS_PATH if variant == "pass" else CHAT_PATH
        wrk(urls[variant], body, connections=connections, unique=unique, workdir=workdir, path=path)  # warm-up
        stats = wrk(urls[variant], body, connections=connections, unique=unique, workdir=workdir,
                    pid=cpu_of.get(variant), path=path)
        row_base[variant] = stats
        row = {"prompt_tokens": size, "connections": connections, "variant": variant, "round": round_, **stats}
        for ref in REFERENCES:
            if ref in row_base and ref != variant:
                row[f"rps_vs_{ref}"] = stats["rps"] / row_base[ref]["rps"]
                row[f"p50_minus_{ref}_ms"] = stats["p50_ms"] - row_base[ref]["p50_ms"]
        if "cpu_us" in stats and "cpu_us" in row_base.get("floor", {}) and variant != "floor":
            row["cpu_us_over_floor"] = stats["cpu_us"] - row_base["floor"]["cpu_us"]
        if unique and "floor" in urls:
            # wrk makes each unique body in Lua, on the same two cores: the floor is also
            # measured with this client, so the comparison charges kv-extproc only.
            wrk(urls["floor"], body, connections=connections, unique=True, workdir=workdir)
            same = wrk(urls["floor"], body, connections=connections, unique=True, workdir=workdir)
            row["floor_same_client"] = same
            row["rps_vs_floor_same_client"] = stats["rps"] / same["rps"]
            row["p50_minus_floor_same_client_ms"] = stats["p50_ms"] - same["p50_ms"]
        rows.append(row)
        extra = "  ".join(f"{k} {v:.2f}" for k, v in row.items()
                          if k.startswith(("rps_vs", "p50_minus")) and not isinstance(v, dict))
        cpu = (f"cpu {stats['cpu_us']:5.0f} us/req" + (f" (+{row['cpu_us_over_floor']:.0f} over the floor)"
                                                     if "cpu_us_over_floor" in row else "")
               if "cpu_us" in stats else "")
        print(f"envoy     {size:>6} tok  c={connections}  {variant:<8} {stats['rps']:>7.0f} req/s  "
              f"p50 {stats['p50_ms']:6.2f} ms  p99 {stats['p99_ms']:6.2f} ms  non-2xx {stats['non_2xx']}  {cpu}  "
              f"{extra}", flush=True)
    return rows


def medians(rows: list[dict], size: int, connections: int) -> list[dict]:
    """Per variant, the median over rounds of each ratio and difference to the references
    (each taken within its round): one round is a sample of the machine as much as of the code."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        # Only what every round measured: a median over fewer rounds would pass for one over all.
        keys = [k for k in mine[0] if k.startswith(("rps_vs", "p50_minus", "cpu_us_over"))
                and not isinstance(mine[0][k], dict) and all(k in r for r in mine)]
        row = {"prompt_tokens": size, "connections": connections, "variant": variant, "rounds": len(mine),
               **{k: statistics.median(r[k] for r in mine) for k in keys}}
        out.append(row)
        if keys:
            print(f"envoy     {size:>6} tok  c={connections}  {variant:<8} median of {len(mine)} rounds:  "
                  + "  ".join(f"{k} {row[k]:.2f}" for k in keys), flush=True)
    return out


def measure_document(tokenizer, proxy, kv_listen: str, floor_ports: dict[str, int], repeats: int = 7) -> list[dict]:
    """A unique ~1 MB document after a cached 2k-token system prompt, one request at a time."""
    system = text_of_tokens(tokenizer, 2000, seed=2000)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = []
    for template, floor_port in floor_ports.items():
        urls = {"floor": proxy(lambda c: c, f"127.0.0.1:{floor_port}", template),
                "kv-extproc": proxy(lambda c: c, kv_listen, template)}
        post_timed(urls["kv-extproc"], chat_body(system, "warm-up").encode())  # the system prompt is now cached
        medians = {}
        for variant, url in urls.items():
            samples = []
            for i in range(repeats):
                rng = __import__("random").Random(f"{template}{variant}{i}")
                doc = " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(120_000))[:1_000_000]
                samples.append(post_timed(url, chat_body(system, doc).encode()))
            medians[variant] = statistics.median(samples) * 1000
        row = {"body_mode": template, "floor_ms": medians["floor"], "kv_extproc_ms": medians["kv-extproc"],
               "added_ms": medians["kv-extproc"] - medians["floor"]}
        rows.append(row)
        print(f"envoy     1 MB document ({template}): floor {row['floor_ms']:.1f} ms, kv-extproc "
              f"{row['kv_extproc_ms']:.1f} ms, added {row['added_ms']:.1f} ms (median of {repeats})", flush=True)
    return rows


if __name__ == "__main__":
    run()
