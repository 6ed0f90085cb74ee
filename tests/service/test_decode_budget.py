"""The decode budget (service/memory.py) and what it bounds: the estimate of a decode's memory
(imaging/policy.py), refusals and releases, per image over a real server in both modes."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service._proto.inference import grpc_predict_v2_pb2 as v2
from service._proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service.client import Client
from service.errors import Code, DecodeBudgetExceeded, InvalidInput
from service.images import decode
from service.memory import TRIM_AFTER_BYTES, TRIM_INTERVAL_S, DecodeBudget, MiB
from service.servicers.v2_codec import pack_bytes
from tests.conftest import MODEL, ROOT, Served, png, scrape, start_server
from tests.service.test_images import bomb_png

GRAY = (28, 28, 1)
LIMIT = 50_000_000


def encoded(picture: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **save)
    return buffer.getvalue()


# ---- the budget alone


def test_a_reservation_that_does_not_fit_is_refused_and_every_one_is_released():
    changes: list[int] = []
    budget = DecodeBudget(10 * MiB, on_change=changes.append)
    with budget.reserve(6 * MiB, "image A"):
        with pytest.raises(DecodeBudgetExceeded) as caught, budget.reserve(5 * MiB, "image B"):
            pass
        assert budget.in_flight == 6 * MiB
    message = str(caught.value)
    assert caught.value.code == Code.RESOURCE_EXHAUSTED
    assert message == (
        "image B needs about 5 MiB to decode and 6 MiB of the --decode-budget-mib 10 are held "
        "by images decoding now: retry later"
    )
    with pytest.raises(ValueError), budget.reserve(10 * MiB, "image C"):  # a failed decode
        raise ValueError("corrupt")
    assert budget.in_flight == 0 and changes == [6 * MiB, 0, 10 * MiB, 0]


def test_an_image_larger_than_the_whole_budget_is_refused_even_alone():
    budget = DecodeBudget(10 * MiB)
    with pytest.raises(DecodeBudgetExceeded) as caught, budget.reserve(11 * MiB, "image X"):
        pass
    assert str(caught.value) == (
        "image X needs about 11 MiB to decode, more than the whole --decode-budget-mib 10: "
        "send a smaller image"
    )
    assert budget.in_flight == 0


def test_threads_racing_for_the_budget_never_pass_it_and_leave_it_empty():
    limit, each, threads = 8 * MiB, 3 * MiB, 16
    seen: list[int] = []
    budget = DecodeBudget(limit, on_change=seen.append)
    start = threading.Barrier(threads)
    outcomes: list[str] = []

    def decode_many() -> None:
        start.wait()
        for _ in range(200):
            try:
                with budget.reserve(each, "image"):
                    outcomes.append("ok")
            except DecodeBudgetExceeded:
                outcomes.append("refused")

    workers = [threading.Thread(target=decode_many) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(outcomes) == threads * 200 and "ok" in outcomes
    assert max(seen) <= limit and budget.in_flight == 0 and seen[-1] == 0


def test_memory_is_handed_back_when_a_burst_ends_at_most_once_per_interval():
    now = [100.0]
    trims: list[float] = []
    budget = DecodeBudget(1024 * MiB, on_idle=lambda: trims.append(now[0]), clock=lambda: now[0])
    big = TRIM_AFTER_BYTES
    with budget.reserve(big, "a"):
        with budget.reserve(big, "b"):
            pass
        assert trims == []  # "a" still decoding: not idle
    assert trims == [100.0]
    with budget.reserve(big, "c"):
        pass
    assert trims == [100.0]  # within the interval: "c"'s bytes wait
    now[0] += TRIM_INTERVAL_S
    with budget.reserve(1, "tiny"):
        pass
    assert trims == [100.0, 100.0 + TRIM_INTERVAL_S]  # the next idle moment after it
    now[0] += TRIM_INTERVAL_S
    with budget.reserve(1, "tiny"):
        pass
    assert len(trims) == 2  # too little freed since the last trim


# ---- the budget around real decodes


def test_decode_holds_its_estimate_while_it_runs_and_refuses_it_before_decoding():
    data = encoded(Image.new("RGB", (2000, 2000), (200, 10, 10)))  # 4 MP at 4 bytes a pixel
    held: list[int] = []
    budget = DecodeBudget(64 * MiB, on_change=held.append)
    out = decode(data, GRAY, LIMIT, budget)
    assert out.shape == GRAY and held == [2000 * 2000 * 4, 0]
    small = DecodeBudget(8 * MiB)
    with pytest.raises(DecodeBudgetExceeded, match=r"image of 2000x2000 RGB PNG needs about 15 "
                       r"MiB to decode, more than the whole --decode-budget-mib 8"):  # fmt: skip
        decode(data, GRAY, LIMIT, small)
    with pytest.raises(InvalidInput, match="corrupt or truncated"):
        decode(data[: len(data) // 2], GRAY, LIMIT, budget)  # fails while holding its bytes
    assert budget.in_flight == 0 and small.in_flight == 0


MEASURE = """
import io, re, sys
from PIL import Image
from imaging.policy import _check_pixels, decode, decoding_bytes
path, mode, fmt = sys.argv[1:]
data = open(path, "rb").read()
warm = io.BytesIO()
Image.new(mode, (300, 300)).save(warm, fmt)
decode(warm.getvalue(), (28, 28, 1), 10**9)  # the codec's libraries, loaded and warm
with Image.open(io.BytesIO(data)) as opened:
    stored = _check_pixels(opened, 10**9)
    if opened.format == "JPEG":
        opened.draft(None, (56, 56))
    estimate = decoding_bytes(opened, stored, (28, 28, 1))
def peak():  # this process's own high-water mark (ru_maxrss would count the parent's fork)
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
before = peak()
decode(data, (28, 28, 1), 10**9)
print(estimate, peak() - before)
"""


@pytest.mark.parametrize(
    ("mode", "fmt", "save"),
    [
        ("L", "PNG", {}),
        ("RGB", "PNG", {}),
        ("RGBA", "PNG", {}),
        ("P", "PNG", {}),
        ("I;16", "PNG", {}),
        ("RGB", "WEBP", {"lossless": True}),
        ("RGB", "JPEG", {"progressive": True}),
    ],
)
def test_the_estimate_covers_what_a_decode_really_holds(tmp_path, mode, fmt, save):
    """Peak RSS of one 9 MP decode in a fresh process: never above the estimate (a full-size
    copy more, as ImageOps.exif_transpose made, would be caught)."""
    noise = np.random.default_rng(0).integers(0, 256, (3000, 3000, 3), dtype=np.uint8)
    picture = Image.fromarray(noise) if fmt == "JPEG" else Image.new("RGB", (3000, 3000))
    path = tmp_path / f"big.{fmt.lower()}"
    picture.convert(mode).save(path, format=fmt, **save)
    answer = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), mode, fmt],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert answer.returncode == 0, answer.stderr
    estimate, peak = map(int, answer.stdout.split())
    held = f"{mode} {fmt}: {peak / MiB:.1f} MiB held, {estimate / MiB:.1f} MiB estimated"
    print(held)
    assert peak <= estimate + 2 * MiB, held


# ---- over the wire: a real server with a small budget, in both modes

BUDGET_MIB = 40  # one 3000x3000 RGB PNG (34 MiB to decode) at a time, never two


@pytest.fixture(scope="module")
def tight(repository: Path, frontends: str) -> Iterator[Served]:
    served = start_server(
        repository, "--decode-budget-mib", str(BUDGET_MIB), "--decode-threads", "4"
    )
    yield served
    assert served.stop() == 0


def v2_bytes(images: list[bytes]) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="BYTES", shape=[len(images)])
    request.raw_input_contents.append(pack_bytes(images))
    return request


def v2_error(served: Served, images: list[bytes]) -> grpc.RpcError:
    with grpc.insecure_channel(served.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(v2_bytes(images), timeout=60)
    return caught.value


@pytest.mark.usefixtures("frontends")
def test_a_burst_over_the_budget_is_refused_in_part_and_released(tight: Served, sample_images):
    """12 images that fit the budget one at a time, decoded 4 at a time: the first to reserve
    is decoded, those that find it full are RESOURCE_EXHAUSTED, each on its own; one that
    needs more than the whole budget fails a V2 request. Afterwards the budget is empty and a
    normal request is answered."""
    large = encoded(Image.new("RGB", (3000, 3000), (90, 90, 90)))
    larger = encoded(Image.new("RGB", (4000, 4000)))  # 61 MiB: more than the whole budget
    with Client(tight.target) as client:
        burst = client.classify([large] * 12, MODEL, timeout_s=120)
        refused = [p for p in burst if not p.ok]
        assert refused and len(refused) < len(burst)
        for p in refused:
            assert p.error_code == "RESOURCE_EXHAUSTED"
            assert p.error.startswith(f"model 'fashion' version 1, image {p.index}: image of ")
            assert p.error.endswith(
                f"3000x3000 RGB PNG needs about 34 MiB to decode and 34 MiB of the "
                f"--decode-budget-mib {BUDGET_MIB} are held by images decoding now: retry later"
            )
        error = v2_error(tight, [larger])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            "model 'fashion' version 1, image 0: image of 4000x4000 RGB PNG needs about 61 MiB "
            f"to decode, more than the whole --decode-budget-mib {BUDGET_MIB}: send a smaller "
            "image"
        )
        x, _ = sample_images
        after = client.classify([png(image) for image in x[:4]] + [large], MODEL)
        assert all(p.ok for p in after)
    metrics = scrape(tight)
    in_flight = metrics["cnn_serving_decode_bytes_in_flight"]  # summed over the processes
    assert [(s.labels, s.value) for s in in_flight] == [({}, 0.0)]
    refusals = [s for s in metrics["cnn_serving_decode_refused"] if s.name.endswith("_total")]
    assert sum(s.value for s in refusals) >= len(refused) + 1  # (the module's earlier tests too)
    assert {(s.labels["model"], s.labels["version"]) for s in refusals} == {(MODEL, "1")}


@pytest.mark.usefixtures("frontends")
def test_the_default_pixel_limit_refuses_a_larger_image_over_the_wire(tight: Served):
    """16,000,000 pixels by default, checked from the header: 4001x4000 is refused as
    INVALID_ARGUMENT by both APIs; 4000x4000 passes the check (this one's data is cut short)."""
    over, at = bomb_png(4001, 4000), bomb_png(4000, 4000)
    with Client(tight.target) as client:
        answers = client.classify([over, at], MODEL)
    assert [p.error_code for p in answers] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert answers[0].error == (
        "model 'fashion' version 1, image 0: image of 4001x4000 = 16,004,000 pixels exceeds "
        "--max-image-pixels 16,000,000"
    )
    assert "corrupt or truncated image" in answers[1].error
    error = v2_error(tight, [over])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4001x4000 = 16,004,000 pixels exceeds --max-image-pixels 16,000,000" in error.details()
