"""Print what a run and its export produced, for people (used by `make demo`).

python -m training.summary RUN [EXPORT_JSON]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def describe(run_dir: Path, export: dict[str, Any] | None) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    lines = [
        f"run            {run_dir}",
        f"model          {metrics['family']}/{metrics['arch']}, "
        f"{config['model']['parameters']:,} parameters",
        f"data           {config['dataset']['name']} ({config['dataset']['train_size']:,} train, "
        f"{config['dataset']['test_size']:,} test) from {config['dataset']['source']}",
        f"epochs         {len(metrics['epochs'])} in {metrics['train_seconds']:.0f} s",
        f"test accuracy  {metrics['test_accuracy']:.4f}",
    ]
    if metrics.get("base_weights") == "none":
        lines.append("               (random frozen VGG16 base: no pretrained weights)")
    lines.append(
        "figures        "
        + "\n               ".join(str(p) for p in sorted((run_dir / "figures").glob("*.png")))
    )
    if export:
        onnx = export["parity"]["onnxruntime"]["max_abs_diff"]
        lines.append(f"exported       {export['path']} (model.onnx, saved_model/, metadata.json)")
        lines.append(
            f"parity         onnxruntime vs Keras max abs diff {onnx:.2e} on "
            f"{export['parity']['images']} test images"
        )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print("usage: python -m training.summary RUN [EXPORT_JSON]", file=sys.stderr)
        return 2
    try:
        export = json.loads(Path(sys.argv[2]).read_text()) if len(sys.argv) == 3 else None
        print(describe(Path(sys.argv[1]), export))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot summarise {sys.argv[1]}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
