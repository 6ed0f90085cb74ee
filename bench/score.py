"""Directory scoring benchmark: the local engine against a naive loop and a decoding ceiling.

    .venv/bin/python bench/score.py                           # 8,000 PNGs, scratch and seed
    .venv/bin/python bench/score.py --models scratch --files 2000 --json build/score.json

On a folder of real Fashion-MNIST PNGs in class folders (build/bench-images, written on first
use from the committed sample: its 2,000 images, then their mirror images), per model:
- local engine: `python -m service score DIR --repository ... --out ...` as a user runs it;
  images/s is the scoring phase of its summary (decoding processes already started), and the
  whole command's wall time is shown too;
- naive loop: what the seed notebooks do, one image at a time: Pillow open, numpy, and
  `keras.Model.predict` on the Keras model the ONNX file was exported from (on the first
  --naive-files files: it is slow);
- decode ceiling: the same files decoded alone (the same decoding function, the same number of
  worker processes and batch size as the engine, pool started before timing): scoring cannot be
  faster than reading and decoding its files;
- the bound (CPU only): the CPU time per image of decoding alone (one process) and of
  onnxruntime alone (one thread, the same batch size), each measured in this process. On cores
  that the decoders already fill, the engine must fit both into them, so its ratio to the
  ceiling cannot pass decode / (decode + onnxruntime), whatever the pipeline does.

Models come from bench/prepare.py (1 epoch on the sample; accuracy is irrelevant here). Every
number is from this run on this machine; a shared VM moves by tens of percent minute to minute,
so the ratios, measured back to back, are the point.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from prepare import BUILD, MODELS, ROOT, RUNS, SAMPLE, prepare_repository  # bench/prepare.py

from service import repository
from service.runtime import Runtime
from service.scoring.decoding import decode_files
from service.scoring.engines import batches, decoders
from service.scoring.files import walk
from training.data import read_fashion_mnist_dir
from training.write_images import safe

log = logging.getLogger("bench.score")

TARGETS = {"naive": 5.0, "ceiling": 0.8}  # the engine's least ratio to each yardstick
HEAD = (
    "model | files | local engine img/s | whole command s | naive loop img/s | decode ceiling "
    "img/s | vs naive | vs ceiling"
)


def write_images(folder: Path, count: int) -> Path:
    """`count` PNGs in class folders from the sample: its 2,000 images, then their mirror
    images, upside-down copies and both."""
    if folder.is_dir() and len(walk(folder).items) == count:
        return folder
    data = read_fashion_mnist_dir(SAMPLE)
    images = np.concatenate([data.x_train, data.x_test])[..., 0]
    labels = np.concatenate([data.y_train, data.y_test])
    log.info("writing %d PNGs to %s", count, folder)
    for i in range(count):
        image = images[i % len(images)]
        variant = (i // len(images)) % 4
        if variant & 1:
            image = image[:, ::-1]
        if variant & 2:
            image = image[::-1]
        path = folder / safe(data.labels[int(labels[i % len(images)])]) / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image)).save(path)
    return folder


def local_engine(folder: Path, repo: Path, name: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "scores.parquet"
        command = [sys.executable, "-m", "service", "score", str(folder), "--model", name,
                   "--repository", str(repo), "--out", str(out), "--device", args.device,
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                   "--no-progress"]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall_s = time.perf_counter() - started
        summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    return {"images_per_s": summary["this_run"]["images_per_second"], "wall_s": wall_s,
            "device": summary["device"], "errors": summary["counts"]["errors"]}  # fmt: skip


def decode_ceiling(paths: list[str], shape: tuple[int, int, int], args: argparse.Namespace):
    with decoders(args.workers) as pool:  # the engine's own decoding processes, started
        begin = time.perf_counter()
        jobs = [
            pool.submit(decode_files, batch, shape, 50_000_000)
            for batch in batches(paths, args.batch_size)
        ]
        decoded = sum(len(job.result().good) for job in jobs)
        return decoded / (time.perf_counter() - begin)


def cpu_per_image(paths: list[str], spec: repository.ModelSpec, batch_size: int):
    """CPU seconds per image of decoding alone and of onnxruntime alone (one thread): the
    least of three passes over up to 2,000 files each (what the work costs, not the noise)."""
    sample = paths[:2000]
    decode_files(sample[:batch_size], spec.image_shape, 50_000_000)  # imports, caches
    session = Runtime("cpu", 1).session(spec)  # warmed up at every batch size
    decode, infer = [], []
    for _ in range(3):
        begin = time.process_time()
        pixels = decode_files(sample, spec.image_shape, 50_000_000).pixels
        decode.append((time.process_time() - begin) / len(sample))
        begin = time.process_time()
        for batch in batches(pixels, batch_size):
            session.run(np.asarray(batch))
        infer.append((time.process_time() - begin) / len(pixels))
    return min(decode), min(infer)


NAIVE = """
import sys, time, numpy as np, keras
from PIL import Image
model = keras.saving.load_model(sys.argv[1])
paths = sys.argv[2:]
def one(path):
    with Image.open(path) as image:
        x = np.asarray(image.convert("L"), dtype=np.uint8)[None, :, :, None]
    return model.predict(x, verbose=0)
one(paths[0])  # the first call builds the graph; not counted
begin = time.perf_counter()
for path in paths:
    one(path)
print(len(paths) / (time.perf_counter() - begin))
"""


def naive_loop(run: Path, paths: list[str]) -> float:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", NAIVE, str(run / "model.keras"), *paths],
                          check=True, capture_output=True, text=True, env=env)  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


def bench(name: str, folder: Path, repo: Path, args: argparse.Namespace) -> dict:
    spec = repository.read_spec(repo, name, max(repository.scan(repo)[name]))
    paths = [item.path for item in walk(folder).items]
    ceilings, engines = [], []
    for repeat in range(args.repeats):  # back to back, so both see the same machine
        log.info("%s: decode ceiling and local engine, %d of %d", name, repeat + 1, args.repeats)
        ceilings.append(decode_ceiling(paths, spec.image_shape, args))
        engines.append(local_engine(folder, repo, name, args))
    ratios = [e["images_per_s"] / c for e, c in zip(engines, ceilings, strict=True)]
    middle = sorted(range(args.repeats), key=lambda i: ratios[i])[args.repeats // 2]
    ceiling, engine = ceilings[middle], engines[middle]  # the run with the median ratio
    log.info("%s: naive loop on %d files", name, args.naive_files)
    naive = naive_loop(RUNS / name, paths[: args.naive_files])
    parameters = spec.metadata.get("training", {}).get("parameters", 0)
    decode_s, onnxruntime_s = cpu_per_image(paths, spec, args.batch_size)
    return {"model": name, "files": len(paths), "engine": engine, "naive_images_per_s": naive,
            "ceiling_images_per_s": ceiling, "parameters": parameters,
            "arch": spec.metadata.get("arch"), "ratios_vs_ceiling": ratios,
            "decode_cpu_s_per_image": decode_s,
            "onnxruntime_cpu_s_per_image": onnxruntime_s}  # fmt: skip


def report(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"cpus {os.cpu_count()}, --workers {args.workers}, --batch-size {args.batch_size}, "
        f"--device {args.device}; naive loop on the first {args.naive_files} files; engine and "
        f"ceiling: the middle of {args.repeats} back-to-back pairs (by their ratio)",
        "",
        HEAD,
        "|".join(["---"] * 8),
    ]
    checks = []
    for r in results:
        engine = r["engine"]["images_per_s"]
        vs_naive, vs_ceiling = engine / r["naive_images_per_s"], engine / r["ceiling_images_per_s"]
        lines.append(
            f"{r['model']} ({r['arch']}, {r['parameters']:,} parameters) | {r['files']:,} | "
            f"{engine:,.0f} | {r['engine']['wall_s']:.1f} | {r['naive_images_per_s']:,.1f} | "
            f"{r['ceiling_images_per_s']:,.0f} | {vs_naive:.1f}x | {vs_ceiling:.2f}x"
        )
        spread = ", ".join(f"{x:.2f}" for x in sorted(r["ratios_vs_ceiling"]))
        lines[-1] += f" ({spread})"
        for key, ratio in (("naive", vs_naive), ("ceiling", vs_ceiling)):
            least = TARGETS[key]
            verdict = "PASS" if ratio >= least else "FAIL"
            checks.append(f"- target {r['model']}: >= {least}x the {key}: {ratio:.3f}x: {verdict}")
        if args.device == "cpu":
            decode, infer = r["decode_cpu_s_per_image"], r["onnxruntime_cpu_s_per_image"]
            checks.append(
                f"- {r['model']}: (bound) CPU per image: decoding {decode * 1e6:.0f} us, "
                f"onnxruntime alone {infer * 1e6:.0f} us (1 thread, batches of "
                f"{args.batch_size}): on cores the decoders fill, the engine cannot pass "
                f"{decode / (decode + infer):.2f}x the ceiling, with no overhead of its own"
            )
    return "\n".join([*lines, "", *checks])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default="scratch,seed", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--files", type=int, default=8000, help="PNGs in the folder (default 8000)")
    p.add_argument("--repeats", type=int, default=3, help="engine/ceiling pairs (default 3)")
    p.add_argument("--naive-files", type=int, default=300, help="files the naive loop scores")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", type=Path, help="also write every number to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    models = [m for m in args.models.split(",") if m]
    repo = prepare_repository(models)
    folder = write_images(BUILD / f"bench-images-{args.files}", args.files)
    results = [bench(name, folder, repo, args) for name in models]
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
