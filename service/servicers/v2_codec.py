"""Open Inference Protocol (V2) messages <-> numpy, for ModelInfer and the model descriptions.

Inputs: one tensor named like the model's input, either `UINT8` [N, H, W, C] raw pixels or
`BYTES` [N] (or [N, 1]) encoded image files, in `raw_input_contents` or typed `contents`.
Outputs go in `raw_output_contents` (little-endian FP32), the only form tritonclient reads.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import repository
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service.errors import InvalidInput, ModelNotFound, shorten
from service.repository import OUTPUT_NAMES, ModelSpec

PLATFORM = "onnxruntime_onnx"
# Parameters a request (or one of its tensors) may carry. We read one (Triton's
# triton_enable_empty_final_response) and ignore the rest, as Triton does; a bound keeps a
# request's cost in what it can mean.
MAX_PARAMETERS = 64


def parse_version(name: str, text: str) -> int | None:
    """V2 versions are strings: "" means the newest, otherwise a positive integer."""
    if not text:
        return None
    version = repository.parse_version(text)
    if version is None:
        raise ModelNotFound(
            f"model {shorten(name)!r} has no version {shorten(text)!r} (versions are integers)"
        )
    return version


def image_tensor(
    request: pb.ModelInferRequest, spec: ModelSpec
) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    """The request's one input tensor and its raw contents, if any, checked for name, datatype
    and where its data is, before any data is looked at."""
    where = f"model {spec.name!r} version {spec.version}"
    check_parameters(request.parameters, where)
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"{where}: expected 1 input tensor {spec.input_name!r}, got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    check_parameters(tensor.parameters, f"{where}: input {shorten(tensor.name)!r}")
    if tensor.name != spec.input_name:
        raise InvalidInput(
            f"{where}: unknown input {shorten(tensor.name)!r}; the input is {spec.input_name!r}"
        )
    if tensor.datatype not in ("UINT8", "BYTES"):
        h, w, c = spec.image_shape
        raise InvalidInput(
            f"{where}: input datatype {shorten(tensor.datatype)!r} is not supported; send UINT8 "
            f"[N, {h}, {w}, {c}] pixels or BYTES [N] encoded images"
        )
    if not request.raw_input_contents:
        return tensor, None
    if len(request.raw_input_contents) != 1:
        raise InvalidInput(
            f"{where}: {len(request.raw_input_contents)} raw_input_contents for 1 input"
        )
    if tensor.contents.ListFields():
        raise InvalidInput(
            f"{where}: input {spec.input_name!r} has both raw_input_contents and typed "
            "contents; send one of them"
        )
    return tensor, request.raw_input_contents[0]


def check_parameters(parameters: Mapping[str, object], where: str) -> None:
    if len(parameters) > MAX_PARAMETERS:
        raise InvalidInput(
            f"{where}: {len(parameters):,} parameters; at most {MAX_PARAMETERS} are accepted"
        )


def decode_input(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, spec: ModelSpec
) -> np.ndarray | list[bytes]:
    """The image tensor (from `image_tensor`): (N, H, W, C) uint8, or N encoded files."""
    where = f"model {spec.name!r} version {spec.version}"
    shape = tuple(tensor.shape)
    if tensor.datatype == "UINT8":
        return _uint8_input(tensor, raw, shape, spec, where)
    return _bytes_input(tensor, raw, shape, where)


def _shape(shape: tuple[int, ...]) -> str:
    """A client's shape as it may appear in a message (gRPC trailers are small)."""
    return shorten(str(list(shape)), 60)


def _uint8_input(
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    shape: tuple[int, ...],
    spec: ModelSpec,
    where: str,
) -> np.ndarray:
    if len(shape) != 4 or shape[1:] != spec.image_shape or shape[0] < 1:
        h, w, c = spec.image_shape
        raise InvalidInput(
            f"{where}: UINT8 input shape must be [N, {h}, {w}, {c}], got {_shape(shape)}"
        )
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count:
            raise InvalidInput(
                f"{where}: UINT8 {_shape(shape)} needs {count:,} bytes, "
                f"raw_input_contents has {len(raw):,}"
            )
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    contents = tensor.contents.uint_contents
    if len(contents) != count:  # before converting: the count is free, a conversion is not
        raise InvalidInput(
            f"{where}: UINT8 {_shape(shape)} needs {count:,} values, contents has {len(contents):,}"
        )
    values = np.asarray(contents, dtype=np.uint32)
    if values.size and values.max() > 255:
        raise InvalidInput(f"{where}: UINT8 contents hold a value above 255")
    return values.astype(np.uint8).reshape(shape)


def _bytes_input(
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    shape: tuple[int, ...],
    where: str,
) -> list[bytes]:
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise InvalidInput(f"{where}: BYTES input shape must be [N] or [N, 1], got {_shape(shape)}")
    count = shape[0]
    if raw is not None:
        return unpack_bytes(raw, count, where)
    items = tensor.contents.bytes_contents
    if len(items) != count:
        raise InvalidInput(f"{where}: BYTES shape {_shape(shape)} but {len(items):,} elements sent")
    return list(items)


def unpack_bytes(raw: bytes, count: int, where: str) -> list[bytes]:
    """V2 raw BYTES: each element is a 4-byte little-endian length, then that many bytes.
    Reads at most `count` elements, so a buffer of a million empty ones costs nothing."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw) and len(items) < count:
        if offset + 4 > len(raw):
            raise InvalidInput(f"{where}: malformed raw BYTES tensor (truncated length prefix)")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInput(f"{where}: malformed raw BYTES tensor (element overruns buffer)")
        items.append(raw[offset : offset + size])
        offset += size
    if len(items) < count:
        raise InvalidInput(f"{where}: BYTES shape [{count}] but {len(items):,} elements sent")
    if offset < len(raw):
        raise InvalidInput(
            f"{where}: BYTES shape [{count}] but raw_input_contents holds "
            f"{len(raw) - offset:,} bytes after element {count - 1}"
        )
    return items


def pack_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


@dataclass(frozen=True)
class Requested:
    """An output a request asks for."""

    name: str
    # Triton's classification extension: the top `classes` scores of each image as BYTES
    # "score:index:label" strings, best first; 0: the whole FP32 tensor.
    classes: int = 0
    binary: bool = True  # HTTP only: raw bytes after the JSON (Triton's binary_data), or JSON


EVERY_OUTPUT = tuple(Requested(name) for name in OUTPUT_NAMES)
# Output parameters we read: the classification extension's, and the HTTP binary extension's
# (which a gRPC request may carry and which means nothing there).
OUTPUT_PARAMETERS = ("classification", "binary_data")


def requested_outputs(request: pb.ModelInferRequest, spec: ModelSpec) -> list[Requested]:
    if not request.outputs:  # the common case: every output
        return list(EVERY_OUTPUT)
    where = f"model {spec.name!r} version {spec.version}"
    if len(request.outputs) > len(OUTPUT_NAMES):  # before looking at any of them
        raise InvalidInput(
            f"{where}: {len(request.outputs):,} outputs requested; the model has "
            f"{len(OUTPUT_NAMES)} ({', '.join(OUTPUT_NAMES)})"
        )
    names = [output.name for output in request.outputs]
    if len(set(names)) != len(names):
        raise InvalidInput(f"{where}: output {shorten(names[0])!r} is requested twice")
    unknown = [name for name in names if name not in OUTPUT_NAMES]
    if unknown:
        raise InvalidInput(
            f"{where}: unknown output "
            f"{shorten(unknown[0])!r}; outputs are {', '.join(OUTPUT_NAMES)}"
        )
    return [_requested(output, spec, where) for output in request.outputs]


def _requested(
    output: pb.ModelInferRequest.InferRequestedOutputTensor, spec: ModelSpec, where: str
) -> Requested:
    parameters = output.parameters
    for key in parameters:
        if key not in OUTPUT_PARAMETERS:
            raise InvalidInput(
                f"{where}: output {output.name!r}: parameter {shorten(key)!r} is not supported "
                f"(supported: {', '.join(OUTPUT_PARAMETERS)})"
            )
    binary = True
    if "binary_data" in parameters:
        binary = _parameter(parameters["binary_data"], bool, f"{where}: output {output.name!r}")
    classes = 0
    if "classification" in parameters:
        what = f"{where}: output {output.name!r}"
        classes = _parameter(parameters["classification"], int, what)
        if output.name != "probabilities":
            raise InvalidInput(
                f"{what}: classification applies to 'probabilities' (the class scores)"
            )
        if classes < 1:
            raise InvalidInput(f"{what}: classification must be a positive count, got {classes}")
        classes = min(classes, len(spec.labels))  # Triton's answer too: every class, ranked
    return Requested(output.name, classes, binary)


def _parameter(value: pb.InferParameter, kind: type, where: str) -> Any:
    """A parameter of the expected kind (bool or int) from Triton's InferParameter."""
    choice = value.WhichOneof("parameter_choice")
    if kind is bool and choice == "bool_param":
        return value.bool_param
    if kind is int and choice in ("int64_param", "uint64_param"):
        return int(getattr(value, choice))
    article = "an" if kind is int else "a"
    raise InvalidInput(
        f"{where}: expected {article} {kind.__name__} parameter, got {choice or 'none'}"
    )


def classification(scores: np.ndarray, labels: tuple[str, ...], classes: int) -> list[bytes]:
    """(N, K) scores -> N * `classes` BYTES elements "score:index:label", each image's best
    first (ties: the lower index), row by row: Triton's classification extension."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :classes]
    return [
        f"{scores[row, index]:f}:{index}:{labels[index]}".encode()
        for row in range(len(scores))
        for index in order[row].tolist()
    ]


def encode_response(
    request: pb.ModelInferRequest,
    spec: ModelSpec,
    requested: list[Requested],
    outputs: dict[str, np.ndarray],
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=spec.name, model_version=str(spec.version), id=request.id
    )
    for output in requested:
        if output.classes:
            scores = outputs[output.name]
            response.outputs.add(
                name=output.name, datatype="BYTES", shape=(len(scores), output.classes)
            )
            response.raw_output_contents.append(
                pack_bytes(classification(scores, spec.labels, output.classes))
            )
            continue
        value = np.ascontiguousarray(outputs[output.name], dtype="<f4")
        response.outputs.add(name=output.name, datatype="FP32", shape=value.shape)
        response.raw_output_contents.append(value.tobytes())
    return response


def model_metadata(spec: ModelSpec, versions: list[int]) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=spec.name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=[tensor(name=spec.input_name, datatype="UINT8", shape=[-1, *spec.image_shape])],
        outputs=[
            tensor(name="probabilities", datatype="FP32", shape=[-1, len(spec.labels)]),
            tensor(name="bottleneck", datatype="FP32", shape=[-1, 2]),
        ],
    )


def model_config(
    spec: ModelSpec, max_batch_size: int, max_queue_delay_ms: float, on_cuda: bool
) -> pb.ModelConfigResponse:
    kind = pb.ModelInstanceGroup.KIND_GPU if on_cuda else pb.ModelInstanceGroup.KIND_CPU
    config = pb.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=max_batch_size,
        input=[
            pb.ModelInput(
                name=spec.input_name,
                data_type=pb.TYPE_UINT8,
                format=pb.ModelInput.FORMAT_NHWC,
                dims=list(spec.image_shape),
            )
        ],
        output=[
            pb.ModelOutput(name="probabilities", data_type=pb.TYPE_FP32, dims=[len(spec.labels)]),
            pb.ModelOutput(name="bottleneck", data_type=pb.TYPE_FP32, dims=[2]),
        ],
        instance_group=[pb.ModelInstanceGroup(name=spec.name, count=1, kind=kind)],
        default_model_filename="model.onnx",
        dynamic_batching=pb.ModelDynamicBatching(
            preferred_batch_size=[max_batch_size],
            max_queue_delay_microseconds=int(max_queue_delay_ms * 1000),
        ),
    )
    return pb.ModelConfigResponse(config=config)
