"""`python -m service` / `cnn-serving`: the gRPC server and its command-line clients.

    python -m service serve --repository models
    python -m service classify --server localhost:8001 --model fashion shoe.png bag.jpg
    python -m service classify --repository models --model fashion --json shoe.png
    python -m service health --server localhost:8001
    python -m service score photos/ --model fashion --repository models --out scores.parquet

Every option can also be set with an environment variable CNN_SERVING_<OPTION> (for example
CNN_SERVING_MAX_BATCH_SIZE=32); a command-line option wins over the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from service import bottleneck_map, loops
from service.cli import ENV_PREFIX, add_option, connection_options, make_client
from service.config import (
    CONTROL_MODES,
    DECODE_BUDGET_MIB,
    DEVICES,
    EVENT_LOOPS,
    MAX_IMAGE_PIXELS,
    MiB,
    ServeConfig,
)
from service.cpus import available_cpus
from service.errors import ServingError
from service.predictions import Prediction
from service.scoring import cli as scoring_cli

CHUNK = 64  # images per Classify request sent by the CLI


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC and HTTP server",
        description="Serve every model in a repository over gRPC and HTTP (the Open "
        "Inference Protocol and classifier.v1), with /metrics for Prometheus.",
    )
    add_option(
        p,
        "--repository",
        "model repository: REPO/NAME/VERSION/{model.onnx,metadata.json}",
        type=Path,
        metavar="DIR",
        required="CNN_SERVING_REPOSITORY" not in os.environ,
    )
    add_option(p, "--host", "address to bind every port on", default="0.0.0.0")
    add_option(
        p,
        "--frontends",
        "front-end processes sharing the gRPC port (gRPC, decoding), beside one engine "
        "process that batches across all of them and runs onnxruntime; default: one per "
        "CPU this process may use (its affinity and cgroup CPU quota); 0: everything in one "
        "process",
        type=int,
        default=available_cpus(),
    )
    add_option(
        p,
        "--frontend-shm-mib",
        "shared memory per front end for the pixels of requests in flight, in MiB (in "
        "/dev/shm; a request that does not fit gets a segment of its own)",
        type=int,
        default=16,
    )
    add_option(p, "--grpc-port", "gRPC port; 0 picks a free one (logged)", type=int, default=8001)
    add_option(
        p,
        "--http-port",
        "HTTP port (the V2 REST API, /v1 classify, /docs), served beside gRPC by the same "
        "processes; 0 picks a free one (logged), -1 turns HTTP off",
        type=int,
        default=8000,
    )
    add_option(
        p,
        "--metrics-port",
        "Prometheus /metrics port; 0 picks a free one, -1 turns it off",
        type=int,
        default=8002,
    )
    add_option(
        p,
        "--device",
        "auto: CUDA when it really loads, else CPU (logged and exported); "
        "cuda: fail unless CUDA works; cpu",
        choices=DEVICES,
        default="auto",
    )
    add_option(p, "--max-batch-size", "most images merged into one inference", type=int, default=64)
    add_option(
        p,
        "--max-queue-delay-ms",
        "longest wait, in milliseconds, for more requests to join "
        "a batch; 0: run whatever is queued at once",
        type=float,
        default=2.0,
    )
    add_option(
        p,
        "--max-queue-size",
        "most images waiting per model version; more is refused with RESOURCE_EXHAUSTED",
        type=int,
        default=1024,
    )
    add_option(
        p,
        "--intra-op-threads",
        "onnxruntime threads per inference; 0: automatic (one for a model small enough that "
        "every batch runs on the event loop, else one per core)",
        type=int,
        default=0,
    )
    add_option(
        p,
        "--poll-interval-s",
        "with --model-control-mode poll: seconds between repository scans for new or "
        "removed versions; 0: scan once at start",
        type=float,
        default=5.0,
    )
    add_option(
        p,
        "--model-control-mode",
        "poll: load every model in the repository and follow it (new versions load, removed "
        "ones unload); explicit: load only --load-model at start, then what "
        "RepositoryModelLoad/Unload (Triton's repository API, gRPC and HTTP) ask; none: load "
        "every model once and never change",
        choices=CONTROL_MODES,
        default="poll",
    )
    add_option(
        p,
        "--load-model",
        "with --model-control-mode explicit: a model to load at start (repeat the option, or "
        "comma-separate names in the variable; '*': every model)",
        action="append",
        dest="load_models",
        metavar="NAME",
        default=[],
    )
    add_option(
        p,
        "--version-policy",
        "which versions of each model to serve, applied on every scan and load: all; "
        "latest:N (the N highest that load: a broken new version leaves the last good one "
        "serving); specific:V[,V...]. A version that falls out of the policy drains, then "
        "unloads",
        metavar="POLICY",
        default="all",
    )
    add_option(
        p,
        "--max-image-pixels",
        "largest encoded image, in pixels (width x height), checked from the header before "
        "decoding: 16,000,000 is 4000x4000 or a 12 MP photo, up to 61 MiB to decode as an RGB "
        "PNG (JPEGs are decoded at a reduced scale: far less)",
        type=int,
        default=MAX_IMAGE_PIXELS,
    )
    add_option(
        p,
        "--decode-budget-mib",
        "memory for images being decoded, in MiB, per process that decodes (each front "
        "end, or the one process of --frontends 0), estimated from each image's header "
        "before decoding: an image that does not fit beside those decoding now, or alone, "
        "is refused with RESOURCE_EXHAUSTED; at least 1 (no setting is unlimited); the "
        "default fits one image of the default --max-image-pixels in any format",
        type=int,
        default=DECODE_BUDGET_MIB,
    )
    add_option(
        p,
        "--decode-threads",
        "images decoded at once per process; 0: one per CPU this process may use (its "
        "affinity and cgroup CPU quota)",
        type=int,
        default=0,
    )
    add_option(
        p,
        "--max-message-bytes",
        "largest gRPC message either way, in bytes; larger is RESOURCE_EXHAUSTED",
        type=int,
        default=64 * MiB,
    )
    add_option(
        p,
        "--max-concurrent-streams",
        "most calls one client connection may have open at once (HTTP/2 "
        "SETTINGS_MAX_CONCURRENT_STREAMS; clients queue the rest themselves); a connection "
        "on which the server still holds that many calls (calls whose client gave up but "
        "that no handler has taken yet count too) has its new calls refused with UNAVAILABLE "
        "before any work, so one client's storm of short deadlines cannot fill the queue "
        "ahead of other clients; 0: no limit. Lower protects other clients better, but a "
        "client that opens more calls at once on a new connection gets the excess refused",
        type=int,
        default=300,
        metavar="CALLS",
    )
    add_option(
        p,
        "--max-pending-rpcs",
        "most calls, of all connections, that grpc holds for the handlers of one server "
        "process; beyond it grpc refuses new calls itself, answering CANCELLED (its choice "
        "of status); 0: grpc's default (refusing some from 1,000 on, all from 3,000)",
        type=int,
        default=10_000,
        metavar="CALLS",
    )
    add_option(
        p,
        "--drain-timeout-s",
        "on SIGTERM/SIGINT, seconds to let in-flight requests finish",
        type=float,
        default=30.0,
    )
    add_option(
        p,
        "--http-body-timeout-s",
        "longest an HTTP request's head, and then its body, may take to arrive, in seconds; "
        "a slower one is answered 408 (a client trickling bytes cannot hold a request open)",
        type=float,
        default=30.0,
    )
    add_option(
        p,
        "--http-body-budget-mib",
        "HTTP request bodies one process holds at once, in MiB (read, parsed, waiting for "
        "their answer); a body that does not fit is answered 429 (retry later)",
        type=int,
        default=512,
    )
    add_option(
        p,
        "--http-max-connections",
        "HTTP connections and requests in progress one process takes at once; more are "
        "answered 503",
        type=int,
        default=4096,
    )
    add_option(
        p,
        "--tls-cert",
        "PEM certificate chain: serve gRPC and HTTP over TLS (needs --tls-key)",
        type=Path,
        metavar="FILE",
    )
    add_option(p, "--tls-key", "PEM private key for --tls-cert", type=Path, metavar="FILE")
    add_option(
        p,
        "--auth-token-file",
        "require 'authorization: Bearer <token>' on every RPC but health, and on every HTTP "
        "request but /v2/health/*, the page and /docs; the token is this file's content",
        type=Path,
        metavar="FILE",
    )
    add_option(
        p,
        "--log-level",
        "logging threshold",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    )
    add_option(
        p,
        "--log-format",
        "text: one readable line per event; json: one JSON object per line (time, level, "
        "logger, process, message, and model/version/api/code where they apply), for log "
        "shippers",
        default="text",
        choices=("text", "json"),
    )
    add_option(
        p,
        "--event-loop",
        "the event loop of every server process: uvloop (libuv's, faster) or asyncio (the "
        "standard library's)",
        default="uvloop",
        choices=EVENT_LOOPS,
    )
    add_option(
        p,
        "--log-requests",
        "also log one line per answered request (model, version, api, method, code, images, "
        "duration); off, the request path does no logging work",
        action="store_true",
    )


def _classify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="classify image files",
        description="Classify image files with a running server (--server) or "
        "in this process (--repository); prints a table or JSON.",
    )
    from_env = any(f"{ENV_PREFIX}{n}" in os.environ for n in ("SERVER", "REPOSITORY"))
    where = p.add_mutually_exclusive_group(required=not from_env)
    add_option(where, "--server", "a running cnn-serving server", metavar="HOST:PORT")
    add_option(
        where,
        "--repository",
        "run the model in this process instead (onnxruntime, no server)",
        metavar="DIR",
        type=Path,
    )
    add_option(p, "--model", "model name", required=True)
    add_option(p, "--version", "model version; 0: the newest", type=int, default=0)
    add_option(p, "--top-k", "classes listed per image", type=int, default=3)
    add_option(
        p, "--json", "print JSON (one object per image) instead of a table", action="store_true"
    )
    add_option(
        p,
        "--plot",
        "also draw the images as marked points, labelled by file name, on the model's "
        "bottleneck map (its test set's class clouds) into this PNG file",
        type=Path,
        metavar="FILE.png",
    )
    add_option(p, "--device", "with --repository: as for serve", choices=DEVICES, default="auto")
    add_option(
        p,
        "--max-image-pixels",
        "with --repository: as for serve",
        type=int,
        default=MAX_IMAGE_PIXELS,
    )
    connection_options(p)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")


def _health_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "health",
        help="exit 0 when the server (or a model) is SERVING",
        description="Ask the gRPC health service; prints the status; exit 0 "
        "when SERVING, 1 otherwise (for container health checks).",
    )
    add_option(p, "--server", "HOST:PORT of the server", default="localhost:8001")
    add_option(
        p,
        "--model",
        "a model name instead of the whole server's readiness; 'liveness': only whether the "
        "process answers (SERVING with no model and while draining)",
        default="",
    )
    add_option(
        p,
        "--wait-s",
        "wait up to this many seconds for SERVING; 0: ask once",
        type=float,
        default=0.0,
    )
    connection_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="cnn-serving: serve exported image classifiers over gRPC.",
        epilog="Every option is also an environment variable CNN_SERVING_<OPTION>.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    _classify_parser(sub)
    _health_parser(sub)
    scoring_cli.add_parser(sub)
    return parser


def serve_config(args: argparse.Namespace) -> ServeConfig:
    names = [f for f in ServeConfig.__dataclass_fields__ if hasattr(args, f)]
    return ServeConfig(**{name: getattr(args, name) for name in names})


def run_serve(args: argparse.Namespace) -> int:
    from service.logs import configure  # noqa: PLC0415 - keeps `--help` fast

    config = serve_config(args)
    if config.frontends == 0:
        from service.server import serve  # noqa: PLC0415

        configure(config.log_level, fmt=config.log_format)
        loops.run(serve(config), config.event_loop)
    else:
        from service.supervisor import supervise  # noqa: PLC0415

        configure(config.log_level, "supervisor", config.log_format)
        loops.run(supervise(config), config.event_loop)
    return 0


def run_classify(args: argparse.Namespace) -> int:
    images = []
    for path in args.images:
        try:
            images.append(path.read_bytes())
        except OSError as exc:
            raise ServingError(f"{path}: {exc.strerror}") from exc
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise ServingError(f"--plot {args.plot}: the plot is a PNG file (name it FILE.png)")
    found = None
    if args.server:
        with make_client(args, args.server) as client:
            predictions = []
            for start in range(0, len(images), CHUNK):
                answers = client.classify(
                    images[start : start + CHUNK], args.model, args.version, args.top_k
                )
                predictions += [replace(p, index=p.index + start) for p in answers]
            if args.plot is not None:
                info = client.get_model(args.model, predictions[0].version)
                found = bottleneck_map.Found(info.bottleneck_map, info.map_absent_reason)
    else:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
        predictions, found = asyncio.run(_classify_locally(args, images))
    predictions = [_with_id(p, str(path)) for p, path in zip(predictions, args.images, strict=True)]
    print(_as_json(predictions) if args.json else _as_table(predictions), flush=True)
    if args.plot is not None and found is not None:
        bottleneck_map.plot_images(args.plot, found, predictions, f"{args.model}")
        print(f"plot: {args.plot}", file=sys.stderr, flush=True)
    return 0 if all(p.ok for p in predictions) else 1


async def _classify_locally(
    args: argparse.Namespace, images: list[bytes]
) -> tuple[list[Prediction], bottleneck_map.Found]:
    from service.engine import Engine  # noqa: PLC0415

    config = ServeConfig(
        args.repository,
        device=args.device,
        poll_interval_s=0,
        max_batch_size=max(1, min(len(images), CHUNK)),
        max_image_pixels=args.max_image_pixels,
    )
    engine = Engine(config)
    try:
        await engine.start()
        model = engine.model(args.model, args.version or None)
        predictions = []
        for start in range(0, len(images), CHUNK):
            answers = await engine.classify(model, images[start : start + CHUNK], args.top_k)
            predictions += [replace(p, index=p.index + start) for p in answers]
        return predictions, bottleneck_map.load(model.spec)
    finally:
        await engine.stop()


def _with_id(prediction: Prediction, path: str) -> Prediction:
    return replace(prediction, id=path)


def _as_json(predictions: list[Prediction]) -> str:
    rows = []
    for p in predictions:
        row: dict[str, Any] = {"image": p.id, "model": p.model, "version": p.version}
        if p.ok:
            row |= {
                "label": p.label,
                "confidence": p.confidence,
                "top_k": [{"label": s.label, "score": s.score} for s in p.top_k],
                "probabilities": list(p.probabilities),
                "bottleneck": {"x": p.bottleneck_x, "y": p.bottleneck_y},
            }
        else:
            row["error"] = {"code": p.error_code, "message": p.error}
        rows.append(row)
    return json.dumps(rows, indent=2)


def _as_table(predictions: list[Prediction]) -> str:
    width = max(len("image"), *(len(p.id) for p in predictions))
    lines = [
        f"{'image':<{width}}  {'label':<14} {'conf':>6} {'bottleneck x':>13} "
        f"{'bottleneck y':>13}  top-k"
    ]
    for p in predictions:
        if not p.ok:
            lines.append(f"{p.id:<{width}}  error {p.error_code}: {p.error}")
            continue
        top = ", ".join(f"{s.label} {s.score:.3f}" for s in p.top_k)
        lines.append(
            f"{p.id:<{width}}  {p.label:<14} {p.confidence:>6.3f} "
            f"{p.bottleneck_x:>13.3f} {p.bottleneck_y:>13.3f}  {top}"
        )
    return "\n".join(lines)


def run_health(args: argparse.Namespace) -> int:
    with make_client(args, args.server) as client:
        if args.wait_s > 0:
            client.wait_ready(args.wait_s, args.model)
        status = client.health(args.model)
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "serve": run_serve,
        "classify": run_classify,
        "health": run_health,
        "score": scoring_cli.run,
    }
    try:
        return commands[args.command](args)
    except ServingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # ClientError and friends: one line, not a traceback
        from service.client import ClientError  # noqa: PLC0415

        if isinstance(exc, ClientError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
