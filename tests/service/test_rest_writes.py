"""What the HTTP connection writes: a V2 inference answer leaves in one write (head and body
together: one system call, one TCP segment), on the real app, engine and uvicorn protocol."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import uvicorn
from uvicorn.server import ServerState

from service.config import ServeConfig
from service.engine import Engine
from service.rest.app import build_app
from service.rest.protocol import guarded
from service.servicers.calls import Calls
from tests.conftest import MODEL, reference


def request(images: np.ndarray, model: str = MODEL) -> bytes:
    raw = images.tobytes()
    head = json.dumps(
        {
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": list(images.shape),
                        "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()  # fmt: skip
    return (
        (
            f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(head)}\r\n"
            f"Content-Length: {len(head) + len(raw)}\r\n\r\n"
        ).encode()
        + head
        + raw
    )


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        name, value = line.decode().split(":", 1)
        headers[name.lower()] = value.strip()
    return status, headers, await reader.readexactly(int(headers["content-length"]))


def test_an_inference_answer_leaves_in_one_write(private_repo: Path, sample_images) -> None:
    images = sample_images[0][:3]
    expected = reference(private_repo, images)
    writes: list[bytes] = []

    class Probe(guarded(30.0)):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            write = transport.write

            def counted(data: bytes) -> None:
                writes.append(bytes(data))
                write(data)

            transport.write = counted  # the socket's transport, under the lingering wrapper
            super().connection_made(transport)

    async def scenario() -> list[tuple[int, dict[str, str], bytes, int]]:
        config = ServeConfig(private_repo, device="cpu", poll_interval_s=0)
        engine = Engine(config)
        await engine.start()
        app = build_app(Calls(engine), config)
        settings = uvicorn.Config(app, lifespan="off", log_level="warning", server_header=False)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Probe(settings, ServerState(), {}), "127.0.0.1", 0
        )
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        answers = []
        for body in (request(images), request(images[:1]), request(images, "nope")):
            writes.clear()
            writer.write(body)  # one keep-alive connection
            answers.append((*await answer(reader), len(writes)))
        writer.close()
        server.close()
        await engine.stop()
        return answers

    (status, headers, body, count), (second, _, _, count_2), (missing, _, error, _) = asyncio.run(
        scenario()
    )
    assert (status, second, count, count_2) == (200, 200, 1, 1)
    length = int(headers["inference-header-content-length"])
    outputs = json.loads(body[:length])["outputs"]
    assert [o["name"] for o in outputs] == ["probabilities", "bottleneck"]
    size = outputs[0]["parameters"]["binary_data_size"]
    probabilities = np.frombuffer(body[length : length + size], "<f4").reshape(3, -1)
    np.testing.assert_allclose(probabilities, expected["probabilities"], atol=1e-5)
    assert missing == 404 and b"not loaded" in error  # errors answer as before
