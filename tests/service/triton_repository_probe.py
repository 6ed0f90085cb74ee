"""Run by test_model_control.py in its own process: tritonclient.grpc's repository calls.

    python tests/service/triton_repository_probe.py HOST:PORT LOADED_MODEL OTHER_MODEL > steps.json

The server runs --model-control-mode explicit with LOADED_MODEL loaded (version 2 of 1, 2
under latest:1) and OTHER_MODEL not loaded. Imports nothing from `service` (tritonclient
registers its own `inference.*` protobuf messages).
"""

from __future__ import annotations

import json
import sys

import tritonclient.grpc as triton


def main(target: str, loaded: str, other: str) -> dict:
    client = triton.InferenceServerClient(target)
    steps: dict = {"extensions": client.get_server_metadata(as_json=True)["extensions"]}
    steps["index"] = client.get_model_repository_index(as_json=True)["models"]
    ready = client.get_model_repository_index(as_json=True)  # all, then only READY ones
    steps["ready_only"] = [
        [m["name"], m["version"]] for m in ready["models"] if m.get("state") == "READY"
    ]
    before = client.is_model_ready(other)
    client.load_model(other)
    steps["second_ready"] = [before, client.is_model_ready(other)]
    client.unload_model(loaded)
    steps["after_unload"] = {
        "ready": client.is_model_ready(loaded),
        "version_2_ready": client.is_model_ready(loaded, "2"),
    }
    return steps


if __name__ == "__main__":
    json.dump(main(*sys.argv[1:4]), sys.stdout)
