"""Logging for the command-line programs (training and export): plain lines on stderr."""

from __future__ import annotations

import logging
import os
import sys


def setup_cli_logging(quiet: bool) -> None:
    """INFO lines (or only warnings with `quiet`) without TensorFlow's and tf2onnx's chatter."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in ("tf2onnx", "tensorflow", "absl"):  # converter and TF chatter at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
