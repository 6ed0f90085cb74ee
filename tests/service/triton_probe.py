"""Run by test_triton.py in its own process: Triton's client against our server.

    python tests/service/triton_probe.py HOST:PORT MODEL IMAGES.npy PNG_DIR > answers.json

tritonclient registers its own `inference.*` protobuf messages, so it must not share a process
with our generated V2 module; this script imports nothing from `service`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(target: str, model: str, images_file: str, png_dir: str) -> dict:
    client = triton.InferenceServerClient(target)
    images = np.load(images_file)  # (N, H, W, C) uint8
    pngs = [p.read_bytes() for p in sorted(Path(png_dir).glob("*.png"))]
    answers: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "server": client.get_server_metadata(as_json=True),
        "metadata": client.get_model_metadata(model, as_json=True),
        "config": client.get_model_config(model, as_json=True),
    }
    pixels = triton.InferInput("images", list(images.shape), "UINT8")
    pixels.set_data_from_numpy(images)
    result = client.infer(model, [pixels])
    answers["uint8"] = {name: result.as_numpy(name).tolist()
                        for name in ("probabilities", "bottleneck")}  # fmt: skip
    # Triton's classification extension: the top 3 as "score:index:label"
    wanted = [triton.InferRequestedOutput("probabilities", class_count=3)]
    top = client.infer(model, [pixels], outputs=wanted).as_numpy("probabilities")
    answers["classification"] = [[item.decode() for item in row] for row in top]
    encoded = triton.InferInput("images", [len(pngs)], "BYTES")
    encoded.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    wanted = [triton.InferRequestedOutput("bottleneck")]
    result = client.infer(model, [encoded], outputs=wanted, model_version="1")
    answers["bytes"] = {"bottleneck": result.as_numpy("bottleneck").tolist(),
                        "probabilities": result.as_numpy("probabilities") is None}  # fmt: skip
    try:
        client.infer("no-such-model", [pixels])
    except InferenceServerException as exc:
        answers["error"] = {"status": exc.status(), "message": exc.message()}
    answers["stream"] = stream(client, model, images)
    answers["statistics"] = client.get_inference_statistics(model, as_json=True)
    return answers


def stream(client: triton.InferenceServerClient, model: str, images: np.ndarray) -> list:
    """start_stream / async_stream_infer: one image per request, a bad model name in the
    middle, the last request asking for Triton's final-response flag."""
    answers: list = []

    def received(result, error) -> None:  # type: ignore[no-untyped-def]
        if error is not None:
            answers.append({"error": error.message()})
            return
        response = result.get_response()
        final = response.parameters.get("triton_final_response")
        answers.append({
            "id": response.id,
            "probabilities": result.as_numpy("probabilities").tolist(),
            "final": final.bool_param if final is not None else None,
        })  # fmt: skip

    client.start_stream(callback=received)
    for i, image in enumerate(images):
        pixels = triton.InferInput("images", [1, *image.shape], "UINT8")
        pixels.set_data_from_numpy(image[np.newaxis])
        last = i == len(images) - 1
        client.async_stream_infer(
            model, [pixels], request_id=f"r{i}", enable_empty_final_response=last
        )
        if i == 1:
            client.async_stream_infer("no-such-model", [pixels], request_id="bad")
    client.stop_stream()  # waits for every answer
    return answers


if __name__ == "__main__":
    json.dump(main(*sys.argv[1:5]), sys.stdout)
