"""Logging set-up for the server's processes: one format, and with several processes a tag in
every line saying which one wrote it ([supervisor], [engine], [frontend-2])."""

from __future__ import annotations

import logging
import sys


def configure(level: str, tag: str = "") -> None:
    where = f"[{tag}] " if tag else ""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s",
    )
