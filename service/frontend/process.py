"""A front-end process: the gRPC server (`service.server.Server`) over an `EngineClient`.

    started by `python -m service serve --frontends N` (service.supervisor); not run by hand

It binds the shared gRPC port with SO_REUSEPORT beside the other front ends, so the kernel
spreads connections over them. SIGTERM (or the supervisor going away) drains it: health
NOT_SERVING, new RPCs UNAVAILABLE, RPCs in flight finish, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from service.config import ServeConfig
from service.frontend.remote import EngineClient
from service.ipc.link import ChildLink, child_main, child_parser, serve_child
from service.logs import configure as configure_logging
from service.metrics import Metrics
from service.server import Server

log = logging.getLogger("service.frontend.process")  # not "__main__" when run with -m


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = child_parser("python -m service.frontend.process", __doc__)
    p.add_argument("--index", type=int, required=True, help="this front end's number, from 1")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    config = ServeConfig.from_json(args.config)
    client = EngineClient(config, Metrics(args.metrics_dir), args.socket, args.segment_prefix)
    server = Server(config, client, frontend=args.index)

    async def start() -> dict[str, Any]:
        await server.start()
        return {"port": server.grpc_port}

    await serve_child(ChildLink(args.link_fd), start, server.drain)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = ServeConfig.from_json(args.config)
    configure_logging(config.log_level, f"frontend-{args.index}", config.log_format)
    return child_main(lambda: serve(args), args.link_fd, config.event_loop)


if __name__ == "__main__":
    sys.exit(main())
