"""Structured fuzz of both inference APIs against one real server (in each server mode):
random but well-typed V2 ModelInfer / ModelStreamInfer and Classify / ClassifyStream requests.

Every answer must be OK, INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED, with a short,
non-empty message when it is an error; an OK answer has one result per image, of the model's
shapes; a request whose every part was drawn valid must be answered OK; and after each example
the server still answers health SERVING and has logged no traceback."""

from __future__ import annotations

import io
import math
import re
from typing import Any, NamedTuple

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from grpc import StatusCode as Code
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from service._proto.classifier.v1 import classifier_pb2 as pb
from service._proto.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service._proto.inference import grpc_predict_v2_pb2 as v2
from service._proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service.servicers.v2_codec import pack_bytes
from tests.conftest import MODEL
from tests.reliability.conftest import TIMEOUT_S, Fuzzed, share
from tests.service.test_images import bomb_png

ERRORS = (Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED)
ALLOWED = (Code.OK, *ERRORS)
BUSY = (Code.OK, Code.RESOURCE_EXHAUSTED)  # what a valid request gets: the queue may be full
MAX_MESSAGE_BYTES = 4_096  # an error message rides in the trailers: half of their 8 KiB
CLASSES, SHAPE = 10, (28, 28, 1)
MAX_IMAGES = 1024  # --max-queue-size: the most images one request may hold
PIXELS = math.prod(SHAPE)
OUTPUTS = {"probabilities": CLASSES, "bottleneck": 2}


class Case(NamedTuple):
    """A drawn request and what it must get (V2: its image count; Classify: which of its
    images must be classified), None where it may fail; shown short in a failure report."""

    request: Any
    must: Any

    def __repr__(self) -> str:
        return f"Case({brief(self.request)}, must={self.must!r})"


def brief(message) -> str:
    """A message on one line, its long strings and runs of repeated values cut short."""
    text = text_format.MessageToString(message, as_one_line=True)
    text = re.sub(
        r'"(?:[^"\\]|\\.)*"', lambda m: m[0] if len(m[0]) < 64 else m[0][:48] + '..."', text
    )
    run = r"(\w+): \S+ (?:\1: \S+ ){4,}"
    return re.sub(run, lambda m: f"{m[1]}: [{m[0].count(m[1] + ':')} values] ", text + " ")


# -- values ---------------------------------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)
HUGE_TEXT = st.builds(
    lambda char, n: char * n, st.characters(codec="utf-8"), st.integers(1_000, 100_000)
)
TEXT = st.text(max_size=12) | HUGE_TEXT


def mostly(valid, other: st.SearchStrategy, flips: int = 2) -> st.SearchStrategy:
    """`valid` unless `flips` fair coins all come up heads, then a draw from `other`: most
    examples get past this part of a request to the next, at a known rate (hypothesis's own
    choice between branches is skewed); shrinks towards `valid`."""

    @st.composite
    def choose(draw):
        return draw(other) if all(draw(st.booleans()) for _ in range(flips)) else valid

    return choose()


def names(valid: str, *near: str) -> st.SearchStrategy[str]:
    """Mostly `valid`, else a near miss or any text."""
    return mostly(valid, st.sampled_from(near) | TEXT, flips=3)


MODEL_NAMES = names(MODEL, "", "nope", "Fashion", " fashion", "fashion\x00", "fashion/1", "..")
V2_VERSIONS = mostly(
    "",
    st.sampled_from(["1", "0", "01", "+1", " 1", "1.0", "-1", "2", "\u0661", "9" * 40])
    | st.integers(-(2**64), 2**64).map(str)
    | TEXT,
)
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BF16", "BYTES"]  # fmt: skip
DIMS = st.integers(-3, 5) | st.sampled_from([28, 1024, 1025, 2**31, 2**32]) | INT64
SHAPES = st.lists(DIMS, max_size=8) | st.lists(st.integers(0, 3), min_size=9, max_size=100)
PARAMETER = st.one_of(
    st.just(v2.InferParameter()),
    st.builds(v2.InferParameter, bool_param=st.booleans()),
    st.builds(v2.InferParameter, int64_param=INT64),
    st.builds(v2.InferParameter, string_param=st.text(max_size=20)),
    st.builds(v2.InferParameter, double_param=st.floats()),
    st.builds(v2.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
)
PARAMETER_KEYS = st.sampled_from(
    ["triton_enable_empty_final_response", "priority", "timeout", "binary_data_output",
     "class_count", "sequence_id"]
) | st.text(max_size=12)  # fmt: skip
PARAMETERS = st.dictionaries(PARAMETER_KEYS, PARAMETER, max_size=3)


def noise(draw, size: int) -> bytes:
    """`size` pseudo-random bytes from a drawn seed (cheaper to draw than `size` bytes)."""
    return np.random.default_rng(draw(UINT32)).integers(0, 256, size, np.uint8).tobytes()


# -- image files ----------------------------------------------------------------------------------

MODES = ("L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I", "F", "CMYK")
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
MAGIC = (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"RIFF")


def picture(rng: np.random.Generator, width: int, height: int, mode: str) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 2**16, (height, width), np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 2**16, (height, width), np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), np.float32) * rng.choice([1, 255]))
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))
    return rgb.convert(mode)


def encode(image: Image.Image, fmt: str) -> bytes:
    """`image` as a `fmt` file; in RGB, or as a PNG, when `fmt` cannot hold its mode."""
    for candidate, form in ((image, fmt), (image.convert("RGB"), fmt), (image, "PNG")):
        buffer = io.BytesIO()
        try:
            candidate.save(buffer, format=form)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return buffer.getvalue()
    return encode(image.convert("RGB"), "PNG")


@st.composite
def pictures(draw) -> bytes:
    """A real image file: any supported format and mode, 1x1 to 300x300 (beyond 4x the
    model's size the server box-reduces first)."""
    side = st.integers(1, 64) | st.integers(100, 300)
    rng = np.random.default_rng(draw(UINT32))
    image = picture(rng, draw(side), draw(side), draw(st.sampled_from(MODES)))
    return encode(image, draw(st.sampled_from(FORMATS)))


@st.composite
def image_files(draw) -> tuple[bytes, bool]:
    """(an encoded image, whether it must decode): a real picture, or a damaged one, noise
    behind a format's magic bytes, a decompression bomb, nothing."""
    kind = draw(
        mostly("picture", st.sampled_from(["cut", "flip", "noise", "bomb", "empty"]), flips=1)
    )
    if kind == "picture":
        return draw(pictures()), True
    if kind in ("cut", "flip"):
        data = bytearray(draw(pictures()))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "cut":
            return bytes(data[:at]), False
        data[at] ^= draw(st.integers(1, 255))
        return bytes(data), False
    if kind == "noise":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=300)), False
    if kind == "bomb":  # over 50,000,000 pixels: more than --max-image-pixels (16,000,000)
        width = draw(st.integers(7_072, 2**31 - 1))
        return bomb_png(width, draw(st.integers(50_000_000 // width + 1, 2**31 - 1))), False
    return b"", False


# -- V2 requests ----------------------------------------------------------------------------------

Tensor = v2.ModelInferRequest.InferInputTensor


def mutated_size(draw, size: int) -> int:
    return draw(mostly(size, st.integers(0, 2 * size + 8)))


def pixel_tensor(draw, tensor: Tensor) -> tuple[bytes | None, int | None]:
    """UINT8 [N, 28, 28, 1] raw or typed pixels, maybe with a wrong shape, size or value. N is
    1 to 3, or rarely a full batch, --max-queue-size (1024: it fills the queue) or one more."""
    n = draw(mostly(None, st.sampled_from([64, MAX_IMAGES, MAX_IMAGES + 1]), flips=4))
    n = n or draw(st.integers(1, 3))
    tensor.datatype = "UINT8"
    tensor.shape.extend(draw(mostly([n, *SHAPE], SHAPES)))
    total = math.prod(tensor.shape)
    size = mutated_size(draw, total if 0 < total <= n * PIXELS else draw(st.integers(0, 4_000)))
    valid = list(tensor.shape) == [n, *SHAPE] and size == total and n <= MAX_IMAGES
    if draw(st.booleans()):
        return noise(draw, size), n if valid else None
    values = list(noise(draw, size))
    if values and draw(mostly(False, st.just(True))):
        values[draw(st.integers(0, len(values) - 1))] = draw(UINT32)
        valid = valid and max(values) <= 255
    tensor.contents.uint_contents.extend(values)
    return None, n if valid else None


def file_tensor(draw, tensor: Tensor) -> tuple[bytes | None, int | None]:
    """BYTES [N] or [N, 1] encoded files, raw (length-prefixed) or typed, maybe mispacked."""
    files = draw(st.lists(image_files(), min_size=1, max_size=3))
    items = [data for data, _ in files]
    n = len(items)
    tensor.datatype = "BYTES"
    tensor.shape.extend(draw(mostly([n], st.just([n, 1]) | SHAPES, flips=1)))
    valid = list(tensor.shape) in ([n], [n, 1]) and all(ok for _, ok in files)
    if draw(st.booleans()):
        tensor.contents.bytes_contents.extend(items)
        return None, n if valid else None
    raw = pack_bytes(items)
    cut = mutated_size(draw, len(raw))
    raw = raw[:cut] if cut <= len(raw) else raw + noise(draw, cut - len(raw))
    return raw, n if valid and cut == len(pack_bytes(items)) else None


def few(values: st.SearchStrategy) -> st.SearchStrategy[list]:
    return st.lists(values, max_size=6)


@st.composite
def typed_contents(draw) -> v2.InferTensorContents:
    return v2.InferTensorContents(
        **draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "bool_contents": few(st.booleans()),
                    "int_contents": few(st.integers(-(2**31), 2**31 - 1)),
                    "int64_contents": few(INT64),
                    "uint_contents": few(UINT32),
                    "uint64_contents": few(st.integers(0, 2**64 - 1)),
                    "fp32_contents": few(st.floats(width=32)),
                    "fp64_contents": few(st.floats()),
                    "bytes_contents": st.lists(image_files().map(lambda f: f[0]), max_size=2),
                },
            )
        )
    )


def any_tensor(draw, tensor: Tensor) -> tuple[bytes | None, int | None]:
    """Any datatype (of the V2 list or not), any shape, any contents."""
    tensor.datatype = draw(st.sampled_from(DATATYPES) | TEXT)
    tensor.shape.extend(draw(SHAPES))
    if draw(st.booleans()):
        tensor.contents.CopyFrom(draw(typed_contents()))
    total = math.prod(tensor.shape)
    raw = draw(st.none() | st.binary(max_size=64) | st.just(b""))
    if 0 < total <= 10_000 and draw(st.booleans()):
        raw = noise(draw, total * draw(st.sampled_from([1, 2, 4, 8])))
    return raw, None


@st.composite
def v2_inputs(draw) -> tuple[Tensor, bytes | None, int | None]:
    """(an input tensor, its raw contents, the image count if it is valid)."""
    tensor = Tensor(name=draw(names("images", "image", "IMAGES", "")))
    for key, value in draw(PARAMETERS).items():  # ignored by the server, as by Triton
        tensor.parameters[key].CopyFrom(value)
    form = draw(mostly(pixel_tensor, st.sampled_from([file_tensor, file_tensor, any_tensor]), 1))
    raw, count = form(draw, tensor)
    return tensor, raw, count if tensor.name == "images" else None


@st.composite
def v2_requests(draw) -> Case:
    """(a ModelInferRequest, the image count it must be answered for when wholly valid)."""
    request = v2.ModelInferRequest(
        model_name=draw(MODEL_NAMES), model_version=draw(V2_VERSIONS), id=draw(TEXT)
    )
    for key, value in draw(PARAMETERS).items():
        request.parameters[key].CopyFrom(value)
    drawn = [draw(v2_inputs()) for _ in range(draw(mostly(1, st.sampled_from([0, 2, 3]))))]
    for tensor, raw, _ in drawn:
        request.inputs.append(tensor)
        if raw is not None:
            request.raw_input_contents.append(raw)
    request.raw_input_contents.extend(
        draw(mostly([], st.lists(st.binary(max_size=16), max_size=2)))
    )
    outputs = draw(
        mostly(
            [],
            st.sampled_from([["probabilities"], ["bottleneck"], list(OUTPUTS)[::-1]])
            | st.lists(st.sampled_from(list(OUTPUTS)) | TEXT, max_size=4),
            flips=1,
        )
    )
    parameters = draw(mostly({}, PARAMETERS))
    for i, name in enumerate(outputs):
        output = request.outputs.add(name=name)
        for key, value in (parameters if i == 0 else {}).items():
            output.parameters[key].CopyFrom(value)
    valid = (
        request.model_name == MODEL
        and request.model_version in ("", "1")
        and len(drawn) == 1
        and len(request.raw_input_contents) == (drawn[0][1] is not None)
        and len(set(outputs)) == len(outputs)
        and set(outputs) <= set(OUTPUTS)
        and not (outputs and parameters)
    )
    return Case(request, drawn[0][2] if valid else None)


# -- checks ---------------------------------------------------------------------------------------


def call(method, request):
    """(response, status code, message) of a unary call."""
    try:
        return method(request, timeout=TIMEOUT_S), Code.OK, ""
    except grpc.RpcError as exc:
        return None, exc.code(), exc.details() or ""


def outcome(message: str) -> str:
    """What an error message is about, for the statistics (`--hypothesis-show-statistics`)."""
    words = re.sub(r"[\d,]+|'[^']*'|\[[^]]*\]|\([^)]*\)", "#", message)
    return re.sub(r"^model # version #: |^model #", "", words)[:60]


def check_message(message: str) -> None:
    """Non-empty, and small in grpc-message's percent-encoding (3 bytes for a byte outside
    printable ASCII, or '%')."""
    assert message, "an error without a message"
    size = sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in message.encode())
    assert size <= MAX_MESSAGE_BYTES, f"a message of {size:,} bytes on the wire"


def check_error(code: Code, message: str) -> None:
    assert code in ERRORS, f"{code.name}: {message}"
    check_message(message)


def check_v2_answer(request: v2.ModelInferRequest, response: v2.ModelInferResponse) -> None:
    """An OK answer: the asked outputs (all by default), FP32 [N, K], rows of probabilities
    summing to 1, N the images sent."""
    n = request.inputs[0].shape[0]
    names = [o.name for o in request.outputs] or list(OUTPUTS)
    assert response.model_name == MODEL and response.model_version == "1"
    assert response.id == request.id
    assert [o.name for o in response.outputs] == names
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        width = OUTPUTS[output.name]
        assert output.datatype == "FP32" and list(output.shape) == [n, width]
        values = np.frombuffer(raw, "<f4").reshape(n, width)
        assert np.isfinite(values).all()
        if output.name == "probabilities":
            np.testing.assert_allclose(values.sum(axis=1), 1, atol=1e-4)


def check_v2_stream_answer(
    request: v2.ModelInferRequest, count: int | None, answer: v2.ModelStreamInferResponse
) -> None:
    assert answer.infer_response.id == request.id
    if answer.error_message:
        busy = answer.error_message.startswith("[RESOURCE_EXHAUSTED]")
        assert count is None or busy, f"a valid request failed: {answer.error_message}"
        code = answer.error_message[1:].split("]", 1)[0]
        assert code in {c.name for c in ERRORS}, answer.error_message
        check_message(answer.error_message)
        return
    check_v2_answer(request, answer.infer_response)
    final = request.parameters.get("triton_enable_empty_final_response")
    if final is not None and final.bool_param:
        assert answer.infer_response.parameters["triton_final_response"].bool_param


@given(case=v2_requests())
def test_fuzz_model_infer(fuzzed: Fuzzed, case):
    request, count = case
    since = fuzzed.mark()
    stub = v2_grpc.GRPCInferenceServiceStub(fuzzed.channel)
    response, code, message = call(stub.ModelInfer, request)
    event(f"{code.name} {outcome(message)}")
    if code == Code.OK:
        check_v2_answer(request, response)
    else:
        check_error(code, message)
    assert count is None or code in BUSY, f"a valid request failed: {code.name}: {message}"
    fuzzed.check_alive(since)


def streams(requests: st.SearchStrategy[Case]) -> st.SearchStrategy[list[Case]]:
    """1 to 4 requests; sometimes 6 times over, past the 16 a stream answers at once."""
    return st.tuples(st.lists(requests, min_size=1, max_size=4), mostly(1, st.just(6))).map(
        lambda drawn: drawn[0] * drawn[1]
    )


@share(2)  # an example is up to 24 requests
@given(cases=streams(v2_requests()))
def test_fuzz_model_stream_infer(fuzzed: Fuzzed, cases):
    since = fuzzed.mark()
    stub = v2_grpc.GRPCInferenceServiceStub(fuzzed.channel)
    answers = list(stub.ModelStreamInfer(iter([r for r, _ in cases]), timeout=TIMEOUT_S))
    assert len(answers) == len(cases)
    for (request, count), answer in zip(cases, answers, strict=True):
        event(outcome(answer.error_message) or "OK")
        check_v2_stream_answer(request, count, answer)
    fuzzed.check_alive(since)


# -- Classify -------------------------------------------------------------------------------------


@st.composite
def classify_images(draw) -> tuple[pb.Image, bool]:
    """(an Image, whether it must be classified): a file, raw pixels of the model's shape or
    of any shape and size, or an Image with no source."""
    image = pb.Image(id=draw(TEXT))
    kind = draw(mostly("file", st.sampled_from(["pixels", "pixels", "any", "none"]), flips=1))
    if kind == "file":
        image.encoded, ok = draw(image_files())
        return image, ok
    if kind == "pixels":
        image.tensor.CopyFrom(pb.Tensor(height=28, width=28, channels=1, data=noise(draw, PIXELS)))
        return image, True
    if kind == "none":
        return image, False
    side = st.sampled_from([0, 1, 3, 28, 28, 2**32 - 1]) | UINT32
    h, w, c = draw(side), draw(side), draw(side)
    size = mutated_size(draw, h * w * c if h * w * c <= 4 * PIXELS else draw(st.integers(0, 4_000)))
    image.tensor.CopyFrom(pb.Tensor(height=h, width=w, channels=c, data=noise(draw, size)))
    return image, (h, w, c) == SHAPE and size == PIXELS


@st.composite
def classify_requests(draw) -> Case:
    """(a ClassifyRequest, which images must be classified, or None when the request as a
    whole may fail)."""
    images = draw(st.lists(classify_images(), max_size=5))
    request = pb.ClassifyRequest(
        model=draw(MODEL_NAMES),
        version=draw(mostly(0, st.just(1) | INT64)),
        images=[image for image, _ in images],
        top_k=draw(mostly(0, st.integers(0, 12) | UINT32, flips=1)),
    )
    valid = request.model == MODEL and request.version in (0, 1) and images
    return Case(request, [ok for _, ok in images] if valid else None)


def check_classified(
    request: pb.ClassifyRequest, must: list[bool] | None, response: pb.ClassifyResponse
) -> None:
    """An OK answer: one result per image, in order, each classified or its own error."""
    assert response.model == MODEL and response.version == 1
    assert len(response.results) == len(request.images)
    for i, (image, result) in enumerate(zip(request.images, response.results, strict=True)):
        assert result.index == i and result.id == image.id
        event(f"image: {result.error.code or 'OK'} {outcome(result.error.message)}")
        if result.HasField("error"):
            busy = result.error.code == Code.RESOURCE_EXHAUSTED.name  # the decode budget
            assert not (must and must[i]) or busy, f"image {i} failed: {result.error}"
            assert result.error.code in {c.name for c in ERRORS}, result.error
            check_message(result.error.message)
            assert not result.label and not result.probabilities
            continue
        assert len(result.probabilities) == CLASSES and result.label
        assert sum(result.probabilities) == pytest.approx(1, abs=1e-4)
        scores = [s.score for s in result.top_k]
        assert len(scores) == min(request.top_k or 5, CLASSES)
        assert scores == sorted(scores, reverse=True) and result.confidence == scores[0]


@given(case=classify_requests())
def test_fuzz_classify(fuzzed: Fuzzed, case):
    request, must = case
    since = fuzzed.mark()
    stub = pb_grpc.ClassifierStub(fuzzed.channel)
    response, code, message = call(stub.Classify, request)
    event(f"{code.name} {outcome(message)}")
    if code == Code.OK:
        check_classified(request, must, response)
    else:
        check_error(code, message)
        assert must is None or code in BUSY, f"a valid request failed: {code.name}: {message}"
    fuzzed.check_alive(since)


@share(2)  # an example is up to 24 requests
@given(cases=streams(classify_requests()))
def test_fuzz_classify_stream(fuzzed: Fuzzed, cases):
    since = fuzzed.mark()
    stub = pb_grpc.ClassifierStub(fuzzed.channel)
    answers = list(stub.ClassifyStream(iter([r for r, _ in cases]), timeout=TIMEOUT_S))
    assert len(answers) == len(cases)
    for (request, must), answer in zip(cases, answers, strict=True):
        event(f"{answer.error.code or 'OK'} {outcome(answer.error.message)}")
        if answer.HasField("error"):
            busy = answer.error.code == Code.RESOURCE_EXHAUSTED.name
            assert must is None or busy, f"a valid request failed: {answer.error}"
            assert answer.error.code in {c.name for c in ERRORS}, answer.error
            check_message(answer.error.message)
            assert not answer.results
        else:
            check_classified(request, must, answer)
    fuzzed.check_alive(since)
