"""Logging set-up for the server's processes: one format, and with several processes a tag in
every line saying which one wrote it ([supervisor], [engine], [frontend-2]).

`--log-format json` writes one JSON object per line for log shippers: time (ISO 8601, UTC),
level, logger, process (the tag), message, and the fields a line carries in `extra=` (model,
version, api, code, images, duration_ms for request lines), plus the traceback when there is
one. `--log-requests` adds one such line per answered request (service.servicers.calls).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

FORMATS = ("text", "json")
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self._tag = tag

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
        }
        if self._tag:
            entry["process"] = self._tag
        entry["message"] = record.getMessage()
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, tag: str = "", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(tag))
    else:
        where = f"[{tag}] " if tag else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")
        )
    logging.basicConfig(level=level, handlers=[handler])
