"""Directory scoring end to end: `python -m service score` as a user runs it, on a folder made
here of real images and hostile files, with the local, remote and Ray engines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.scoring import table as tables
from tests.conftest import MODEL, ROOT, reference
from tests.service.scoring_tree import Tree, encode, make_tree


def score(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "service", "score", *args]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})},
    )  # fmt: skip


def succeed(*args: str) -> dict:
    """Run a job that must finish; returns its summary.json."""
    done = score(*args)
    assert done.returncode == 0, done.stderr
    out = Path(args[args.index("--out") + 1])
    assert done.stdout.startswith(f"{_count(out)} images:"), done.stdout
    return json.loads(out.with_name(out.name + ".summary.json").read_text())


def _count(out: Path) -> str:
    return f"{rows(out).num_rows:,}"


def rows(out: Path):
    return tables.read(out, tables.output_format(out))


def snapshot(root: Path) -> list[tuple]:
    """Every entry under root (links not followed): name, kind, size, mtime."""
    entries = []
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            stat = os.lstat(os.path.join(folder, name))
            entries.append((folder, name, stat.st_mode, stat.st_size, stat.st_mtime_ns))
    return sorted(entries, key=repr)


@pytest.fixture(scope="module")
def labels(repository: Path) -> list[str]:
    return json.loads((repository / MODEL / "1" / "metadata.json").read_text())["labels"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory, sample_images, labels) -> Tree:
    images, classes = sample_images
    made = make_tree(tmp_path_factory.mktemp("score") / "in", images, classes, labels)
    made.before = snapshot(made.root)
    return made


@pytest.fixture(scope="module")
def local(tree: Tree, repository: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out") / "scores.parquet"
    summary = succeed(str(tree.root), "--model", MODEL, "--repository", str(repository),
                      "--out", str(out))  # fmt: skip
    return out, summary


def test_every_image_file_gets_exactly_one_row_with_the_right_status(local, tree):
    out, summary = local
    table = rows(out).to_pylist()
    paths = [row["path"] for row in table]
    assert len(paths) == len(set(paths))
    assert set(paths) == set(tree.expected)  # no "again/..." nor "awkward/loop/..." duplicates
    for row in table:
        if tree.expected[row["path"]] == "ok":
            assert row["error"] is None, row
            assert row["label"] in summary["predicted_labels"]
            assert abs(sum(row["probabilities"]) - 1) < 1e-4
            assert row["model"] == MODEL and row["version"] == 1
        else:
            assert row["error"] and len(row["error"]) < 200, row
            assert row["label"] is None and row["probabilities"] is None
    errors = {row["path"]: row["error"] for row in table if row["error"]}
    assert "--max-image-pixels 16,000,000" in errors["bad/bomb.png"]  # the default
    assert errors["bad/empty.png"] == "empty image (0 bytes)"
    assert errors["bad/pipe.png"] == "not a regular file"
    assert errors["bad/gone.png"].startswith("cannot read the file: No such file")
    counts = summary["counts"]
    assert counts == {
        "images": len(tree.expected),
        "scored": sum(s == "ok" for s in tree.expected.values()),
        "errors": sum(s == "error" for s in tree.expected.values()),
        "skipped": tree.skipped,
    }
    assert {e["path"] for e in summary["error_examples"]} == set(errors)


def test_scores_equal_onnxruntime_and_the_summary_reports_accuracy(local, tree, repository, labels):
    out, summary = local
    by_path = {row["path"]: row for row in rows(out).to_pylist()}
    labelled = sorted(tree.labelled)
    expected = reference(repository, np.stack([tree.pixels[p] for p in labelled]))
    got = np.array([by_path[p]["probabilities"] for p in labelled])
    np.testing.assert_allclose(got, expected["probabilities"], atol=1e-6)
    np.testing.assert_allclose(
        [[by_path[p]["bottleneck_x"], by_path[p]["bottleneck_y"]] for p in labelled],
        expected["bottleneck"], rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    truth = [labels.index(tree.labelled[p]) for p in labelled]
    predicted = expected["probabilities"].argmax(axis=1)
    assert summary["labelled"] == len(labelled)
    assert summary["accuracy"] == pytest.approx(float(np.mean(predicted == truth)))
    matrix = np.array(summary["confusion_matrix"]["matrix"])
    assert matrix.sum() == len(labelled) and np.trace(matrix) == int(np.sum(predicted == truth))
    for path, row in by_path.items():  # class folders are matched despite "T-shirt/top"
        assert row["true_label"] == tree.labelled.get(path)


def test_summary_files_and_the_bottleneck_map(local, tree):
    out, summary = local
    plot = out.with_name(out.name + ".bottleneck.png")
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300
        colours = len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0))
    assert colours > 20  # points in several colours, not an empty frame
    assert summary["engine"] == "local" and summary["format"] == "parquet"
    assert summary["this_run"]["scored"] == len(tree.expected)
    assert not out.with_name(out.name + ".parts").exists()


def test_the_input_tree_is_never_modified(local, tree):
    assert snapshot(tree.root) == tree.before


def test_csv_jsonl_and_parquet_hold_the_same_rows(local, tree, repository, tmp_path):
    parquet = rows(local[0]).to_pylist()
    for suffix in ("csv", "jsonl"):
        out = tmp_path / f"scores.{suffix}"
        succeed(str(tree.root), "--model", MODEL, "--repository", str(repository),
                "--out", str(out))  # fmt: skip
        other = rows(out).to_pylist()
        assert [r["path"] for r in other] == [r["path"] for r in parquet]
        for a, b in zip(other, parquet, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                if key == "probabilities" and a[key] is not None:
                    np.testing.assert_allclose(a[key], b[key], atol=1e-6)
                elif isinstance(a[key], float):
                    assert a[key] == pytest.approx(b[key], abs=1e-6), key
                else:
                    assert a[key] == b[key], (key, a, b)


def same_rows(got: Path, expected: Path) -> None:
    a, b = rows(got).to_pylist(), rows(expected).to_pylist()
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("label", "label_index", "error", "true_label", "model", "version"):
            assert x[key] == y[key], (key, x, y)
        if x["error"] is None:
            np.testing.assert_allclose(x["probabilities"], y["probabilities"], atol=1e-6)
            np.testing.assert_allclose(
                [x["bottleneck_x"], x["bottleneck_y"]], [y["bottleneck_x"], y["bottleneck_y"]],
                rtol=1e-5, atol=1e-5,
            )  # fmt: skip


def test_remote_engine_equals_local(local, tree, server, tmp_path):
    out = tmp_path / "remote.parquet"
    # 1 MiB messages: awkward/large.jpg (over 1 MiB) is decoded here and sent as pixels.
    summary = succeed(str(tree.root), "--model", MODEL, "--server", server.target,
                      "--batch-size", "7", "--max-message-bytes", str(1 << 20),
                      "--out", str(out))  # fmt: skip
    assert summary["engine"] == "remote"
    same_rows(out, local[0])


def test_ray_engine_on_a_local_ray_equals_local(local, tree, repository, tmp_path):
    out = tmp_path / "ray.parquet"
    summary = succeed(str(tree.root), "--model", MODEL, "--repository", str(repository),
                      "--engine", "ray", "--workers", "2", "--batch-size", "16",
                      "--out", str(out))  # fmt: skip
    assert summary["engine"] == "ray"
    same_rows(out, local[0])


def test_limit_and_no_recursive(local, tree, repository, tmp_path):
    out = tmp_path / "five.parquet"
    succeed(str(tree.root), "--model", MODEL, "--repository", str(repository), "--limit", "5",
            "--out", str(out))  # fmt: skip
    assert rows(out)["path"].to_pylist() == rows(local[0])["path"].to_pylist()[:5]
    out = tmp_path / "top.parquet"
    summary = succeed(str(tree.root), "--model", MODEL, "--repository", str(repository),
                      "--no-recursive", "--out", str(out))  # fmt: skip
    assert rows(out)["path"].to_pylist() == ["top.png"]
    assert summary["counts"]["skipped"] == 2  # README.txt and model.onnx


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/folder", "--repository", "REPO"], "/no/such/folder: no such directory"),
        (["IN", "--server", "127.0.0.1:1"], "cannot reach 127.0.0.1:1"),
        (["IN", "--repository", "REPO", "--model", "nope"], "model 'nope' is not in"),
        (["IN", "--repository", "REPO", "--out", "IN/inside.parquet"], "is inside"),
        (["IN", "--repository", "REPO", "--out", "OUT/scores.xlsx"], ".parquet, .csv or .jsonl"),
        (["IN", "--repository", "REPO", "--server", "x:1"], "not both"),
        (
            ["IN", "--repository", "REPO", "--engine", "ray", "--ray-address", "127.0.0.1:1"],
            "--ray-address 127.0.0.1:1: cannot connect",
        ),
        (["IN", "--repository", "REPO", "--out", "IN/top.png/x.parquet"], "is inside"),
        (["IN", "--repository", "REPO", "--out", "/proc/scores.parquet"], "cannot"),
        (["IN", "--repository", "REPO", "--model", "nope", "--out", "OUT/deep/er/x.csv"],
         "model 'nope' is not in"),  # and no folder made for the output
        (["IN", "--repository", "REPO", "--out", "OUT/scores.csv/"], "names a folder"),
        (["IN", "--repository", "REPO", "--workers", "100000"], "--workers must be at most 256"),
    ],
)  # fmt: skip
def test_one_line_errors(args, message, tree, repository, tmp_path):
    fill = {"IN": str(tree.root), "REPO": str(repository), "OUT": str(tmp_path)}
    args = [fill.get(a, a) for a in args]
    args = [a.replace("IN/", f"{tree.root}/").replace("OUT/", f"{tmp_path}/") for a in args]
    if "--model" not in args:
        args += ["--model", MODEL]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "scores.parquet")]
    done = score(*args, "--device", "cpu")  # (auto would add a line: no CUDA here)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert message in done.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_ray_missing_is_a_one_line_error_naming_the_extra(tree, repository, tmp_path):
    blocker = tmp_path / "block" / "sitecustomize.py"
    blocker.parent.mkdir()
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    done = score(str(tree.root), "--model", MODEL, "--repository", str(repository),
                 "--engine", "ray", "--out", str(tmp_path / "s.parquet"),
                 env={"PYTHONPATH": str(blocker.parent)})  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "error: --engine ray needs Ray: pip install 'cnn-serving[ray]'\n"


# ---- resumption


@pytest.fixture(scope="module")
def many(tmp_path_factory, sample_dir, labels) -> Path:
    """1,500 real PNGs in class folders: enough that a job is killed long before it ends."""
    from training.data import read_fashion_mnist_dir
    from training.write_images import safe

    data = read_fashion_mnist_dir(sample_dir)
    root = tmp_path_factory.mktemp("many") / "in"
    for i in range(1500):
        image, label = data.x_train[i], int(data.y_train[i])
        path = root / safe(labels[label]) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(Image.fromarray(image[:, :, 0]), "PNG"))
    return root


def test_kill_9_mid_run_then_the_same_command_completes_the_exact_table(many, repository, tmp_path):
    out = tmp_path / "scores.parquet"
    args = [str(many), "--model", MODEL, "--repository", str(repository), "--out", str(out),
            "--batch-size", "8", "--workers", "1", "--chunk-rows", "40"]  # fmt: skip
    job = subprocess.Popen([sys.executable, "-m", "service", "score", *args], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    parts = tmp_path / "scores.parquet.parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("chunk-*.parquet"))) < 3 and job.poll() is None:
        assert time.monotonic() < deadline, "no chunk written in 120 s"
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not out.exists(), "the job finished before it could be killed"
    summary = succeed(*args)
    table = rows(out)
    paths = table["path"].to_pylist()
    assert len(paths) == len(set(paths)) == 1500
    run = summary["this_run"]
    assert run["already_done"] >= 120 and run["scored"] + run["already_done"] == 1500
    clean = tmp_path / "clean.parquet"
    succeed(*[a if a != str(out) else str(clean) for a in args])
    same_rows(out, clean)

    # A finished table is resumed, not rescored: nothing to do, then only a new file.
    again = succeed(*args)
    assert again["this_run"]["scored"] == 0 and rows(out).equals(table)
    extra = many / "new.png"
    extra.write_bytes(encode(Image.new("L", (28, 28), 0), "PNG"))
    try:
        again = succeed(*args)
    finally:
        extra.unlink()
    assert again["this_run"]["scored"] == 1 and rows(out).num_rows == 1501


def test_a_table_of_another_version_is_not_mixed_in(local, tree, private_repo, tmp_path):
    import shutil

    shutil.copytree(private_repo / MODEL / "1", private_repo / MODEL / "2")
    out = tmp_path / "scores.jsonl"
    base = [str(tree.root), "--model", MODEL, "--repository", str(private_repo), "--out", str(out)]
    succeed(*base, "--version", "1")
    done = score(*base)  # the newest is now 2
    assert done.returncode == 2 and "holds rows of fashion v1, not fashion v2" in done.stderr
    summary = succeed(*base, "--overwrite")
    assert summary["version"] == 2 and set(rows(out)["version"].to_pylist()) == {2}


def test_remote_engine_rides_out_a_server_restart(many, repository, tmp_path):
    from tests.conftest import start_server

    first = start_server(repository)
    out = tmp_path / "scores.parquet"
    args = [str(many), "--model", MODEL, "--server", first.target, "--out", str(out),
            "--batch-size", "1", "--workers", "1", "--chunk-rows", "40"]  # fmt: skip
    job = subprocess.Popen([sys.executable, "-m", "service", "score", *args], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    parts = tmp_path / "scores.parquet.parts"
    deadline = time.monotonic() + 120
    while not list(parts.glob("chunk-*.parquet")):
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.005)
    assert first.stop() == 0  # the job now meets UNAVAILABLE, then a refused connection
    second = start_server(repository, "--grpc-port", str(first.port))
    try:
        stdout, stderr = job.communicate(timeout=120)
    finally:
        second.stop()
    assert job.returncode == 0, stderr
    assert "UNAVAILABLE; retrying in" in stderr
    paths = rows(out)["path"].to_pylist()
    assert len(paths) == len(set(paths)) == 1500
    assert rows(out)["error"].null_count == 1500


def test_a_table_of_another_folder_is_not_taken_for_this_one(local, tree, repository, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tree.root / "Trouser", other / "Trouser")
    out = tmp_path / "scores.parquet"
    shutil.copy(local[0], out)
    shutil.copy(
        local[0].with_name(local[0].name + ".summary.json"), tmp_path / f"{out.name}.summary.json"
    )
    done = score(str(other), "--model", MODEL, "--repository", str(repository), "--out", str(out))
    assert done.returncode == 2
    assert "holds the results of another job (directory" in done.stderr
    assert not (tmp_path / "scores.parquet.parts").exists()  # a refused run leaves no trace


def test_an_empty_folder_gives_an_empty_table_again_and_again(repository, tmp_path):
    (tmp_path / "empty").mkdir()
    for suffix in ("parquet", "csv", "jsonl"):
        out = tmp_path / f"scores.{suffix}"
        for _ in range(2):
            summary = succeed(str(tmp_path / "empty"), "--model", MODEL, "--repository",
                              str(repository), "--out", str(out))  # fmt: skip
            assert summary["counts"]["images"] == 0 and rows(out).num_rows == 0


def test_a_limit_extends_and_never_deletes_work(local, tree, repository, tmp_path):
    out = tmp_path / "scores.parquet"
    base = [str(tree.root), "--model", MODEL, "--repository", str(repository), "--out", str(out)]
    assert succeed(*base, "--limit", "5")["this_run"]["scored"] == 5
    summary = succeed(*base, "--limit", "12")
    assert (summary["this_run"]["scored"], summary["this_run"]["already_done"]) == (7, 5)
    succeed(*base)
    same_rows(out, local[0])
    assert succeed(*base, "--limit", "3")["this_run"]["scored"] == 0
    same_rows(out, local[0])  # still every row
    done = score(*base, "--no-recursive")
    assert done.returncode == 2 and "(recursive True -> False)" in done.stderr


CRASHER = """
import importlib.abc, importlib.util, os, sys

class Crash(importlib.abc.MetaPathFinder):
    # In decoding worker processes: decoding a file named *crash* kills the process, as a
    # segfault in a native decoder would.
    def find_spec(self, name, path=None, target=None):
        if name != "service.scoring.decoding":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            real = module.decode_file
            def decode_file(path, *args):
                if "crash" in os.path.basename(path):
                    os._exit(3)
                return real(path, *args)
            module.decode_file = decode_file
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Crash())
"""


def test_a_file_that_kills_its_decoder_is_an_error_row(many, repository, tmp_path):
    import shutil

    folder = tmp_path / "in"
    shutil.copytree(many / "Bag", folder / "Bag")
    victim = sorted((folder / "Bag").iterdir())[30]
    victim.rename(victim.with_name("crash.png"))
    hook = tmp_path / "hook" / "sitecustomize.py"
    hook.parent.mkdir()
    hook.write_text(CRASHER)
    out = tmp_path / "scores.parquet"
    done = score(str(folder), "--model", MODEL, "--repository", str(repository), "--out",
                 str(out), "--batch-size", "8", "--workers", "2",
                 env={"PYTHONPATH": str(hook.parent)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = rows(out).to_pylist()
    assert len(table) == len(list((folder / "Bag").iterdir()))
    errors = {r["path"]: r["error"] for r in table if r["error"]}
    assert errors == {"Bag/crash.png": "the image decoder crashed on this file"}


def small_tree(root: Path, sample_images) -> dict[str, np.ndarray]:
    """Six real PNGs in two folders, a broken link and a text file named .png, and one named
    just ".png"; returns the pixels of the good files by path."""
    images, _ = sample_images
    pixels = {}
    for i, relative in enumerate(["a/0.png", "a/1.png", "a/2.png", "b/3.png", "b/4.png", ".png"]):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(encode(Image.fromarray(images[i][:, :, 0]), "PNG"))
        pixels[relative] = images[i]
    (root / "b" / "link.png").symlink_to("missing.png")
    (root / "b" / "text.png").write_text("not a picture")
    return pixels


def test_a_rerun_redoes_changed_files_and_retries_error_rows(repository, sample_images, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "scores.jsonl"
    pixels = small_tree(folder, sample_images)
    base = [str(folder), "--model", MODEL, "--repository", str(repository), "--out", str(out)]
    first = succeed(*base)
    assert (first["counts"]["scored"], first["counts"]["errors"]) == (6, 2)  # ".png" counts
    again = succeed(*base)  # nothing changed: only the two error rows are tried again
    assert (again["this_run"]["scored"], again["this_run"]["already_done"]) == (2, 6)

    images, _ = sample_images
    (folder / "a" / "1.png").write_text("now text")  # a scored file broken
    (folder / "a" / "2.png").write_bytes(encode(Image.fromarray(images[9][:, :, 0]), "PNG"))
    os.replace(folder / "b" / "4.png", folder / "b" / "missing.png")  # the link mended, 4 gone
    third = succeed(*base)
    # Redone: 1 and 2 (changed), link (mended), missing (new), text (an error again).
    assert (third["this_run"]["scored"], third["this_run"]["already_done"]) == (5, 3)
    table = {r["path"]: r for r in rows(out).to_pylist()}
    assert sorted(table) == [".png", "a/0.png", "a/1.png", "a/2.png", "b/3.png", "b/link.png",
                             "b/missing.png", "b/text.png"]  # fmt: skip
    assert table["a/1.png"]["error"].startswith("not a readable image")
    assert table["b/link.png"]["error"] is None and table["b/text.png"]["error"]
    expected = reference(repository, np.stack([images[9], pixels["b/4.png"], pixels["a/0.png"]]))
    got = [table[p]["probabilities"] for p in ("a/2.png", "b/link.png", "a/0.png")]
    np.testing.assert_allclose(got, expected["probabilities"], atol=1e-6)


def test_the_job_never_scores_its_own_outputs(repository, sample_images, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out" / "scores.parquet"
    small_tree(folder, sample_images)
    (folder / "plot.png").symlink_to(out.with_name("scores.parquet.bottleneck.png"))
    base = [str(folder), "--model", MODEL, "--repository", str(repository), "--out", str(out)]
    for _ in range(2):  # before the plot exists (a broken link), then after
        summary = succeed(*base)
        assert "plot.png" not in rows(out)["path"].to_pylist()
        assert summary["counts"]["skipped"] == 1 and summary["counts"]["images"] == 8


def without_root_powers(command: list[str]) -> list[str]:
    """As root, permission bits do not stop a reader: drop the capabilities that let them."""
    if os.geteuid() != 0:
        return command
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--", *command]


def test_a_folder_that_cannot_be_listed_keeps_its_rows(repository, sample_images, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "scores.csv"
    small_tree(folder, sample_images)
    args = [str(folder), "--model", MODEL, "--repository", str(repository), "--out", str(out)]
    succeed(*args)
    before = rows(out)
    command = without_root_powers([sys.executable, "-m", "service", "score", *args])
    (folder / "b").chmod(0)
    try:
        locked = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        folder.chmod(0)
        top = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        folder.chmod(0o755)
        (folder / "b").chmod(0o755)
    assert locked.returncode == 1, locked.stderr
    assert "WARNING: 1 folders could not be listed (b): their files have no new rows" in (
        locked.stdout
    )
    assert rows(out).equals(before)  # b's rows kept, in their place at the end
    assert (
        top.returncode == 2
        and top.stderr == f"error: {folder}: cannot list it: Permission denied\n"
    )
    unlocked = succeed(*args)  # b's rows are checked again now: redone
    assert unlocked["this_run"]["scored"] == 4 and rows(out).equals(before)
