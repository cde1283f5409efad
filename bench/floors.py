"""The reference ext_procs kv-extproc is measured against, each in a process of its own.

- ``noop``: every headers message answered at once (Envoy configured for headers only);
- ``floor``: parses nothing: the first byte of a ProcessingRequest is the tag of the field
  that is set (request_headers = field 2, request_body = field 4, request_trailers = 6), and
  each is answered with bytes serialized at start-up (the body answer routes to one pod);
- ``duplex``: the floor for FULL_DUPLEX_STREAMED, which must hold the headers answer and hand
  the body back, so it parses (with the C parser kv-extproc uses) and does nothing else.

A process each, like kv-extproc: on a thread of the bench's process, beside the no-op's event
loop and under one GIL, the floor served ~10% fewer requests at 8 connections (1,490 against
1,664 req/s, 4 rounds each, alternating) and spent ~80 us more CPU per request, which made
kv-extproc's ratios to it look better than they are.

``python -m bench.floors KIND PORT [HEADER ADDRESS]``; ``start`` runs one for a bench.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from extproc import responses, wire
from extproc.server import SERVICE_NAME
from extproc.sim import launcher

KINDS = ("noop", "floor", "duplex")


@dataclass
class Reference:
    port: int
    proc: launcher.Proc

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.popen.pid


def start(kind: str, workdir: Path, *, header: str = "", address: str = "") -> Reference:
    """A reference ext_proc, once it accepts connections."""
    if kind not in KINDS:
        raise ValueError(f"unknown reference ext_proc {kind!r}")
    port = launcher.free_port()
    root = str(Path(__file__).resolve().parent.parent)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    proc = launcher._spawn(f"{kind}-extproc-{port}", [sys.executable, "-m", "bench.floors", kind, str(port), header, address],
                           workdir, env)
    try:
        launcher.wait_tcp("127.0.0.1", port, timeout=30, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return Reference(port, proc)


def _handler(kind: str, header: str, address: str):
    if kind == "noop":
        answer = responses.headers_continue(())

        async def noop(messages, context):
            async for _ in messages:
                yield answer

        return noop, wire.parse_request
    if kind == "floor":
        answers = {0x12: responses.headers_continue((header,)), 0x22: responses.body_route(header, address),
                   0x32: responses.TRAILERS_CONTINUE}

        async def floor(messages, context):
            async for data in messages:
                answer = answers.get(data[0]) if data else None
                if answer is not None:
                    yield answer

        return floor, None
    held = responses.headers_route(header, address, (header,))

    async def duplex(messages, context):
        body = bytearray()
        async for message in messages:
            kind = message.WhichOneof("request")
            if kind == "request_body":
                body += message.request_body.body
                if message.request_body.end_of_stream:
                    yield held
                    for chunk in responses.body_chunks(bytes(body)):
                        yield chunk
            elif kind == "response_headers":  # the shipped duplex config keeps the stream to the response
                yield responses.RESPONSE_HEADERS_CONTINUE

    return duplex, wire.parse_request


async def serve(kind: str, port: int, header: str, address: str) -> None:
    process, parse = _handler(kind, header, address)
    server = grpc.aio.server()
    method = grpc.stream_stream_rpc_method_handler(process, request_deserializer=parse, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Process": method}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str]) -> None:
    import uvloop

    kind, port = argv[0], int(argv[1])
    if kind not in KINDS:
        raise SystemExit(f"unknown reference ext_proc {kind!r} (known: {', '.join(KINDS)})")
    header, address = (argv[2], argv[3]) if len(argv) >= 4 else ("", "")
    uvloop.run(serve(kind, port, header, address))


if __name__ == "__main__":
    main(sys.argv[1:])
