"""What a replica knows of its own requests lasts as long as their ext_proc streams: when does
Envoy (the shipped 1.40 and configs) end the stream of a routed request?

Measured on a pod that streams its first chunk after a slow prefill and its last after a 2 s
decode. The default BUFFERED config keeps the stream until the response ends, streamed or
not, so in-flight counts and the ttft scorer's ledger (its learned request lifetime) are
true. The full-duplex config asks for the response headers (``response_header_mode: SEND``),
and Envoy ends the stream once it has answered them: a streamed answer leaves before its
first token, and only the engine's scraped queue sees it after that (README).
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from tests.integration.conftest import MODEL, event_fleet

pytestmark = pytest.mark.integration

TIMING = {"prefill_tokens_per_s": 100.0, "decode_s": 2.0}


def in_flight(proc) -> float:
    return sum(float(v) for v in re.findall(r'kv_extproc_pod_in_flight_requests\{pod="[^"]+"\} ([0-9.]+)', proc.metrics()))


def lifetime(proc, pod: str) -> float | None:
    found = re.search(rf'kv_extproc_pod_request_lifetime_seconds\{{pod="{pod}"\}} ([0-9.e+-]+)', proc.metrics())
    return float(found.group(1)) if found else None


def watch(proxy, proc, *, stream: bool) -> tuple[dict, list[tuple[float, float]]]:
    """Sends one chat request; returns when its headers, first chunk and end arrived (s after
    sending) and the pod that answered, and the in-flight count sampled every 50 ms meanwhile."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there " * 10}], "stream": stream,
            "max_tokens": 4}
    marks: dict[str, float] = {}
    started = time.monotonic()

    def send() -> None:
        with httpx.Client(timeout=30) as client, \
                client.stream("POST", proxy.url + "/v1/chat/completions", json=body) as response:
            marks["headers"] = time.monotonic() - started
            marks["pod"] = response.headers["x-served-by"]
            for _ in response.iter_bytes():
                marks.setdefault("first", time.monotonic() - started)
        marks["end"] = time.monotonic() - started

    thread = threading.Thread(target=send)
    thread.start()
    samples = []
    while thread.is_alive():
        samples.append((time.monotonic() - started, in_flight(proc)))
        time.sleep(0.05)
    thread.join()
    assert set(marks) == {"headers", "pod", "first", "end"}, "the request was answered"
    return marks, samples


def test_the_default_config_keeps_a_streamed_request_in_flight_until_its_answer_ends(workdir, tokenizer,
                                                                                     tokenizer_dir):
    with event_fleet(workdir, tokenizer, tokenizer_dir, timing=TIMING, hosts_from=90) as (_, _pods, proc, proxy):
        marks, samples = watch(proxy, proc, stream=True)
        assert marks["headers"] < 0.5 and marks["end"] > 2.0, "headers at once, the answer 2 s later"
        counted = [t for t, n in samples if n >= 1]
        assert counted and counted[-1] > marks["end"] - 0.3, "in flight until the answer ends"
        assert lifetime(proc, marks["pod"]) > 2.0, "the lifetime learned is the whole request"


def test_full_duplex_ends_the_stream_at_the_response_headers(workdir, tokenizer, tokenizer_dir):
    with event_fleet(workdir, tokenizer, tokenizer_dir, timing=TIMING, hosts_from=94,
                     mode="envoy-full-duplex.yaml") as (_, _pods, proc, proxy):
        marks, samples = watch(proxy, proc, stream=True)  # first: its pod's lifetime is this request's
        assert marks["end"] > 2.0
        assert not [t for t, n in samples if n >= 1 and t > marks["headers"] + 0.2], \
            "a streamed answer leaves the count with its headers, before its first token"
        assert lifetime(proc, marks["pod"]) < 0.5, "so does the lifetime learned from it"
        marks, samples = watch(proxy, proc, stream=False)
        counted = [t for t, n in samples if n >= 1]
        assert counted and counted[-1] > marks["end"] - 0.3, "an unstreamed answer's headers come at its end"
