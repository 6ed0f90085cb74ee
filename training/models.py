"""Model builders. Every model takes raw uint8 NHWC pixels and has two named outputs:
`probabilities` (softmax, [N, K]) and `bottleneck` ([N, 2], the dense layer feeding the
classifier). Scaling, gray->RGB, resizing and VGG16's preprocessing are layers of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
from keras import layers

from training.errors import ConfigError
from training.layers import VGG16Preprocess

INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "bottleneck")
SCRATCH_ARCHS = ("seed", "default")


def _image_input(input_shape: tuple[int, int, int]) -> keras.KerasTensor:
    return keras.Input(shape=input_shape, dtype="uint8", name=INPUT_NAME)


def _head_outputs(features: Any, num_classes: int) -> list[Any]:
    """[probabilities, bottleneck]: a list, so the outputs keep this order everywhere."""
    bottleneck = layers.Dense(2, name="bottleneck")(features)
    probabilities = layers.Dense(num_classes, activation="softmax", name="probabilities")(
        bottleneck
    )
    return [probabilities, bottleneck]


def build_seed(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The seed notebook's network: three conv/LeakyReLU/pool blocks, Dense(2), softmax.

    4,320 parameters for 28x28x1 input and ten classes.
    """
    inputs = _image_input(input_shape)
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    for index, (filters, kernel, slope) in enumerate(((4, 3, 0.3), (8, 4, 0.3), (16, 5, 0.8))):
        x = layers.Conv2D(filters, kernel, padding="same", name=f"conv{index + 1}")(x)
        x = layers.LeakyReLU(negative_slope=slope, name=f"leaky{index + 1}")(x)
        x = layers.MaxPooling2D(2, padding="same", name=f"pool{index + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, _head_outputs(x, num_classes), name="scratch_seed")


def build_default(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """A stronger network that keeps the 2-D bottleneck right before the classifier.

    32-64-128 conv blocks with batch norm, a 256-unit dense layer with dropout, Dense(2), softmax.
    Regularisation is light on purpose: with 2 CPU cores and ~15 epochs the net underfits
    before it overfits (measured: dropout after every block cost a point of test accuracy).
    """
    inputs = _image_input(input_shape)
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    for index, filters in enumerate((32, 64, 128)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{index + 1}")(x)
        x = layers.BatchNormalization(name=f"bn{index + 1}")(x)
        x = layers.ReLU(name=f"relu{index + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{index + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, use_bias=False, name="dense")(x)
    x = layers.BatchNormalization(name="bn_dense")(x)
    x = layers.ReLU(name="relu_dense")(x)
    x = layers.Dropout(0.2, name="drop_dense")(x)
    return keras.Model(inputs, _head_outputs(x, num_classes), name="scratch_default")


def build_scratch(arch: str, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    if arch == "seed":
        return build_seed(input_shape, num_classes)
    if arch == "default":
        return build_default(input_shape, num_classes)
    raise ConfigError(f"unknown --arch {arch!r}; choose one of {', '.join(SCRATCH_ARCHS)}")


def classifier_view(model: keras.Model) -> keras.Model:
    """The same layers with only the `probabilities` output: what `fit` trains. Taken from the
    model's own outputs: an assembled VGG16 calls the head's layers a second time."""
    outputs = dict(zip(model.output_names, model.outputs, strict=True))
    return keras.Model(model.inputs, outputs["probabilities"])


def vgg16_base(image_size: int, base_weights: str) -> keras.Model:
    """VGG16's convolutional base at `image_size`, frozen.

    `base_weights`: "imagenet" (Keras downloads them), "none" (random, frozen) or a local path.
    """
    if image_size < 32:
        raise ConfigError(f"--image-size must be at least 32 for VGG16, got {image_size}")
    weights: str | None
    if base_weights == "none":
        weights = None
    elif base_weights == "imagenet":
        weights = "imagenet"
    else:
        if not Path(base_weights).is_file():
            raise ConfigError(f"{base_weights}: no such weights file (--base-weights)")
        weights = base_weights
    try:
        base = keras.applications.VGG16(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
        )
    except Exception as exc:  # noqa: BLE001 - a download or file error, reported as one line
        raise ConfigError(f"cannot load VGG16 weights {base_weights!r}: {exc}") from exc
    base.trainable = False
    return base


def unfreeze_last_blocks(base: keras.Model, blocks: int) -> list[str]:
    """Make the last `blocks` of VGG16's convolutional blocks trainable (block5 first), the
    others frozen; the names of the layers that now learn. VGG16 has no batch norm, so no
    layer needs to stay in inference mode."""
    names = {f"block{index}" for index in range(6 - blocks, 6)}
    base.trainable = True
    unfrozen = []
    for layer in base.layers:
        layer.trainable = layer.name.split("_")[0] in names
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen


def vgg16_features(
    input_shape: tuple[int, int, int], image_size: int, base: keras.Model
) -> keras.Model:
    """uint8 pixels -> float, gray->RGB, resize, VGG16 preprocessing, frozen base, flatten."""
    inputs = _image_input(input_shape)
    x = layers.Rescaling(1.0, name="to_float")(inputs)
    if input_shape[2] == 1:
        x = layers.Concatenate(axis=-1, name="gray_to_rgb")([x, x, x])
    elif input_shape[2] != 3:
        raise ConfigError(f"VGG16 needs 1 or 3 input channels, got {input_shape[2]}")
    if input_shape[:2] != (image_size, image_size):
        x = layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(x)
    x = VGG16Preprocess(name="vgg16_preprocess")(x)
    x = base(x, training=False)
    x = layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, x, name="vgg16_features")


def vgg16_head(feature_dim: int, num_classes: int, hidden: int = 256) -> keras.Model:
    """The head trained on cached VGG16 features: Dense(hidden) -> Dense(2) -> softmax."""
    inputs = keras.Input(shape=(feature_dim,), name="features")
    x = layers.Dense(hidden, activation="relu", name="head_dense")(inputs)
    x = layers.Dropout(0.5, name="head_dropout")(x)
    return keras.Model(inputs, _head_outputs(x, num_classes), name="vgg16_head")


def assemble_vgg16(features: keras.Model, head: keras.Model) -> keras.Model:
    """The full uint8-in model: the feature extractor followed by the trained head's layers."""
    x = features.output
    for layer in head.layers[1:]:
        if layer.name == "probabilities":
            continue
        x = layer(x)
        if layer.name == "bottleneck":
            bottleneck = x
    probabilities = head.get_layer("probabilities")(bottleneck)
    return keras.Model(features.inputs, [probabilities, bottleneck], name="vgg16")


def predict(model: keras.Model, images: Any, batch_size: int = 256) -> dict[str, Any]:
    """Run a two-output model: {"probabilities": (N, K), "bottleneck": (N, 2)} as numpy."""
    outputs = model.predict(images, batch_size=batch_size, verbose=0)
    return dict(zip(model.output_names, outputs, strict=True))


def conv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The convolutional layers (what `transfer` freezes), in order."""
    return [layer for layer in model.layers if isinstance(layer, layers.Conv2D)]


def feature_maps(model: keras.Model, images: Any) -> list[tuple[str, Any]]:
    """(layer name, (N, H, W, C) float32 outputs) of every convolutional layer, in order."""
    conv = conv_layers(model)
    if not conv:
        return []
    probe = keras.Model(model.inputs, [layer.output for layer in conv])
    outputs = probe.predict(images, batch_size=256, verbose=0)
    if len(conv) == 1:
        outputs = [outputs]
    return [(layer.name, out) for layer, out in zip(conv, outputs, strict=True)]
