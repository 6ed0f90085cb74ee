"""Export a training run to a model repository version (SavedModel + ONNX + metadata.json).

    python -m export runs/scratch --repository models --name fashion [--version N]

Every option can also be set with an environment variable CNN_SERVING_<OPTION>.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from training.logs import setup_cli_logging


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a training run to REPO/NAME/VERSION/{model.onnx, saved_model/, "
        "metadata.json}. Keras, the SavedModel and onnxruntime must agree on the run's real "
        "test images, or nothing is written.",
        epilog="Every option is also an environment variable CNN_SERVING_<OPTION> "
        "(CNN_SERVING_REPOSITORY, CNN_SERVING_NAME, ...).",
    )
    parser.add_argument(
        "run", type=Path, metavar="RUN", help="the training run directory (python -m training)"
    )
    parser.add_argument(
        "--repository",
        metavar="REPO",
        type=Path,
        default=env("CNN_SERVING_REPOSITORY"),
        required="CNN_SERVING_REPOSITORY" not in os.environ,
        help="model repository root (created if missing)",
    )
    parser.add_argument(
        "--name",
        default=env("CNN_SERVING_NAME"),
        required="CNN_SERVING_NAME" not in os.environ,
        help="model name: letters, digits, '_', '.', '-'",
    )
    parser.add_argument(
        "--version",
        metavar="N",
        type=int,
        default=env("CNN_SERVING_VERSION"),
        help="version number to write; an existing one is an error (default: one past the newest)",
    )
    parser.add_argument(
        "--tolerance",
        metavar="MAX_ABS",
        type=float,
        default=float(env("CNN_SERVING_TOLERANCE", "1e-4")),
        help="largest absolute difference allowed between Keras, SavedModel and "
        "onnxruntime outputs (default: %(default)g)",
    )
    parser.add_argument("--quiet", action="store_true", help="only errors and the final summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli_logging(args.quiet)
    from export.core import export_run  # noqa: PLC0415 - keeps --help fast
    from export.errors import ExportError  # noqa: PLC0415

    try:
        metadata = export_run(
            args.run,
            args.repository,
            args.name,
            int(args.version) if args.version is not None else None,
            args.tolerance,
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "path": metadata["path"],
                "name": metadata["name"],
                "version": metadata["version"],
                "parity": metadata["parity"],
                "test_accuracy": metadata["training"]["test_accuracy"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
