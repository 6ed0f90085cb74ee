"""Export: the repository layout, the ONNX contract, metadata, parity, never overwriting."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.convert import OPSET, read_metadata_props
from export.core import export_run
from export.errors import ExportError, ParityError


@pytest.fixture(scope="module")
def exported(seed_run: Path, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    export_run(seed_run, repo, "fashion")
    return repo


def test_layout_and_metadata(exported: Path, seed_run: Path) -> None:
    version = exported / "fashion" / "1"
    assert sorted(p.name for p in version.iterdir()) == [
        "bottleneck_map.json",
        "metadata.json",
        "model.onnx",
        "saved_model",
    ]
    assert (version / "saved_model" / "saved_model.pb").is_file()
    meta = json.loads((version / "metadata.json").read_text())
    run_config = json.loads((seed_run / "config.json").read_text())
    assert meta["name"] == "fashion" and meta["version"] == 1 and meta["family"] == "scratch"
    assert meta["labels"] == run_config["dataset"]["labels"]
    assert meta["input"] == {
        "name": "images",
        "dtype": "uint8",
        "layout": "NHWC",
        "height": 28,
        "width": 28,
        "channels": 1,
    }
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "bottleneck"]
    metrics = json.loads((seed_run / "metrics.json").read_text())
    assert meta["training"]["test_accuracy"] == metrics["test_accuracy"]
    assert meta["training"]["dataset"] == "fashion-mnist" and meta["training"]["epochs"] == 1
    assert meta["training"]["base_weights_real"] is True
    assert {"keras", "tf2onnx", "onnx", "numpy"} <= set(meta["packages"])
    digest = hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest()
    assert meta["onnx"] == {"file": "model.onnx", "opset": OPSET, "sha256": digest}


def test_the_bottleneck_map_is_the_test_set_through_the_onnx_file(exported: Path, seed_run: Path):
    from training.config import TrainConfig
    from training.run import load_dataset

    version = exported / "fashion" / "1"
    meta = json.loads((version / "metadata.json").read_text())
    data = (version / "bottleneck_map.json").read_bytes()
    entry = meta["bottleneck_map"]
    assert entry["file"] == "bottleneck_map.json"
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    document = json.loads(data)
    assert document["format"] == "cnn-serving/bottleneck-map/1"
    assert document["labels"] == meta["labels"]
    test = load_dataset(TrainConfig.load(seed_run / "config.json"))
    assert document["source"] == {"dataset": "fashion-mnist", "split": "test",
                                  "size": len(test.x_test)}  # fmt: skip
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    points = session.run(["bottleneck"], {"images": test.x_test})[0]
    # the sample holds every point of a test set this small, in order
    np.testing.assert_allclose(document["points"]["x"], points[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(document["points"]["y"], points[:, 1], rtol=1e-5, atol=1e-5)
    assert document["points"]["label"] == test.y_test.tolist()
    for centroid in document["centroids"]:
        mine = points[test.y_test == centroid["label_index"]]
        assert centroid["count"] == len(mine)
        assert (centroid["x"], centroid["y"]) == pytest.approx(mine.mean(axis=0), abs=1e-4)
    assert document["extent"]["x_min"] == pytest.approx(points[:, 0].min(), abs=1e-5)
    assert document["extent"]["y_max"] == pytest.approx(points[:, 1].max(), abs=1e-5)


def test_the_map_samples_each_class_in_proportion() -> None:
    from export.bottleneck_map import sample

    classes = np.repeat(np.arange(10), [3000, 2000] + [625] * 8)  # 10,000 points
    chosen = sample(classes, limit=5000, seed=0)
    counts = np.bincount(classes[chosen], minlength=10)
    assert counts.tolist() == [1500, 1000] + [312] * 8  # floor of each share
    assert len(set(chosen.tolist())) == len(chosen) and np.all(np.diff(chosen) > 0)
    rare = np.array([0] * 9999 + [1])
    assert np.bincount(rare[sample(rare, limit=100)]).tolist() == [99, 1]  # never dropped
    assert sample(classes, limit=5000, seed=0).tolist() == chosen.tolist()  # reproducible


def test_a_run_whose_data_is_gone_exports_without_a_map(seed_run: Path, tmp_path: Path, caplog):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(seed_run, run)
    config = json.loads((run / "config.json").read_text())
    config["config"]["data_dir"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(config))
    meta = export_run(run, tmp_path / "repo", "fashion")
    assert meta["bottleneck_map"]["file"] is None
    assert "test set cannot be read again" in meta["bottleneck_map"]["reason"]
    assert not (tmp_path / "repo" / "fashion" / "1" / "bottleneck_map.json").exists()
    assert any("no bottleneck map" in r.getMessage() for r in caplog.records)


def test_onnx_contract(exported: Path) -> None:
    path = exported / "fashion" / "1" / "model.onnx"
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    (image_input,) = model.graph.input
    assert image_input.name == "images"
    tensor = image_input.type.tensor_type
    assert tensor.elem_type == onnx.TensorProto.UINT8
    dims = tensor.shape.dim
    assert not dims[0].HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [28, 28, 1]
    assert sorted(o.name for o in model.graph.output) == ["bottleneck", "probabilities"]
    props = read_metadata_props(model)
    meta = json.loads((path.parent / "metadata.json").read_text())
    for key in ("name", "version", "family", "labels", "input", "outputs", "training", "packages"):
        assert props[key] == meta[key], key
    assert model.model_version == 1


def test_onnx_answers_like_keras_for_any_batch(exported: Path, seed_run: Path) -> None:
    import keras

    model = keras.saving.load_model(seed_run / "model.keras")
    with np.load(seed_run / "samples.npz") as samples:
        images = samples["images"]
    session = ort.InferenceSession(
        exported / "fashion" / "1" / "model.onnx", providers=["CPUExecutionProvider"]
    )
    for n in (1, 7, 64):
        probabilities, bottleneck = session.run(
            ["probabilities", "bottleneck"], {"images": images[:n]}
        )
        expected = model.predict(images[:n], verbose=0)
        np.testing.assert_allclose(probabilities, expected[0], atol=1e-5)
        np.testing.assert_allclose(bottleneck, expected[1], atol=1e-4)
        assert probabilities.shape == (n, 10) and bottleneck.shape == (n, 2)


def test_savedmodel_signature_names_the_outputs(exported: Path) -> None:
    import tensorflow as tf

    serve = tf.saved_model.load(str(exported / "fashion" / "1" / "saved_model")).signatures[
        "serving_default"
    ]
    result = serve(images=tf.zeros((2, 28, 28, 1), tf.uint8))
    assert sorted(result) == ["bottleneck", "probabilities"]
    assert result["probabilities"].shape == (2, 10)


def test_versions_are_never_overwritten(exported: Path, seed_run: Path) -> None:
    onnx_file = exported / "fashion" / "1" / "model.onnx"
    before = onnx_file.read_bytes()
    with pytest.raises(ExportError, match="already exists; versions are never overwritten"):
        export_run(seed_run, exported, "fashion", version=1)
    assert onnx_file.read_bytes() == before
    result = export_run(seed_run, exported, "fashion")
    assert result["version"] == 2 and (exported / "fashion" / "2" / "model.onnx").is_file()
    assert export_run(seed_run, exported, "fashion", version=7)["version"] == 7
    assert export_run(seed_run, exported, "fashion")["version"] == 8
    assert not [p for p in (exported / "fashion").iterdir() if p.name.startswith(".")]


def test_failed_parity_writes_nothing(seed_run: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ParityError,
        match=r"(savedmodel|onnxruntime) disagrees with Keras on 64 real images: "
        r"max abs difference .* \(tolerance -1\)",
    ):
        # No real converter is this far off; a negative tolerance makes every export fail.
        export_run(seed_run, tmp_path, "fashion", tolerance=-1)
    assert list((tmp_path / "fashion").iterdir()) == []


def test_vgg16_export_parity(vgg16_run: Path, tmp_path: Path) -> None:
    meta = export_run(vgg16_run, tmp_path, "vgg")
    assert meta["family"] == "vgg16"
    assert meta["training"]["base_weights"] == "none"
    assert meta["training"]["base_weights_real"] is False
    assert meta["parity"]["onnxruntime"]["max_abs_diff"] <= 1e-4
    assert meta["input"]["height"] == 28 and meta["input"]["channels"] == 1  # resized inside


def test_cli_errors_are_one_line(tmp_path: Path, seed_run: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "export", *args], capture_output=True, text=True, timeout=300
        )

    result = cli(str(tmp_path / "none"), "--repository", str(tmp_path), "--name", "m")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'none'}: no such run directory"
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    result = cli(str(tmp_path / "half"), "--repository", str(tmp_path), "--name", "m")
    assert result.returncode == 2
    assert (
        "not a finished training run (missing model.keras, metrics.json, samples.npz)"
        in result.stderr
    )
    result = cli(str(seed_run), "--repository", str(tmp_path), "--name", "../escape")
    assert result.returncode == 2 and "model name '../escape' must be" in result.stderr
