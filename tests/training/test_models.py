"""Model builders: shapes, output names, the seed's parameter count, preprocessing in the graph."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from training import models
from training.errors import ConfigError
from training.layers import VGG16_BGR_MEAN

RNG = np.random.default_rng(0)


def _pixels(n: int, shape: tuple[int, int, int]) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_seed_network_is_exactly_the_seed() -> None:
    model = models.build_seed((28, 28, 1), 10)
    assert model.count_params() == 4320
    per_layer = {layer.name: layer.count_params() for layer in model.layers if layer.weights}
    assert per_layer == {
        "conv1": 40,
        "conv2": 520,
        "conv3": 3216,
        "bottleneck": 514,
        "probabilities": 30,
    }
    assert model.get_layer("flatten").output.shape[-1] == 256  # 28 -> 14 -> 7 -> 4, x16


@pytest.mark.parametrize("arch", models.SCRATCH_ARCHS)
def test_scratch_models_take_uint8_and_answer_both_named_outputs(arch: str) -> None:
    model = models.build_scratch(arch, (28, 28, 1), 10)
    assert model.inputs[0].dtype == "uint8" and model.inputs[0].name == "images"
    assert model.output_names == ["probabilities", "bottleneck"]
    out = models.predict(model, _pixels(5, (28, 28, 1)))
    assert out["probabilities"].shape == (5, 10) and out["bottleneck"].shape == (5, 2)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    # The classifier reads the 2-D bottleneck and nothing else.
    assert model.get_layer("probabilities").input is model.get_layer("bottleneck").output


def test_scaling_is_a_layer_of_the_model() -> None:
    model = models.build_seed((28, 28, 1), 10)
    pixels = _pixels(3, (28, 28, 1))
    after_scale = keras.Model(model.inputs, model.get_layer("scale").output)
    np.testing.assert_allclose(after_scale.predict(pixels, verbose=0), pixels / 255.0, atol=1e-6)


def test_unknown_arch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown --arch 'big'"):
        models.build_scratch("big", (28, 28, 1), 10)


def test_vgg16_preprocessing_is_inside_the_model() -> None:
    """gray -> RGB, resize to 32, RGB -> BGR minus the ImageNet mean, then the frozen base."""
    keras.utils.set_random_seed(1)
    base = models.vgg16_base(32, "none")
    features = models.vgg16_features((28, 28, 1), 32, base)
    assert not base.trainable and base.count_params() == 14_714_688
    gray = _pixels(2, (28, 28, 1))
    rgb = np.repeat(gray.astype(np.float32), 3, axis=-1)
    resized = keras.ops.convert_to_numpy(keras.ops.image.resize(rgb, (32, 32)))
    by_hand = resized[..., ::-1] - np.array(VGG16_BGR_MEAN, np.float32)
    expected = base.predict(by_hand, verbose=0).reshape(2, -1)
    np.testing.assert_allclose(features.predict(gray, verbose=0), expected, rtol=1e-4, atol=1e-3)


def test_vgg16_assembled_model_has_the_heads_outputs() -> None:
    base = models.vgg16_base(32, "none")
    features = models.vgg16_features((32, 32, 3), 32, base)
    head = models.vgg16_head(features.output.shape[-1], 4, hidden=16)
    full = models.assemble_vgg16(features, head)
    assert full.output_names == ["probabilities", "bottleneck"]
    pixels = _pixels(3, (32, 32, 3))
    expected = models.predict(head, features.predict(pixels, verbose=0))
    got = models.predict(full, pixels)
    for name in ("probabilities", "bottleneck"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_vgg16_rejects_small_images_and_missing_weights(tmp_path) -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        models.vgg16_base(28, "none")
    with pytest.raises(ConfigError, match="no such weights file"):
        models.vgg16_base(32, str(tmp_path / "vgg.h5"))
