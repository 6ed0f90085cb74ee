"""The records, the framed channel and the shared memory that front ends and the engine share."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest

from service.errors import DeadlineExceeded, QueueFull, ServingError
from service.ipc import records as rec
from service.ipc import shm
from service.ipc.channel import Channel

PREFIX = f"cnn-serving-test{os.getpid()}"


def test_records_round_trip():
    shape = (224, 224, 3)
    infer = rec.Infer(2**40, "fashion-ü", 3, 64, shape, f"{PREFIX}.1.0", 4096, 123.25, True, 7)
    assert rec.Infer.decode(infer.encode()) == infer
    labelled = rec.Infer(1, "m", 7, 1, (28, 28, 1), f"{PREFIX}.1.0", 0, 0.0, False, 2**32 - 1)
    assert rec.Infer.decode(labelled.encode()) == labelled
    done = rec.Done("fashion", 7, 30, 2**40, 2, 1_234_567)
    assert rec.Done.decode(done.encode()) == done
    assert rec.Cancel.decode(rec.Cancel(99).encode()) == rec.Cancel(99)
    control = rec.Control({"pid": 5, "models": [["a", 1]]})
    assert rec.Control.decode(control.encode()) == control


def test_a_catalogue_entry_round_trips_through_json(repository):
    from service.repository import ModelSpec, read_spec

    spec = read_spec(repository, "fashion", 1)
    body = rec.Control.decode(rec.Control({"spec": spec.to_dict()}).encode()).body
    assert ModelSpec.from_dict(body["spec"]) == spec


def test_results_carry_both_outputs_exactly():
    rng = np.random.default_rng(0)
    probabilities = rng.random((5, 10), dtype=np.float32)
    bottleneck = rng.standard_normal((5, 2), dtype=np.float32)
    back = rec.Result.decode(rec.Result(11, probabilities, bottleneck).encode())
    assert back.request == 11
    np.testing.assert_array_equal(back.outputs()["probabilities"], probabilities)
    np.testing.assert_array_equal(back.outputs()["bottleneck"], bottleneck)


def test_failures_come_back_as_the_same_error_class():
    failure = rec.Failure.decode(rec.Failure.of(4, QueueFull("queue full\nof 64")).encode())
    assert isinstance(failure.error(), QueueFull) and str(failure.error()) == "queue full\nof 64"
    assert isinstance(rec.Failure(1, "DEADLINE_EXCEEDED", "x").error(), DeadlineExceeded)
    odd = rec.Failure(1, "INTERNAL", "internal error").error()
    assert type(odd) is ServingError  # INTERNAL: never a client-mistake class


def test_frames_split_anywhere_arrive_whole():
    got: list[tuple[rec.Kind, bytes]] = []
    channel = Channel(lambda _c, kind, payload: got.append((kind, payload)), lambda _c: None)
    payloads = [b"a", b"", b"x" * 70_000, rec.Cancel(3).encode()]
    stream = b"".join(rec.frame(rec.Kind.CANCEL, p) for p in payloads)
    for i in range(0, len(stream), 7):  # 7-byte pieces cut through lengths and bodies
        channel.data_received(stream[i : i + 7])
    assert got == [(rec.Kind.CANCEL, p) for p in payloads]


def test_a_broken_frame_closes_the_channel():
    lost = []

    class Transport:
        def close(self) -> None:
            lost.append("closed")

        def write(self, data: bytes) -> None:
            pass

    channel = Channel(lambda *_: pytest.fail("no frame"), lambda _c: lost.append("lost"))
    channel.connection_made(Transport())  # type: ignore[arg-type]
    channel.data_received(b"\xff\xff\xff\xff" + b"\x03")
    assert lost == ["closed"]


async def _pair() -> tuple[Channel, list, asyncio.AbstractServer, str]:
    path = f"/tmp/{PREFIX}.sock"
    received: list = []
    server = await asyncio.get_running_loop().create_unix_server(
        lambda: Channel(lambda _c, k, p: received.append((k, p)), lambda _c: None), path
    )
    _, client = await asyncio.get_running_loop().create_unix_connection(
        lambda: Channel(lambda *_: None, lambda _c: None), path
    )
    return client, received, server, path


def test_a_thousand_frames_sent_in_one_loop_turn_arrive_in_order():
    async def scenario() -> list:
        client, received, server, path = await _pair()
        for i in range(1000):
            client.send(rec.Kind.CANCEL, rec.Cancel(i).encode())
        while len(received) < 1000:
            await asyncio.sleep(0.01)
        client.close()
        server.close()
        os.unlink(path)
        return received

    received = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [rec.Cancel.decode(p).request for _, p in received] == list(range(1000))


def segments() -> list[str]:
    return sorted(p.name for p in shm.SHM_DIR.glob(f"{PREFIX}.*"))


@pytest.fixture
def arena():
    made = shm.Arena(PREFIX, 4096)
    yield made
    made.close()
    assert segments() == []


def test_pixels_written_are_read_back_by_the_engine_side(arena):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28, 1) % 251
    lease = arena.put(images)
    view = shm.Segments(PREFIX).view(lease.segment, lease.offset, images.size, lease.transient)
    np.testing.assert_array_equal(view.reshape(images.shape), images)
    assert not view.flags.writeable
    lease.release()


def test_the_ring_reuses_space_and_big_requests_get_their_own_segment(arena):
    first = arena.put(np.ones(1000, np.uint8))
    second = arena.put(np.ones(1000, np.uint8))
    assert (first.offset, second.offset) == (0, 1024)
    second.release()  # out of order: the oldest region still holds the start of the ring
    waiting = arena.put(np.ones(3500, np.uint8))
    assert waiting.transient  # 1024 + 3500 > 4096, and [0, 1024) is not free: a one-off
    waiting.release()
    first.release()  # the oldest goes: everything before the newest live region is free
    third = arena.put(np.ones(2000, np.uint8))  # the ring restarted empty
    fourth = arena.put(np.ones(1000, np.uint8))
    assert (third.offset, fourth.offset) == (0, 2048)
    third.release()  # the oldest now starts at 2048, so [0, 2048) is free again
    second = arena.put(np.ones(1000, np.uint8))  # 3072 + 1024 = 4096: fits at the end
    third = arena.put(np.ones(2000, np.uint8))  # wraps to the freed start
    assert (second.offset, third.offset) == (3072, 0)
    big = arena.put(np.full(10_000, 7, np.uint8))
    assert big.transient and arena.segments == 2 and len(segments()) == 2
    view = shm.Segments(PREFIX).view(big.segment, 0, 10_000, True)
    assert int(view.sum()) == 70_000
    big.release()
    assert len(segments()) == 1  # a one-off segment is gone with its request
    for lease in (second, third, fourth):
        lease.release()
    assert arena.put(np.ones(4000, np.uint8)).offset == 0  # all free again


def test_the_engine_side_refuses_segments_of_others(arena):
    with pytest.raises(ValueError, match="not one of this server's"):
        shm.Segments(PREFIX).view("../etc/passwd", 0, 1, True)
    with pytest.raises(ValueError, match="outside segment"):
        shm.Segments(PREFIX).view(arena.name, 4000, 1000, False)


def test_segments_of_dead_processes_are_reclaimed(tmp_path):
    code = f"from service.ipc import shm; a = shm.Arena({PREFIX!r}, 4096); print(a.name)"
    name = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert segments() == [name]  # a process that died without closing leaves its segment
    pid = int(name.split(".")[1])
    assert shm.reclaim(PREFIX, pid) == 1 and segments() == []
    # a supervisor killed before it could clean up: its family prefix names a dead pid
    orphan = shm.Arena(f"cnn-serving-test-{2**22 + 1}", 4096)
    orphan._map.close()  # leave the file behind, as a killed process would
    assert shm.reclaim_orphans("cnn-serving-test") >= 1
    assert not (shm.SHM_DIR / orphan.name).exists()
