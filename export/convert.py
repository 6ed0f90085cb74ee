"""Keras model -> TensorFlow SavedModel and ONNX, both taking uint8 NHWC `images` with a dynamic
batch dimension and answering `probabilities` and `bottleneck` by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import onnx
import tensorflow as tf
import tf2onnx

from export.errors import ExportError
from training.models import INPUT_NAME, OUTPUT_NAMES

OPSET = 17  # pinned: onnxruntime >= 1.14 runs it, and parity is measured at this opset
SERVING_SIGNATURE = "serving_default"


def input_spec(model: keras.Model) -> tf.TensorSpec:
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ExportError(f"model input must be (N, H, W, C) with fixed H, W, C; got {shape}")
    return tf.TensorSpec((None, *shape[1:]), tf.uint8, name=INPUT_NAME)


def check_model(model: keras.Model) -> None:
    if tuple(model.output_names) != OUTPUT_NAMES:
        raise ExportError(f"model outputs must be {list(OUTPUT_NAMES)}, got {model.output_names}")
    if model.inputs[0].dtype != "uint8":
        raise ExportError(f"model input must be uint8 pixels, got {model.inputs[0].dtype}")


def save_savedmodel(model: keras.Model, path: Path) -> None:
    """A SavedModel whose `serving_default` signature maps images -> named outputs."""
    spec = input_spec(model)

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return dict(zip(OUTPUT_NAMES, model(images, training=False), strict=True))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serve", fn=serve, input_signature=[spec])
    archive.write_out(str(path), verbose=False)


def to_onnx(model: keras.Model, metadata: dict[str, Any], version: int) -> onnx.ModelProto:
    """Convert with tf2onnx at the pinned opset, check the graph, embed the metadata."""
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=(input_spec(model),), opset=OPSET)
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or sorted(outputs) != sorted(OUTPUT_NAMES):
        raise ExportError(
            f"converted graph has inputs {inputs} and outputs {outputs}; expected "
            f"[{INPUT_NAME!r}] and {list(OUTPUT_NAMES)}"
        )
    proto.model_version = version
    proto.doc_string = f"cnn-serving model {metadata['name']} version {version}"
    set_metadata_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def set_metadata_props(proto: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Each top-level fact as a metadata_props entry whose value is JSON."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(value, sort_keys=True)


def read_metadata_props(proto: onnx.ModelProto) -> dict[str, Any]:
    return {entry.key: json.loads(entry.value) for entry in proto.metadata_props}
