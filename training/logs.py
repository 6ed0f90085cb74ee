"""Logging for the command-line programs (training and export): plain lines on stderr.

TensorFlow writes from native code straight to the process's stderr (fd 2), through absl's C++
logging, which ignores TF_CPP_MIN_LOG_LEVEL for part of its lines. So the programs route fd 2
through a relay process that passes every line on but TensorFlow's chatter (`_NATIVE_CHATTER`),
for the whole run: at import and while fitting. Python's own `sys.stderr` (logging, tracebacks,
tqdm) writes to the real stderr directly, so a terminal is still seen as one. The relay is a
process, not a thread, so a crash (a native check failing and aborting) loses none of the last
native lines: the relay drains the pipe until the program's end closes it.

    python -m training.logs     # the relay itself: standard input, filtered, to standard output
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
import sys
from typing import BinaryIO

# Dropped from what native code writes to fd 2:
# - TensorFlow's lines below ERROR, and absl's notice that precedes them: on a CPU with AVX-512
#   every import prints "oneDNN custom operations are on" twice;
# - one ERROR line that is not an error: when Keras fits with validation arrays, its pipeline
#   maps batches with an attribute (use_unbounded_threadpool) that TensorFlow's runtime op lacks
#   and ignores ("Unknown attributes will be ignored"), and TensorFlow says so once per fit;
# - one more: Grappler's remapper pass, which fuses ops for speed, gives up on the seed
#   network's LeakyReLU gradient ("remapper failed: ... LeakyReluGrad"); the graph then runs
#   unfused, with the same results.
_NATIVE_CHATTER = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|[IW]\d{4} "
    rb"|E\d{4} .*\] NodeDef mentions attribute use_unbounded_threadpool which is not in the op "
    rb"definition"
    rb"|E\d{4} .*\] remapper failed: .*LeakyReluGrad)"
)
RELAY_EXIT_TIMEOUT_S = 5.0  # at exit, how long the relay may take to pass on the last lines


def setup_cli_logging(quiet: bool) -> None:
    """INFO lines (or only warnings with `quiet`) without TensorFlow's and tf2onnx's chatter;
    imports TensorFlow, so call it after the arguments are parsed (`--help` stays fast)."""
    filter_native_stderr()
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in ("tf2onnx", "tensorflow", "absl"):  # converter and TF chatter at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own C++ logging
    import keras  # noqa: F401, PLC0415
    import tensorflow  # noqa: F401, PLC0415


def filter_native_stderr() -> None:
    """From now to the end of the process, fd 2 (native code's stderr, and that of child
    processes) goes through the relay; `sys.stderr` becomes the real stderr. Does nothing
    when stderr is not open."""
    sys.stderr.flush()
    try:
        real = os.dup(2)
    except OSError:
        return
    read, write = os.pipe()
    relay = subprocess.Popen(
        [sys.executable, "-m", "training.logs"],
        stdin=read,
        stdout=real,
        process_group=0,  # a Ctrl-C for the program does not stop its relay first
    )
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    sys.stderr = os.fdopen(
        real, "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors
    )
    atexit.register(_end_relay, relay, real)


def _end_relay(relay: subprocess.Popen[bytes], real: int) -> None:
    """At exit: fd 2 back to the real stderr (the pipe's last writer closed unless a child
    process still holds it), and the relay given time to pass on what it still holds."""
    try:
        os.dup2(real, 2)
        relay.wait(timeout=RELAY_EXIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        pass


def relay(source: BinaryIO, sink: BinaryIO) -> None:
    """Copy `source` to `sink` line by line as lines arrive, without TensorFlow's chatter."""
    for line in source:
        if not _NATIVE_CHATTER.match(line):
            sink.write(line)
            sink.flush()


if __name__ == "__main__":
    relay(sys.stdin.buffer, sys.stdout.buffer)
