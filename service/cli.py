"""Command-line plumbing shared by every `python -m service` command: options whose defaults
may come from CNN_SERVING_<NAME> environment variables, and the client options."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from service.config import ServeConfig

ENV_PREFIX = "CNN_SERVING_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class AppendOverDefault(argparse.Action):
    """argparse's "append", except that the command line's values replace the default (what
    the environment variable gave) instead of adding to it: the flag wins, as for any option."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        items = getattr(namespace, self.dest, None)
        items = [] if items is None or items is self.default else list(items)
        setattr(namespace, self.dest, [*items, values])


def add_option(parser: argparse._ActionsContainer, flag: str, help: str, **kwargs: Any) -> None:
    """An option whose default may come from CNN_SERVING_<NAME>; the help says both."""
    env = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
    value = os.environ.get(env)
    if value is not None:
        if kwargs.get("action") in ("store_true", argparse.BooleanOptionalAction):
            if value.lower() not in TRUE + FALSE:
                env_error(f"{env}={value!r}: use one of {', '.join(TRUE + FALSE[:-1])}")
            value = value.lower() in TRUE  # type: ignore[assignment]
        elif kwargs.get("action") == "append":  # a list: comma-separated
            value = [part.strip() for part in value.split(",") if part.strip()]  # type: ignore[assignment]
        elif "choices" in kwargs and value not in kwargs["choices"]:
            env_error(f"{env}={value!r}: choose from {', '.join(kwargs['choices'])}")
        kwargs["default"] = value  # argparse converts a string with `type`
        kwargs["required"] = False
    if kwargs.get("action") == "append":
        kwargs["action"] = AppendOverDefault
    if "metavar" not in kwargs and kwargs.get("type") in (int, float):
        units = ("ms", "s", "bytes", "pixels", "mib")
        unit = next((u for u in units if flag.endswith("-" + u)), "n")
        kwargs["metavar"] = unit.upper()
    shown = " (default: %(default)s)" if kwargs.get("default") is not None else ""
    parser.add_argument(flag, help=f"{help}{shown} [env {env}]", **kwargs)


def connection_options(p: argparse._ActionsContainer) -> None:
    add_option(p, "--tls", "connect with TLS", action="store_true")
    add_option(
        p,
        "--tls-ca",
        "PEM file of the CA to trust with --tls; default: the system's roots",
        type=Path,
        metavar="FILE",
    )
    add_option(
        p,
        "--auth-token-file",
        "send this file's content as the bearer token",
        type=Path,
        metavar="FILE",
    )
    add_option(p, "--timeout-s", "deadline of each call, in seconds", type=float, default=30.0)


def token(args: argparse.Namespace) -> str | None:
    if args.auth_token_file is None:
        return None
    return ServeConfig(Path("."), auth_token_file=args.auth_token_file).auth_token()


def make_client(args: argparse.Namespace, server: str) -> Any:
    from service.client import Client  # noqa: PLC0415 - only the client commands need it

    ca = args.tls_ca.read_bytes() if args.tls_ca else None
    return Client(
        server,
        token=token(args),
        tls=args.tls or ca is not None,
        root_certificates=ca,
        timeout_s=args.timeout_s,
    )
