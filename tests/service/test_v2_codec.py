"""Open Inference Protocol messages <-> numpy: both content forms, both datatypes, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service._proto.inference import grpc_predict_v2_pb2 as v2
from service.errors import InvalidInput, ModelNotFound
from service.repository import ModelSpec
from service.servicers import v2_codec

SPEC = ModelSpec("m", 3, Path("."), tuple("abc"), "images", 2, 2, 1, {})


def request(datatype: str, shape: list[int]) -> v2.ModelInferRequest:
    message = v2.ModelInferRequest(model_name="m")
    message.inputs.add(name="images", datatype=datatype, shape=shape)
    return message


def test_uint8_raw_and_typed_contents_agree() -> None:
    pixels = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1)
    raw = request("UINT8", [2, 2, 2, 1])
    raw.raw_input_contents.append(pixels.tobytes())
    typed = request("UINT8", [2, 2, 2, 1])
    typed.inputs[0].contents.uint_contents.extend(pixels.ravel().tolist())
    np.testing.assert_array_equal(v2_codec.decode_input(raw, SPEC), pixels)
    np.testing.assert_array_equal(v2_codec.decode_input(typed, SPEC), pixels)
    typed.inputs[0].contents.uint_contents[0] = 256
    with pytest.raises(InvalidInput, match="above 255"):
        v2_codec.decode_input(typed, SPEC)


@pytest.mark.parametrize("shape", [[3], [3, 1]])
def test_bytes_raw_and_typed_contents_agree(shape: list[int]) -> None:
    items = [b"first", b"", b"\x00\xff" * 3]
    raw = request("BYTES", shape)
    raw.raw_input_contents.append(v2_codec.pack_bytes(items))
    typed = request("BYTES", shape)
    typed.inputs[0].contents.bytes_contents.extend(items)
    assert v2_codec.decode_input(raw, SPEC) == items == v2_codec.decode_input(typed, SPEC)


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"\x05\x00\x00\x00abc", "overruns"), (b"\x01\x00", "truncated length")],
)
def test_malformed_raw_bytes(payload: bytes, message: str) -> None:
    bad = request("BYTES", [1])
    bad.raw_input_contents.append(payload)
    with pytest.raises(InvalidInput, match=message):
        v2_codec.decode_input(bad, SPEC)


def test_element_count_must_match_shape() -> None:
    bad = request("BYTES", [2])
    bad.inputs[0].contents.bytes_contents.append(b"one")
    with pytest.raises(InvalidInput, match=r"BYTES shape \[2\] but 1 elements"):
        v2_codec.decode_input(bad, SPEC)


def test_response_carries_requested_outputs_as_raw_fp32() -> None:
    message = request("UINT8", [1, 2, 2, 1])
    message.id = "req-7"
    message.outputs.add(name="bottleneck")
    names = v2_codec.requested_outputs(message, SPEC)
    outputs = {"probabilities": np.array([[0.2, 0.3, 0.5]], np.float32),
               "bottleneck": np.array([[1.5, -2.0]], np.float32)}  # fmt: skip
    response = v2_codec.encode_response(message, SPEC, names, outputs)
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "req-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("bottleneck", "FP32", [1, 2])
    ]
    decoded = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    np.testing.assert_array_equal(decoded, [1.5, -2.0])


def test_versions_are_positive_integers() -> None:
    assert v2_codec.parse_version("m", "") is None
    assert v2_codec.parse_version("m", "12") == 12
    for bad in ("0", "-1", "v2"):
        with pytest.raises(ModelNotFound, match="versions are integers"):
            v2_codec.parse_version("m", bad)
