"""Preprocessing layers that live inside the exported models.

They are registered with Keras so that `model.keras` files load without extra arguments, as
long as this module has been imported (`training.models` imports it).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

# ImageNet channel means, in BGR order, that VGG16's "caffe" preprocessing subtracts.
VGG16_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="cnn_serving")
class VGG16Preprocess(keras.layers.Layer):
    """RGB in [0, 255] -> BGR minus the ImageNet mean: what VGG16's weights were trained on."""

    def call(self, inputs: Any) -> Any:
        bgr = ops.flip(ops.cast(inputs, self.compute_dtype), axis=-1)
        return bgr - ops.convert_to_tensor(VGG16_BGR_MEAN, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape
