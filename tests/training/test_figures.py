"""What the network learnt: the feature maps of a scratch model's convolutional layers and the
test images every family misreads with the most confidence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from training.figures import mosaic
from training.reports import most_wrong, one_per_class


def test_most_wrong_picks_the_confident_mistakes_first() -> None:
    y_true = np.array([0, 1, 2, 0, 1, 2])
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],  # right
            [0.7, 0.2, 0.1],  # wrong, 0.7
            [0.1, 0.1, 0.8],  # right
            [0.05, 0.9, 0.05],  # wrong, 0.9
            [0.4, 0.3, 0.3],  # wrong, 0.4
            [0.7, 0.25, 0.05],  # wrong, 0.7: a tie keeps sample order
        ]
    )
    assert most_wrong(y_true, probabilities, limit=16).tolist() == [3, 1, 5, 4]
    assert most_wrong(y_true, probabilities, limit=2).tolist() == [3, 1]
    assert most_wrong(y_true[[0, 2]], probabilities[[0, 2]]).tolist() == []  # none wrong


def test_one_image_per_class_in_class_order() -> None:
    y = np.array([2, 0, 2, 1, 0])
    assert one_per_class(y, 4, limit=10) == [(0, 1), (1, 3), (2, 0)]  # class 3 has none
    assert one_per_class(y, 4, limit=2) == [(0, 1), (1, 3)]


def test_a_mosaic_lays_maps_out_in_tiles_scaled_to_their_range() -> None:
    maps = np.random.default_rng(0).normal(size=(5, 6, 8)) * 40  # (H, W, C)
    maps[..., 3] = 7.0  # a flat map
    sheet = mosaic(maps, 8)
    assert sheet.shape == (2 * 6 - 1, 4 * 7 - 1)  # 4 columns, 2 rows, 1-pixel gaps
    assert np.isnan(sheet[5]).all() and np.isnan(sheet[:, 6]).all()
    tiles = [sheet[r * 6 : r * 6 + 5, c * 7 : c * 7 + 6] for r in range(2) for c in range(4)]
    for index, tile in enumerate(tiles):
        expected = (0.0, 0.0) if index == 3 else (0.0, 1.0)
        assert (tile.min(), tile.max()) == expected, index
    assert mosaic(maps, 1).shape == (5, 6)


def _png(path: Path) -> tuple[int, int, float]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        gray = np.asarray(image.convert("L"), dtype=np.float64)
        return image.width, image.height, float(gray.std())


def test_a_scratch_run_draws_activations_and_its_worst_mistakes(seed_run: Path) -> None:
    width, height, spread = _png(seed_run / "figures" / "activations.png")
    # ten rows (one test image per class) of the image and its three conv layers' maps
    assert 900 <= width <= 1600 and 1600 <= height <= 2600 and spread > 20
    width, height, spread = _png(seed_run / "figures" / "most_wrong.png")
    assert 1000 <= width <= 1600 and 1000 <= height <= 1800 and spread > 20  # 4 x 4 images
    metrics = json.loads((seed_run / "metrics.json").read_text())
    worst = metrics["most_wrong"]
    assert len(worst) == 16
    assert all(row["true"] != row["predicted"] for row in worst)
    confidences = [row["confidence"] for row in worst]
    assert confidences == sorted(confidences, reverse=True)


def test_every_family_draws_its_mistakes_and_vgg16_no_activations(vgg16_run: Path) -> None:
    figures = {p.name for p in (vgg16_run / "figures").iterdir()}
    assert "most_wrong.png" in figures
    assert "activations.png" not in figures and "filters.png" not in figures
    width, height, spread = _png(vgg16_run / "figures" / "most_wrong.png")
    assert width >= 300 and height >= 300 and spread > 5
