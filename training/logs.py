"""Logging for the command-line programs (training and export): plain lines on stderr."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile

# TensorFlow's native start-up lines below ERROR, and absl's notice that precedes them. Since
# TensorFlow logs through absl's C++ logging, TF_CPP_MIN_LOG_LEVEL no longer silences them: on
# a CPU with AVX-512 every import prints "oneDNN custom operations are on" twice.
_NATIVE_CHATTER = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called|[IW]\d{4} )"
)


def setup_cli_logging(quiet: bool) -> None:
    """INFO lines (or only warnings with `quiet`) without TensorFlow's and tf2onnx's chatter;
    imports TensorFlow, so call it after the arguments are parsed (`--help` stays fast)."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in ("tf2onnx", "tensorflow", "absl"):  # converter and TF chatter at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own C++ logging
    _import_tensorflow()


def _import_tensorflow() -> None:
    """Import TensorFlow and Keras with the process's stderr (fd 2, where native code writes)
    captured, then pass on every captured line but the start-up chatter: errors, warnings from
    Python and a failed import's output still reach the user."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401, PLC0415
            import tensorflow  # noqa: F401, PLC0415
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not _NATIVE_CHATTER.match(line):
                    print(line, file=sys.stderr)
