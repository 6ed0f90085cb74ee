"""The Open Inference Protocol's REST body (KServe V2) with Triton's binary tensor extension,
to and from the V2 protobuf messages that the gRPC service handles, so one code path checks
and answers both transports (service.servicers.inference.infer).

A body is JSON, or (binary extension) JSON of `Inference-Header-Content-Length` bytes followed
by the tensors' bytes, in input order, each input saying its size in `binary_data_size`.
- Inputs: UINT8 [N, H, W, C] pixels as a JSON array (flat or nested) or binary; BYTES [N] encoded
  image files, binary (4-byte little-endian length before each file) or in JSON as base64
  strings (a JSON string cannot hold arbitrary bytes).
- Outputs: FP32 (or BYTES for the classification extension) as JSON `data`, or binary when the
  output asks for `binary_data` (or the request for `binary_data_output`).
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from typing import Any

import numpy as np
import orjson

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service.errors import InvalidInput, shorten
from service.repository import ModelSpec
from service.rest.calls import byte_count
from service.rest.status import PayloadTooLarge, UnsupportedMediaType
from service.servicers import v2_codec

HEADER_LENGTH = "inference-header-content-length"
BINARY = "application/octet-stream"
# JSON values a request may spend beyond its pixels (names, shape, parameters, outputs).
SPARE_VALUES = 4096
MAX_JSON_VALUES = 1 << 20
ENCODINGS = ("gzip", "deflate")  # what tritonclient's request_compression_algorithm sends


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON part, binary part) of a request body."""
    if header_length is None:
        return body, memoryview(b"")
    length = byte_count(header_length)
    if length is None or length > len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {shorten(header_length, 40)!r} is not a length "
            f"within the {len(body):,}-byte body"
        )
    return body[:length], memoryview(body)[length:]


def parse_json(text: bytes, max_values: int, what: str) -> dict[str, Any]:
    """A JSON object, refused before parsing when it holds more than `max_values` values (a
    cheap count of separators: a 10-million-element array is not built to be refused)."""
    if text.count(b",") > max_values:
        raise InvalidInput(
            f"{what}: the JSON holds more than {max_values:,} values, more than any request "
            "within --max-queue-size can use; split it or send binary tensors"
        )
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:  # also what nests too deep (orjson stops at 1024)
        raise InvalidInput(f"{what}: the body is not valid JSON ({shorten(str(exc))})") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"{what}: the body must be a JSON object")
    return document


def max_values(spec: ModelSpec, max_images: int) -> int:
    """The most JSON values a request may hold: what --max-queue-size images need, at most
    MAX_JSON_VALUES (parsing holds the event loop, about 60 ms per million values: larger
    tensors go binary)."""
    return min(max_images * math.prod(spec.image_shape), MAX_JSON_VALUES) + SPARE_VALUES


def infer_request(
    document: dict[str, Any], binary: memoryview, name: str, version: str, spec: ModelSpec
) -> tuple[pb.ModelInferRequest, bool]:
    """The V2 message for a REST inference body, and whether outputs default to binary."""
    where = f"model {spec.name!r} version {spec.version}"
    request = pb.ModelInferRequest(model_name=name, model_version=version)
    if "id" in document:
        request.id = _text(document["id"], f"{where}: id")
    parameters = _object(document.get("parameters", {}), f"{where}: parameters")
    _parameters(request.parameters, parameters, where)
    inputs = _array(document.get("inputs"), f"{where}: inputs")
    if len(inputs) != 1:
        raise InvalidInput(
            f"{where}: expected 1 input tensor {spec.input_name!r}, got {len(inputs)}"
        )
    offset = _input(request, _object(inputs[0], f"{where}: input"), binary, spec, where)
    if offset != len(binary):
        raise InvalidInput(
            f"{where}: {len(binary) - offset:,} bytes of binary data after the last input's "
            "binary_data_size"
        )
    outputs = _array(document.get("outputs", []), f"{where}: outputs")
    if len(outputs) > len(v2_codec.OUTPUT_NAMES):  # before looking at any of them
        raise InvalidInput(
            f"{where}: {len(outputs):,} outputs requested; the model has "
            f"{len(v2_codec.OUTPUT_NAMES)} ({', '.join(v2_codec.OUTPUT_NAMES)})"
        )
    for output in outputs:
        output = _object(output, f"{where}: output")
        tensor = request.outputs.add(name=_text(output.get("name"), f"{where}: output name"))
        _parameters(tensor.parameters, output.get("parameters", {}), f"{where}: output")
    binary_default = parameters.get("binary_data_output") is True
    return request, binary_default


def _input(
    request: pb.ModelInferRequest,
    document: dict[str, Any],
    binary: memoryview,
    spec: ModelSpec,
    where: str,
) -> int:
    """Fill the request's one input; returns the end of its bytes in `binary`."""
    tensor = request.inputs.add(
        name=_text(document.get("name"), f"{where}: input name"),
        datatype=_text(document.get("datatype"), f"{where}: input datatype"),
    )
    shape = _array(document.get("shape"), f"{where}: input shape")
    if len(shape) > 8 or not all(type(n) is int and 0 <= n < 2**62 for n in shape):
        raise InvalidInput(f"{where}: input shape must be a short list of non-negative integers")
    tensor.shape.extend(shape)
    parameters = _object(document.get("parameters", {}), f"{where}: input parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(binary):
            raise InvalidInput(
                f"{where}: binary_data_size {shorten(str(size), 40)} is not within the "
                f"{len(binary):,} bytes after the JSON"
            )
        if "data" in document:
            raise InvalidInput(f"{where}: input has both binary_data_size and JSON data")
        request.raw_input_contents.append(bytes(binary[:size]))
        return size
    if "data" not in document:
        raise InvalidInput(f"{where}: input has neither JSON data nor binary_data_size")
    data = document["data"]
    if tensor.datatype == "BYTES":
        tensor.contents.bytes_contents.extend(_files(data, where))
    elif tensor.datatype == "UINT8":
        request.raw_input_contents.append(pixels(data, where))
    # other datatypes: refused with the gRPC service's message (v2_codec.image_tensor)
    return 0


def pixels(data: object, where: str) -> bytes:
    """JSON UINT8 data (a flat or nested array of 0-255) as bytes, in row-major order."""
    try:
        values = np.asarray(data)
    except ValueError:
        raise InvalidInput(f"{where}: UINT8 data is not a regular array of integers") from None
    if values.dtype.kind not in "iu":
        raise InvalidInput(f"{where}: UINT8 data must be integers from 0 to 255")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidInput(f"{where}: UINT8 data holds a value outside 0-255")
    return values.astype(np.uint8).tobytes()


def _files(data: object, where: str) -> list[bytes]:
    items = _array(data, f"{where}: BYTES data")
    files = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidInput(f"{where}: BYTES element {i} must be a base64 string")
        try:
            files.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{where}: BYTES element {i} is not valid base64") from None
    return files


def _parameters(target: Any, values: object, where: str) -> None:
    values = _object(values, f"{where} parameters")
    v2_codec.check_parameters(values, where)
    for key, value in values.items():
        parameter = target[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        else:
            raise InvalidInput(
                f"{where}: parameter {shorten(key)!r} must be a boolean, number or string"
            )


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _array(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be a JSON array")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    return value


def infer_response(
    response: pb.ModelInferResponse, requested: pb.ModelInferRequest, binary_default: bool
) -> tuple[bytes, dict[str, str]]:
    """The REST body for a V2 answer (JSON, then the binary outputs), and its headers."""
    binary_by_name = {
        output.name: output.parameters["binary_data"].bool_param
        for output in requested.outputs
        if "binary_data" in output.parameters
    }
    outputs = []
    chunks = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        output: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if binary_by_name.get(tensor.name, binary_default):
            output["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif tensor.datatype == "BYTES":
            count = math.prod(tensor.shape)
            output["data"] = [item.decode() for item in v2_codec.unpack_bytes(raw, count, "")]
        else:
            output["data"] = np.frombuffer(raw, dtype="<f4").tolist()
        outputs.append(output)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        document["id"] = response.id
    head = orjson.dumps(document)
    if not chunks:
        return head, {"content-type": "application/json"}
    headers = {"content-type": BINARY, HEADER_LENGTH: str(len(head))}
    return b"".join([head, *chunks]), headers


def check_content(content_type: str | None, encoding: str | None) -> None:
    """The inference body is JSON, or JSON followed by binary tensors, whatever Content-Type
    says (as Triton reads it: `curl -d @body.json` sends a form type); an image or a form is
    a mistake worth naming. Compressed with gzip or deflate, or not."""
    if encoding and encoding.lower() not in ("identity", *ENCODINGS):
        raise UnsupportedMediaType(
            f"Content-Encoding {shorten(encoding, 40)!r} is not supported; send the body "
            f"uncompressed or as {' or '.join(ENCODINGS)}"
        )
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind.startswith(("image/", "multipart/")):
        raise UnsupportedMediaType(
            f"Content-Type {shorten(kind, 60)!r}: an inference body is V2 JSON (binary tensors "
            "after it with Inference-Header-Content-Length); images go to /v1/models/"
            "{model}:classify"
        )


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before gzip or deflate, refused (413) once it passes `limit` bytes (a
    small body can inflate a thousandfold)."""
    kind = (encoding or "identity").lower()
    if kind == "identity":
        return body
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if kind == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the {kind} body cannot be decompressed ({exc})") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(
            f"the {kind} body inflates past the limit of {limit:,} bytes (--max-message-bytes)"
        )
    if not inflater.eof:
        raise InvalidInput(f"the {kind} body is truncated")
    return data
