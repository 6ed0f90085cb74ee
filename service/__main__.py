"""`python -m service` / `cnn-serving`: the gRPC service and its clients.

The serving commands (serve, classify, score) are not part of this version yet; until they are,
this entry point says so and exits non-zero rather than pretending to run.
"""

from __future__ import annotations

import sys


def main() -> int:
    print(
        "error: cnn-serving has no serving commands in this version yet; models exported with "
        "`python -m export` already run on onnxruntime (see README)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
