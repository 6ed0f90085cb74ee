"""The common V2 REST inference answered without protobuf: one UINT8 input tensor (binary, or
JSON `data`), every output or some of them by name with `binary_data`, no classification.

Measured with py-spy under 64 clients of single-image binary requests, building the V2
protobuf request from the JSON, reading it back, building the protobuf answer and reading that
back into JSON took 40 us of the event loop per request, more than the model's own work per
image. This path reads the JSON once and writes the answer once.

It answers exactly what the general path (v2_json -> service.servicers.inference) answers, to
the byte (tests/service/test_rest_direct.py holds them side by side). A request it does not
recognise as well-formed and common, mistakes included, goes to the general path, which answers
it or says what is wrong. It refuses one thing itself, with the general path's own message:
JSON pixels that are not integers of 0-255, found only by parsing the whole array, which is
not parsed twice (a million values hold the event loop for about 60 ms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.repository import OUTPUT_NAMES, ModelSpec
from service.rest.v2_json import BINARY, HEADER_LENGTH, pixels
from service.servicers.v2_codec import MAX_PARAMETERS

INT64 = (-(2**63), 2**63)
# The JSON parts of all-binary answers, by model version and output shapes (a batch size each).
_HEADS: dict[tuple[str, int, tuple[tuple[str, tuple[int, ...]], ...]], bytes] = {}
MAX_HEADS = 4096


@dataclass(frozen=True)
class Common:
    """A common inference request: its images and what to answer."""

    images: np.ndarray  # (N, H, W, C) uint8
    outputs: tuple[tuple[str, bool], ...]  # (output name, binary), in the answer's order
    id: str


def common_request(document: dict[str, Any], binary: memoryview, spec: ModelSpec) -> Common | None:
    """The request, when it is common and well-formed; None sends it to the general path.
    Raises InvalidInput for JSON pixels out of range (the general path's message)."""
    id_ = document.get("id", "")
    parameters = document.get("parameters", {})
    inputs = document.get("inputs")
    if type(id_) is not str or not _scalars(parameters) or type(inputs) is not list:
        return None
    if len(inputs) != 1 or type(tensor := inputs[0]) is not dict:
        return None
    shape = tensor.get("shape")
    if tensor.get("name") != spec.input_name or tensor.get("datatype") != "UINT8":
        return None
    if type(shape) is not list or len(shape) != 4 or not all(type(n) is int for n in shape):
        return None
    if shape[0] < 1 or tuple(shape[1:]) != spec.image_shape:
        return None
    tensor_parameters = tensor.get("parameters", {})
    if not _scalars(tensor_parameters):
        return None
    binary_default = parameters.get("binary_data_output") is True
    outputs = _outputs(document.get("outputs", []), binary_default)
    if outputs is None:
        return None
    count = math.prod(shape)
    size = tensor_parameters.get("binary_data_size")
    if size is not None:  # binary: the whole binary part is this tensor
        if type(size) is not int or size != count or len(binary) != size or "data" in tensor:
            return None
        raw: bytes | memoryview = binary
    else:
        if "data" not in tensor or len(binary):
            return None
        # every check the general path makes before it parses the pixels has passed: its
        # error would be this one (InvalidInput)
        raw = pixels(tensor["data"], f"model {spec.name!r} version {spec.version}")
        if len(raw) != count:
            return None
    images = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    return Common(images, outputs, id_)


def response(
    request: Common, spec: ModelSpec, outputs: dict[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """The REST body of the answer (JSON, then the binary outputs) and its headers."""
    values = [
        (name, binary, np.ascontiguousarray(outputs[name], dtype="<f4"))
        for name, binary in request.outputs
    ]
    if request.id or not all(binary for _, binary, _ in values):
        head = _head(spec, request.id, values)
    else:  # the JSON of an all-binary answer depends on the shapes alone: made once
        key = (spec.name, spec.version, tuple((name, value.shape) for name, _, value in values))
        head = _HEADS.get(key) or _HEADS.setdefault(key, _head(spec, "", values))
        if len(_HEADS) > MAX_HEADS:
            _HEADS.clear()
    chunks = [value.tobytes() for _, binary, value in values if binary]
    if not chunks:
        return head, {"content-type": "application/json"}
    return b"".join([head, *chunks]), {"content-type": BINARY, HEADER_LENGTH: str(len(head))}


def _head(spec: ModelSpec, id_: str, values: list[tuple[str, bool, np.ndarray]]) -> bytes:
    described = []
    for name, binary, value in values:
        output: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(value.shape)}
        if binary:
            output["parameters"] = {"binary_data_size": value.nbytes}
        else:
            output["data"] = value.ravel().tolist()
        described.append(output)
    document: dict[str, Any] = {
        "model_name": spec.name,
        "model_version": str(spec.version),
        "outputs": described,
    }
    if id_:
        document["id"] = id_
    return orjson.dumps(document)


def _outputs(requested: object, binary_default: bool) -> tuple[tuple[str, bool], ...] | None:
    """Every output, or the ones named (each at most once, no parameter but binary_data)."""
    if type(requested) is not list or len(requested) > len(OUTPUT_NAMES):
        return None
    if not requested:
        return tuple((name, binary_default) for name in OUTPUT_NAMES)
    outputs: list[tuple[str, bool]] = []
    for output in requested:
        if type(output) is not dict:
            return None
        name = output.get("name")
        parameters = output.get("parameters", {})
        if name not in OUTPUT_NAMES or any(name == seen for seen, _ in outputs):
            return None
        if type(parameters) is not dict or not parameters.keys() <= {"binary_data"}:
            return None
        binary = parameters.get("binary_data", binary_default)
        if type(binary) is not bool:
            return None
        outputs.append((name, binary))
    return tuple(outputs)


def _scalars(parameters: object) -> bool:
    """Parameters the general path takes: a JSON object of at most MAX_PARAMETERS booleans,
    64-bit integers, numbers and strings."""
    if type(parameters) is not dict or len(parameters) > MAX_PARAMETERS:
        return False
    for value in parameters.values():
        kind = type(value)
        if kind is int:
            if not INT64[0] <= value < INT64[1]:
                return False
        elif kind is not bool and kind is not float and kind is not str:
            return False
    return True
