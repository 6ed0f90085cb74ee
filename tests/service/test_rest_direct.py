"""The direct V2 REST path (rest/v2_direct.py) beside the general one (v2_json ->
servicers.v2_codec): whatever request the direct path takes, the general path takes too and
answers the same bytes; the common forms do go the direct way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.errors import InvalidInput
from service.repository import ModelSpec
from service.rest import v2_direct, v2_json
from service.servicers import v2_codec

SPEC = ModelSpec("m", 3, Path("."), tuple("abc"), "images", 2, 2, 1, {})
ABSENT = object()  # a key left out of the document


def outputs_for(images: np.ndarray) -> dict[str, np.ndarray]:
    """Made-up model outputs that depend on every pixel (float32, as onnxruntime answers)."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    probabilities = np.stack([flat.sum(1) / 7, flat.max(1) / 3, flat.min(1) + 0.1], axis=1)
    return {"probabilities": probabilities, "bottleneck": flat[:, :2] / 255}


def general(document: dict[str, Any], binary: memoryview) -> tuple[Any, tuple[bytes, dict]]:
    """What the general path answers (service.servicers.inference.infer without its engine)."""
    message, binary_default = v2_json.infer_request(document, binary, "m", "", SPEC)
    requested = v2_codec.requested_outputs(message, SPEC)
    tensor, raw = v2_codec.image_tensor(message, SPEC)
    images = v2_codec.decode_input(tensor, raw, SPEC)
    answer = v2_codec.encode_response(message, SPEC, requested, outputs_for(images))
    return images, v2_json.infer_response(answer, message, binary_default)


def direct(document: dict[str, Any], binary: memoryview) -> tuple[Any, tuple[bytes, dict]] | None:
    common = v2_direct.common_request(document, binary, SPEC)
    if common is None:
        return None
    return common.images, v2_direct.response(common, SPEC, outputs_for(common.images))


def either(valid: object, *others: object) -> st.SearchStrategy[Any]:
    """The valid value half the time, else one of the others."""
    return st.one_of(st.just(valid), st.sampled_from(others))


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, Any], memoryview]:
    """A V2 REST body near the common form: each part valid, or wrong in one of many ways."""
    n = draw(st.integers(1, 3))
    pixels = draw(arrays(np.uint8, (n, 2, 2, 1)))
    form = draw(st.sampled_from(["binary", "flat", "nested"]))
    tensor: dict[str, Any] = {
        "name": draw(either("images", "image", 3)),
        "datatype": draw(either("UINT8", "BYTES", "FP32", None)),
        "shape": draw(
            either(
                [n, 2, 2, 1],
                [n, 2, 2],
                [0, 2, 2, 1],
                [n, 2, 2, True],
                [n, 2, "2", 1],
                [n + 1, 2, 2, 1],
                [n, 2, 2, 1, 1],
            )
        ),  # fmt: skip
    }
    parameters = dict(draw(either({}, {"x": 1}, {"x": None}, {"x": 2**63}, {"x": 1.5, "y": "z"},
                                  {f"p{i}": 1 for i in range(65)})))  # fmt: skip
    binary = b""
    if form == "binary":
        binary = pixels.tobytes() + draw(either(b"", b"x"))
        parameters["binary_data_size"] = draw(either(pixels.size, pixels.size + 1, True, "4", -1))
        if draw(st.booleans()) and draw(st.booleans()):
            tensor["data"] = pixels.ravel().tolist()
    else:
        data = pixels.ravel().tolist() if form == "flat" else pixels.tolist()
        tensor["data"] = draw(either(data, [256] * pixels.size, [-1] * pixels.size, "abc",
                                     [[1, 2], [3]], [1.5] * pixels.size, data[:-1]))  # fmt: skip
    tensor["parameters"] = draw(either(parameters, [], None)) if parameters else parameters
    document: dict[str, Any] = {"inputs": draw(either([tensor], [], [tensor, tensor], tensor))}
    for key, value in (
        ("id", draw(either(ABSENT, "", "request-7", 5))),
        ("parameters", draw(either(ABSENT, {"binary_data_output": True}, {"timeout": 5},
                                   {"binary_data_output": False}, {"binary_data_output": "yes"},
                                   {"x": [1]}, []))),  # fmt: skip
        ("outputs", draw(either(ABSENT, [], [{"name": "bottleneck"}],
            [{"name": "probabilities", "parameters": {"binary_data": False}},
             {"name": "bottleneck", "parameters": {"binary_data": True}}],
            [{"name": "bottleneck"}, {"name": "bottleneck"}], [{"name": "nope"}],
            [{"name": "probabilities", "parameters": {"classification": 2}}],
            [{"name": "bottleneck", "parameters": {"binary_data": 1}}],
            [{"name": "bottleneck", "parameters": {"other": 1}}],
            [{"name": "bottleneck", "parameters": []}], [{"name": 3}], "x", [1],
            [{"name": "bottleneck"}, {"name": "probabilities"}, {"name": "bottleneck"}]))),
    ):  # fmt: skip
        if value is not ABSENT:
            document[key] = value
    return document, memoryview(binary)


@settings(max_examples=400, deadline=None)
@given(case=requests())
def test_what_the_direct_path_takes_the_general_path_answers_alike(case) -> None:
    document, binary = case
    try:
        answer = direct(document, binary)
    except InvalidInput as refused:  # bad JSON pixels: the general path says the same
        with pytest.raises(InvalidInput) as error:
            general(document, binary)
        assert str(error.value) == str(refused)
        return
    if answer is None:
        return  # the general path answers it (or says what is wrong), as it always did
    images, (content, headers) = general(document, binary)  # must not raise
    np.testing.assert_array_equal(answer[0], images)
    assert answer[1] == (content, headers)


def body(images: np.ndarray, form: str, **extra: Any) -> tuple[dict[str, Any], memoryview]:
    tensor: dict[str, Any] = {"name": "images", "datatype": "UINT8", "shape": list(images.shape)}
    binary = b""
    if form == "binary":
        binary = images.tobytes()
        tensor["parameters"] = {"binary_data_size": len(binary)}
    else:
        tensor["data"] = images.ravel().tolist() if form == "flat" else images.tolist()
    return {"inputs": [tensor], **extra}, memoryview(binary)


@pytest.mark.parametrize("form", ["binary", "flat", "nested"])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"id": "r1", "parameters": {"binary_data_output": True, "timeout": 10**6}},
        {"outputs": [{"name": "bottleneck", "parameters": {"binary_data": True}}]},
        {"outputs": [{"name": "probabilities"}, {"name": "bottleneck"}], "id": ""},
    ],
)
def test_the_common_forms_go_the_direct_way(form: str, extra: dict[str, Any]) -> None:
    images = np.arange(12, dtype=np.uint8).reshape(3, 2, 2, 1) * 20
    document, binary = body(images, form, **extra)
    answer = direct(document, binary)
    assert answer is not None
    np.testing.assert_array_equal(answer[0], images)
    assert answer[1] == general(document, binary)[1]
    content, headers = answer[1]
    length = int(headers.get("inference-header-content-length", len(content)))
    described = orjson.loads(content[:length])  # the JSON part, then the tensors it describes
    sizes = [o["parameters"]["binary_data_size"] for o in described["outputs"] if "parameters" in o]
    assert len(content) - length == sum(sizes)
    assert described.get("id", "") == extra.get("id", "")


@pytest.mark.parametrize(
    "document",
    [
        {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}],
         "note": "encoded files: the general path decodes them"},
        {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 1],
                     "data": [1, 2, 3, 4]}],
         "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]},
    ],
)  # fmt: skip
def test_the_rest_goes_the_general_way(document: dict[str, Any]) -> None:
    assert v2_direct.common_request(document, memoryview(b""), SPEC) is None


def test_bad_json_pixels_are_refused_once_with_the_general_message() -> None:
    document = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 1],
                            "data": [1, 2, 3, 999]}]}  # fmt: skip
    with pytest.raises(InvalidInput, match="outside 0-255") as refused:
        v2_direct.common_request(document, memoryview(b""), SPEC)
    with pytest.raises(InvalidInput) as error:
        general(document, memoryview(b""))
    assert (
        str(error.value)
        == str(refused.value)
        == "model 'm' version 3: UINT8 data holds a value outside 0-255"
    )
