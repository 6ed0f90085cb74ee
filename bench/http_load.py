"""The HTTP half of bench/serve.py (`--protocol http|both`): an aiohttp load generator sending V2
REST inference requests (binary tensors or JSON), and the HTTP transport ceiling, a bare ASGI
app on the same uvicorn (httptools) that reads each body and answers a canned reply of the
same size, no decoding, no inference.

Not run on its own: bench/serve.py starts the client and the ceiling in their own processes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import multiprocessing.connection
import socket
import time
from dataclasses import dataclass

import numpy as np

ENCODINGS = ("binary", "json")
HEADER = "Inference-Header-Content-Length"
WARMUP_S = 1.0


@dataclass(frozen=True)
class HttpLoad:
    url: str  # http://host:port
    model: str
    input_name: str
    clients: int
    batch: int
    encoding: str  # binary or json
    duration_s: float


def body(load: HttpLoad, pixels: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """One V2 REST request for (n, H, W, C) uint8 `pixels`."""
    tensor = {"name": load.input_name, "datatype": "UINT8", "shape": list(pixels.shape)}
    if load.encoding == "json":
        document = {"inputs": [{**tensor, "data": pixels.ravel().tolist()}]}
        return json.dumps(document).encode(), {"Content-Type": "application/json"}
    raw = pixels.tobytes()
    document = {
        "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(document).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER: str(len(head))}
    return head + raw, headers


async def drive(load: HttpLoad, pixels: np.ndarray) -> dict:
    """Closed-loop clients over keep-alive connections; throughput and latencies count the
    requests that finish after the warm-up and before the end."""
    import aiohttp  # noqa: PLC0415 - tritonclient[http] brings it

    requests = [
        body(load, pixels[np.arange(i, i + load.batch) % len(pixels)])
        for i in range(0, 64 * load.batch, load.batch)
    ]
    url = f"{load.url}/v2/models/{load.model}/infer"
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    connector = aiohttp.TCPConnector(limit=load.clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, data=requests[0][0], headers=requests[0][1]) as first:
            await first.read()
        start, cpu = time.monotonic(), time.process_time()
        counted_from, end = start + WARMUP_S, start + WARMUP_S + load.duration_s

        async def closed(offset: int) -> None:
            while (sent := time.monotonic()) < end:
                data, headers = requests[offset % len(requests)]
                offset += 1
                try:
                    async with session.post(url, data=data, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            errors[str(response.status)] += 1
                            continue
                except aiohttp.ClientError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                done = time.monotonic()
                if counted_from <= done <= end:
                    latencies.append(done - sent)

        await asyncio.gather(*(closed(i) for i in range(load.clients)))
    return {
        "client_cpu": (time.process_time() - cpu) / (time.monotonic() - start),
        "images": len(latencies) * load.batch,
        "latencies_ms": [s * 1000 for s in latencies],
        "errors": dict(errors),
        "server": {},
    }


def client_run(load: HttpLoad, pixels: np.ndarray) -> dict:
    """Entry point in the client process."""
    return asyncio.run(drive(load, pixels))


# ----------------------------------------------------------------------------- the ceiling


def canned(classes: int, batch: int, binary: bool) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The answer a V2 server gives for `batch` images, zeros, binary or JSON."""
    outputs = []
    chunks = []
    for name, width in (("probabilities", classes), ("bottleneck", 2)):
        output: dict = {"name": name, "datatype": "FP32", "shape": [batch, width]}
        if binary:
            raw = np.zeros((batch, width), "<f4").tobytes()
            output["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            output["data"] = [0.0] * (batch * width)
        outputs.append(output)
    head = json.dumps({"model_name": "m", "model_version": "1", "outputs": outputs}).encode()
    if not binary:
        return head, [(b"content-type", b"application/json")]
    headers = [(b"content-type", b"application/octet-stream"), (HEADER.lower().encode(),
               str(len(head)).encode())]  # fmt: skip
    return head + b"".join(chunks), headers


class BareApp:
    """A raw ASGI app: read the body, answer the canned reply for its batch size and encoding
    (the batch from the request's shape, found without parsing the whole body)."""

    def __init__(self, classes: int) -> None:
        self._classes = classes
        self._replies: dict[tuple[int, bool], tuple[bytes, list[tuple[bytes, bytes]]]] = {}

    async def __call__(self, scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        data = b"".join(chunks)
        binary = any(name == HEADER.lower().encode() for name, _ in scope["headers"])
        at = data.find(b'"shape": [') + len(b'"shape": [')
        batch = int(data[at : data.find(b",", at)])
        key = (batch, binary)
        if key not in self._replies:
            self._replies[key] = canned(self._classes, batch, binary)
        content, headers = self._replies[key]
        headers = [*headers, (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def bare_main(classes: int, port_sink: multiprocessing.connection.Connection) -> None:
    """Entry point of the ceiling process: serve until terminated."""
    import uvicorn  # noqa: PLC0415

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY
    sock.bind(("127.0.0.1", 0))
    port_sink.send(sock.getsockname()[1])
    config = uvicorn.Config(BareApp(classes), http="httptools", lifespan="off",
                            access_log=False, log_level="warning")  # fmt: skip
    uvicorn.Server(config).run(sockets=[sock])
