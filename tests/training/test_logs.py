"""The CLIs' stderr filter (training/logs.py): TensorFlow's native chatter dropped for the whole
run, everything else passed on, even the last lines of a process that aborts."""

from __future__ import annotations

import io
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from training.logs import relay

THREADPOOL = (
    "E0000 00:00:1796195250.936642    5746 node_def_util.cc:682] NodeDef mentions attribute "
    "use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset; ...> This "
    "may be expected if your graph generating binary is newer  than this binary. Unknown "
    "attributes will be ignored. NodeDef: {{node ParallelMapDatasetV2/_15}}"
)
REMAPPER = (
    "E0000 00:00:1796197578.362800     518 meta_optimizer.cc:967] remapper failed: "
    "INVALID_ARGUMENT: Mutation::Apply error: fanout 'StatefulPartitionedCall/gradient_tape/"
    "functional_1/leaky2_1/LeakyRelu/LeakyReluGrad' exist for missing node "
    "'StatefulPartitionedCall/functional_1/conv2_1/BiasAdd'."
)
CHATTER = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796195377.068673    7169 port.cc:153] oneDNN custom operations are on.",
    THREADPOOL,
    REMAPPER,
]
KEPT = [
    "E0000 00:00:1796195250.324891    5746 some_op.cc:967] a real error",
    "F0000 00:00:1796195250.324891    5746 check.cc:1] Check failed: a fatal one",
    "a line of native output of no known shape",
]


def _native(then: str) -> subprocess.CompletedProcess[str]:
    """A process that installs the filter, writes CHATTER and KEPT on fd 2 as native code
    does, a line through Python's sys.stderr, and then runs `then`."""
    lines = "".join(line + "\n" for line in CHATTER + KEPT).encode()
    code = (
        "import os, sys\n"
        "from training.logs import filter_native_stderr\n"
        "filter_native_stderr()\n"
        f"os.write(2, {lines!r})\n"
        "print('python says hello', file=sys.stderr, flush=True)\n"
        f"{then}\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


NO_CORE = "import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0))"


@pytest.mark.parametrize("then", ["pass", f"{NO_CORE}; os.abort()"], ids=["exit", "abort"])
def test_native_chatter_is_dropped_and_the_rest_passed_on(then: str) -> None:
    done = _native(then)
    assert done.returncode == (0 if then == "pass" else -signal.SIGABRT), done.stderr
    kept = done.stderr.splitlines()
    assert sorted(kept) == sorted([*KEPT, "python says hello"])  # nothing lost on abort either


@pytest.mark.parametrize(
    "chatter, word, other_word",
    [(THREADPOOL, "use_unbounded_threadpool", "some_attribute"),
     (REMAPPER, "remapper failed", "layout failed")],
)  # fmt: skip
def test_the_known_lines_are_chatter_but_other_errors_are_not(chatter, word, other_word) -> None:
    other = chatter.replace(word, other_word)
    sink = io.BytesIO()
    relay(io.BytesIO(f"{chatter}\n{other}\n".encode()), sink)
    assert sink.getvalue().decode() == other + "\n"
