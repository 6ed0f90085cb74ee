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


def decode(message: v2.ModelInferRequest) -> np.ndarray | list[bytes]:
    return v2_codec.decode_input(*v2_codec.image_tensor(message, SPEC), SPEC)


def test_uint8_raw_and_typed_contents_agree() -> None:
    pixels = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1)
    raw = request("UINT8", [2, 2, 2, 1])
    raw.raw_input_contents.append(pixels.tobytes())
    typed = request("UINT8", [2, 2, 2, 1])
    typed.inputs[0].contents.uint_contents.extend(pixels.ravel().tolist())
    np.testing.assert_array_equal(decode(raw), pixels)
    np.testing.assert_array_equal(decode(typed), pixels)
    typed.inputs[0].contents.uint_contents[0] = 256
    with pytest.raises(InvalidInput, match="above 255"):
        decode(typed)


@pytest.mark.parametrize("shape", [[3], [3, 1]])
def test_bytes_raw_and_typed_contents_agree(shape: list[int]) -> None:
    items = [b"first", b"", b"\x00\xff" * 3]
    raw = request("BYTES", shape)
    raw.raw_input_contents.append(v2_codec.pack_bytes(items))
    typed = request("BYTES", shape)
    typed.inputs[0].contents.bytes_contents.extend(items)
    assert decode(raw) == items == decode(typed)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x05\x00\x00\x00abc", "overruns"),
        (b"\x01\x00", "truncated length"),
        (b"", r"BYTES shape \[1\] but 0 elements"),
        (b"\x00\x00\x00\x00\x01\x00\x00\x00a", r"holds 5 bytes after element 0"),
        # a million empty elements for a shape of one: refused after reading one
        (b"\x00" * 4_000_000, r"holds 3,999,996 bytes after element 0"),
    ],
)
def test_malformed_raw_bytes(payload: bytes, message: str) -> None:
    bad = request("BYTES", [1])
    bad.raw_input_contents.append(payload)
    with pytest.raises(InvalidInput, match=message):
        decode(bad)


def test_element_count_must_match_shape() -> None:
    bad = request("BYTES", [2])
    bad.inputs[0].contents.bytes_contents.append(b"one")
    with pytest.raises(InvalidInput, match=r"BYTES shape \[2\] but 1 elements"):
        decode(bad)


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


@pytest.mark.parametrize("datatype", ["UINT8", "BYTES"])
def test_raw_and_typed_contents_together_are_refused(datatype: str) -> None:
    both = request(datatype, [1, 2, 2, 1] if datatype == "UINT8" else [1])
    both.raw_input_contents.append(bytes(4) if datatype == "UINT8" else v2_codec.pack_bytes([b""]))
    if datatype == "UINT8":
        both.inputs[0].contents.uint_contents.extend([1, 2, 3, 4])
    else:
        both.inputs[0].contents.bytes_contents.append(b"x")
    with pytest.raises(InvalidInput, match="both raw_input_contents and typed contents"):
        decode(both)


def test_typed_uint8_count_is_checked_before_conversion() -> None:
    bad = request("UINT8", [1, 2, 2, 1])
    bad.inputs[0].contents.uint_contents.extend([7] * 5)
    with pytest.raises(InvalidInput, match="needs 4 values, contents has 5"):
        decode(bad)


def test_echoed_client_text_is_cut_short() -> None:
    """A client's datatype, shape or names come back in the message at a bounded length: gRPC
    drops a status whose message exceeds its metadata limit (about 16 KiB)."""
    cases = [
        request("Q" * 200_000, [1]),
        request("UINT8", [1] * 6000),
        request("BYTES", [1] * 6000),
    ]
    for bad in cases:
        with pytest.raises(InvalidInput) as caught:
            decode(bad)
        assert len(str(caught.value)) < 300
    twice = request("UINT8", [1, 2, 2, 1])
    twice.outputs.add(name="n" * 50_000)
    twice.outputs.add(name="n" * 50_000)
    with pytest.raises(InvalidInput, match="is requested twice") as caught:
        v2_codec.requested_outputs(twice, SPEC)
    assert len(str(caught.value)) < 300
