"""The batcher's pure helpers and its behaviour under concurrency, overflow and deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import Batcher, BatchReport, merge, split
from service.errors import DeadlineExceeded, QueueFull, Unavailable


def images(n: int, value: int = 0) -> np.ndarray:
    return np.full((n, 2, 2, 1), value, dtype=np.uint8)


def doubling(batch: np.ndarray) -> dict[str, np.ndarray]:
    """A stand-in model: each image's output is twice its pixel sum (so rows are traceable)."""
    return {"out": batch.reshape(len(batch), -1).sum(axis=1, dtype=np.int64)[:, None] * 2}


def test_merge_and_split_round_trip() -> None:
    parts = [images(2, 1), images(1, 2), images(3, 3)]
    merged, offsets = merge(parts)
    assert merged.shape == (6, 2, 2, 1) and offsets == [0, 2, 3, 6]
    answers = split(doubling(merged), offsets)
    assert [a["out"][:, 0].tolist() for a in answers] == [[8, 8], [16], [24, 24, 24]]


class Gate:
    """A model that blocks until released, to hold the batcher busy deterministically."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.entered.set()
        self.release.wait(10)
        return doubling(batch)


def make(run, max_batch: int = 8, delay_s: float = 0.05, queue: int = 64):
    reports: list[BatchReport] = []
    pool = ThreadPoolExecutor(2)
    batcher = Batcher(run, pool, max_batch, delay_s, queue, reports.append, name="test v1")
    return batcher, reports


def test_concurrent_requests_are_merged_and_answered_to_the_right_caller() -> None:
    async def scenario() -> list[BatchReport]:
        batcher, reports = make(doubling, max_batch=8, delay_s=0.2)
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit(images(1, v)) for v in range(8)))
        for value, answer in enumerate(answers):
            assert answer["out"].tolist() == [[value * 4 * 2]]
        await batcher.close()
        return reports

    reports = asyncio.run(scenario())
    assert [r.size for r in reports] == [8]  # one full batch, not eight runs


def test_a_request_above_max_batch_is_cut_into_batches() -> None:
    async def scenario() -> list[BatchReport]:
        batcher, reports = make(doubling, max_batch=4, delay_s=0.0)
        batcher.start()
        answer = await batcher.submit(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1))
        assert answer["out"][:, 0].tolist() == [2 * v for v in range(10)]
        await batcher.close()
        return reports

    assert sorted(r.size for r in asyncio.run(scenario())) == [2, 4, 4]


def test_overflow_is_refused_at_once_and_the_queue_recovers() -> None:
    gate = Gate()

    async def scenario() -> None:
        batcher, _ = make(gate, max_batch=2, delay_s=0.0, queue=4)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(images(2)))
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 5)
        queued = asyncio.ensure_future(batcher.submit(images(4)))  # fills the queue
        await asyncio.sleep(0)
        assert batcher.depth == 4
        with pytest.raises(QueueFull, match=r"test v1: queue full \(4 images waiting"):
            await batcher.submit(images(1))
        gate.release.set()
        assert len((await first)["out"]) == 2 and len((await queued)["out"]) == 4
        assert batcher.depth == 0
        await batcher.close()

    asyncio.run(scenario())


def test_expired_requests_are_dropped_before_compute() -> None:
    gate = Gate()

    async def scenario() -> list[BatchReport]:
        batcher, reports = make(gate, max_batch=1, delay_s=0.0)
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit(images(1)))
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 5)
        late = asyncio.ensure_future(batcher.submit(images(1), deadline=time.monotonic()))
        await asyncio.sleep(0.01)
        gate.release.set()
        await busy
        with pytest.raises(DeadlineExceeded, match="dropped before computing"):
            await late
        await batcher.close()
        return reports

    reports = asyncio.run(scenario())
    assert [r.size for r in reports] == [1]  # only the first request was computed


def test_a_failing_model_fails_its_callers_not_the_batcher() -> None:
    calls = []

    def flaky(batch: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return doubling(batch)

    async def scenario() -> None:
        batcher, reports = make(flaky, max_batch=4, delay_s=0.0)
        batcher.start()
        with pytest.raises(Exception, match="inference failed"):
            await batcher.submit(images(1))
        assert (await batcher.submit(images(1, 1)))["out"].tolist() == [[8]]
        assert [r.ok for r in reports] == [False, True]
        await batcher.close()

    asyncio.run(scenario())


def test_close_answers_the_running_batch_before_stopping() -> None:
    gate = Gate()

    async def scenario() -> None:
        batcher, _ = make(gate, max_batch=2, delay_s=0.0)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(images(2, 1)))
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 5)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        assert not closing.done()  # waits for the batch in flight
        gate.release.set()
        assert (await running)["out"].tolist() == [[8], [8]]
        await closing
        with pytest.raises(Exception, match="being unloaded"):
            await batcher.submit(images(1))

    asyncio.run(scenario())


def test_hard_close_fails_what_is_queued() -> None:
    gate = Gate()

    async def scenario() -> None:
        errors: list[dict] = []  # what the loop caught in callbacks (the batcher's own)
        asyncio.get_running_loop().set_exception_handler(lambda _loop, c: errors.append(c))
        batcher, reports = make(gate, max_batch=1, delay_s=0.0)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(images(1)))
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 5)
        queued = asyncio.ensure_future(batcher.submit(images(1)))
        await asyncio.sleep(0)
        await batcher.close(graceful=False)
        gate.release.set()
        for future in (running, queued):
            with pytest.raises(Unavailable, match="shutting down"):
                await future
        while not reports:  # the cut batch still finishes in its thread, and is reported
            await asyncio.sleep(0.01)
        assert errors == [] and reports[0].size == 1

    asyncio.run(scenario())


def test_small_batches_can_run_on_the_loop_with_the_same_answers() -> None:
    threads = []

    def model(batch: np.ndarray) -> dict[str, np.ndarray]:
        threads.append(threading.current_thread() is threading.main_thread())
        return doubling(batch)

    async def scenario() -> list[bool]:
        reports: list[BatchReport] = []
        pool = ThreadPoolExecutor(1)
        batcher = Batcher(model, pool, 4, 0.0, 64, reports.append, "t", inline_up_to=2)
        batcher.start()
        small = await batcher.submit(images(2, 1))
        big = await batcher.submit(images(4, 1))
        assert small["out"].tolist() == [[8]] * 2 and big["out"].tolist() == [[8]] * 4
        await batcher.close()
        return threads

    assert asyncio.run(scenario()) == [True, False]  # 2 images inline, 4 in the pool


def test_statistics_count_each_request_in_every_part_as_triton_does() -> None:
    from service.core import Stats
    from service.engine.gauges import record_batch

    stats = Stats()
    report = BatchReport(size=4, queue_s=[0.001, 0.002, 0.003], compute_s=0.010, ok=True,
                         input_s=0.0001, output_s=0.0002)  # fmt: skip
    record_batch(stats, report)
    record_batch(stats, BatchReport(size=1, queue_s=[0.0], compute_s=0.004, ok=True))
    assert (stats.execution_count, stats.inference_count) == (2, 5)
    # three requests, then one: every part counts 4, each request with its batch's duration
    assert stats.queue == [4, 6_000_000]
    assert stats.compute_input == [4, 300_000]
    assert stats.compute == [4, 3 * 10_000_000 + 4_000_000]
    assert stats.compute_output == [4, 600_000]
    # per executed batch size: [batches, input ns, infer ns, output ns]
    assert stats.batches == {4: [1, 100_000, 10_000_000, 200_000], 1: [1, 0, 4_000_000, 0]}
    assert Stats.from_dict(stats.to_dict()) == stats  # across the engine's channel


def test_a_batch_report_times_merging_and_splitting() -> None:
    async def scenario() -> list[BatchReport]:
        batcher, reports = make(doubling, max_batch=8, delay_s=0.05)
        batcher.start()
        await asyncio.gather(*(batcher.submit(images(2, v)) for v in range(4)))
        await batcher.close()
        return reports

    (report,) = asyncio.run(scenario())
    assert report.size == 8 and len(report.queue_s) == 4
    assert report.input_s > 0 and report.output_s > 0 and report.compute_s > 0
