"""Logs an operator can ship: --log-format json (one object per line, every process) and
--log-requests (one line per answered request, both transports)."""

from __future__ import annotations

import json
import logging
import sys
import urllib.request
from pathlib import Path

import pytest

from service.client import Client
from service.logs import JsonFormatter
from tests.conftest import MODEL, png, start_server

pytestmark = pytest.mark.usefixtures("frontends")  # both server modes


def test_json_lines_parse_and_request_lines_carry_their_fields(repository: Path, sample_images):
    served = start_server(repository, "--log-format", "json", "--log-requests")
    try:
        with Client(served.target) as client:
            assert client.classify([png(sample_images[0][0])], MODEL)[0].ok
        body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                           "shape": [1, 28, 28, 1], "data": [0] * 784}]}).encode()  # fmt: skip
        url = f"http://{served.http}/v2/models/{MODEL}/infer"
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://{served.http}/v1/models/nope", timeout=30)
    finally:
        assert served.stop() == 0
    entries = [json.loads(line) for line in served.log.text.splitlines() if line.strip()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any("ready: serving" in e["message"] for e in entries)
    requests = {(e["api"], e["method"]): e for e in entries if e["logger"] == "service.requests"}
    grpc_line = requests[("classifier.v1", "Classify")]
    assert (grpc_line["model"], grpc_line["version"], grpc_line["code"]) == (MODEL, "1", "OK")
    assert grpc_line["images"] == 1 and grpc_line["duration_ms"] > 0
    http_line = requests[("http.v2", "ModelInfer")]
    assert (http_line["code"], http_line["images"]) == ("OK", 1)
    assert requests[("http.v1", "GetModel")]["code"] == "NOT_FOUND"


def test_without_log_requests_no_request_is_logged(server):
    with Client(server.target) as client:
        client.list_models()
    assert "service.requests" not in server.log.text


def test_a_json_line_keeps_the_traceback_and_the_extra_fields():
    formatter = JsonFormatter("engine")
    try:
        raise ValueError("broken")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "batch of %d failed", (3,), sys.exc_info(),
            extra={"model": "fashion", "version": "2"},
        )  # fmt: skip
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "batch of 3 failed" and entry["process"] == "engine"
    assert (entry["model"], entry["version"], entry["level"]) == ("fashion", "2", "ERROR")
    assert "ValueError: broken" in entry["traceback"]
