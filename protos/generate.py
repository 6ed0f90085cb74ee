"""Generate the Python code for protos/*.proto into one private package (service/_proto).

    python protos/generate.py [OUT_DIR]     (default: service/_proto; `make protos` runs this)

The .proto files are mapped to the virtual path `service/_proto/...`, so the generated modules
import each other as `service._proto...` and need no path tricks. A test runs this into a
temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PACKAGE = "service/_proto"
PROTOS = ("inference/grpc_predict_v2.proto", "classifier/v1/classifier.proto")


def generate(out_dir: Path) -> list[Path]:
    """Write the generated package to `out_dir`; returns the files written (relative)."""
    include = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PACKAGE}={ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"{PACKAGE}/{name}" for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        generated = Path(tmp) / PACKAGE
        written = []
        for folder in [generated, *sorted(p for p in generated.rglob("*") if p.is_dir())]:
            (folder / "__init__.py").touch()
        for path in sorted(generated.rglob("*")):
            if path.is_file():
                relative = path.relative_to(generated)
                target = out_dir / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                written.append(relative)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / PACKAGE
    for name in generate(target):
        print(target / name)
