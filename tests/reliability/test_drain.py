"""The end of a drain under load (issue 14 part 6): 64 clients sending without pause get
answers or UNAVAILABLE, never CANCELLED, and the server exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from service._proto.inference import grpc_predict_v2_pb2 as v2
from service._proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from tests.conftest import MODEL, Served, start_server

pytestmark = pytest.mark.usefixtures("frontends")  # both server modes

CLIENTS = 64
CHANNELS = 8


def request() -> v2.ModelInferRequest:
    call = v2.ModelInferRequest(model_name=MODEL)
    call.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28, 1])
    call.raw_input_contents.append(bytes(28 * 28))
    return call


async def load_through_sigterm(served: Served) -> tuple[Counter[str], Counter[str]]:
    """(codes before the signal, codes of calls that ended after it)."""
    before: Counter[str] = Counter()
    after: Counter[str] = Counter()
    signalled = asyncio.Event()
    finished = asyncio.Event()
    channels = [grpc.aio.insecure_channel(served.target) for _ in range(CHANNELS)]

    async def client(i: int) -> None:
        stub = v2_grpc.GRPCInferenceServiceStub(channels[i % CHANNELS])
        call = request()
        for _ in range(1_000_000):  # bounded; ends once the server has gone
            if finished.is_set():
                return
            try:
                await stub.ModelInfer(call, timeout=20)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            (after if signalled.is_set() else before)[code] += 1
            if code != "OK":
                await asyncio.sleep(0.001)  # a client retrying at once, on the same channel

    clients = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    deadline = time.monotonic() + 60
    while before["OK"] < 2_000 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    signalled.set()
    served.process.send_signal(signal.SIGTERM)
    while served.process.poll() is None and time.monotonic() < deadline + 60:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the last answers reach their clients
    finished.set()
    await asyncio.wait_for(asyncio.gather(*clients), 60)
    for channel in channels:
        await channel.close()
    return before, after


def test_clients_at_the_end_of_a_drain_hear_unavailable_not_cancelled(repository: Path):
    served = start_server(repository)
    try:
        before, after = asyncio.run(load_through_sigterm(served))
        assert served.process.wait(60) == 0
    finally:
        if served.process.poll() is None:
            served.process.kill()
    assert before["OK"] >= 2_000 and set(before) == {"OK"}, before
    assert after["UNAVAILABLE"] > 0 and set(after) <= {"OK", "UNAVAILABLE"}, after
