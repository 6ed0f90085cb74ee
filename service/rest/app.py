"""The HTTP front door: one ASGI app (FastAPI) over the same core as the gRPC servicers, served by
uvicorn beside gRPC in every process that serves gRPC (`serve --http-port`).

- `/v2/...`: the Open Inference Protocol (KServe V2 REST) with Triton's extensions (rest/v2.py)
- `/v1/...`: classifier.v1 for people and curl (rest/v1.py)
- `/docs` (Swagger UI, vendored under rest/static, no CDN) and `/openapi.json`
- `/`: the page (rest/static/index.html)
The hot endpoint, V2 infer, is answered by a thin ASGI layer ahead of FastAPI (rest/fast.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles

from service.config import MiB, ServeConfig
from service.errors import ConfigError
from service.rest import v1, v2
from service.rest.calls import HttpCalls
from service.rest.fast import App, FastInfer
from service.rest.protocol import guarded
from service.rest.status import json_response
from service.servicers.calls import Calls

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
TITLE = "cnn-serving"


def build_app(
    calls: Calls, config: ServeConfig, metrics_port: Callable[[], int] = lambda: -1
) -> App:
    """The ASGI app: the infer fast path (rest/fast.py) in front of the FastAPI app.
    `metrics_port()`: where this server's /metrics is (-1: off), for the page's link."""
    http = HttpCalls(
        calls,
        config.auth_token(),
        config.max_message_bytes,
        config.http_body_timeout_s,
        config.http_body_budget_mib * MiB,
    )
    app = FastAPI(
        title=TITLE,
        version=_version(),
        summary="Image classifiers with a 2-D bottleneck: the Open Inference Protocol (V2) "
        "with Triton's extensions, and classifier.v1 for people.",
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(v2.router(http))
    app.include_router(v1.router(http))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        """The page: pick a model, classify images, see them on the bottleneck map."""
        body = f'<body data-metrics-port="{int(metrics_port())}">'
        return HTMLResponse(page.replace("<body>", body, 1))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{TITLE}: API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Starlette's own answers (no such route, wrong method) in our error shape."""
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        where = f"{request.method} {request.url.path[:200]}"
        answer = json_response({"error": f"{where}: {detail}"}, exc.status_code)
        answer.headers.update(exc.headers or {})  # e.g. Allow, on a 405
        return answer

    return FastInfer(app, http)


def _version() -> str:
    return metadata.version("cnn-serving")


def listen(host: str, port: int, shared: bool) -> socket.socket:
    """The HTTP listening socket; `shared`: SO_REUSEPORT beside the other front ends."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they
    # are TCP, and accepted ones inherit it; with Nagle on, an answer written in two pieces
    # (head, body) waits for the client's delayed ACK: 40 ms per keep-alive request, measured.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} (HTTP): {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


class HttpServer:
    """uvicorn (httptools) serving the app on an open socket, in the running event loop."""

    def __init__(self, app: App, config: ServeConfig) -> None:
        tls = config.tls_cert is not None
        self._config = uvicorn.Config(
            app,
            http=guarded(config.http_body_timeout_s),  # httptools with head limits (protocol.py)
            limit_concurrency=config.http_max_connections,
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            proxy_headers=False,  # no client address is used; saves a layer per request
            timeout_keep_alive=30,
            timeout_graceful_shutdown=max(math.ceil(config.drain_timeout_s), 1),
            ssl_certfile=str(config.tls_cert) if tls else None,
            ssl_keyfile=str(config.tls_key) if tls else None,
        )
        self._server = uvicorn.Server(self._config)
        self._ticks: asyncio.Future[None] | None = None

    async def start(self, sock: socket.socket) -> None:
        try:
            self._config.load()
        except (OSError, ValueError) as exc:  # a TLS file that is not a certificate or key
            raise ConfigError(f"HTTP TLS: {exc}") from exc
        server = self._server
        server.lifespan = self._config.lifespan_class(self._config)  # "off": does nothing
        await server.startup(sockets=[sock])
        # uvicorn's tick refreshes the Date header every second and stops on should_exit
        self._ticks = asyncio.ensure_future(self._server.main_loop())

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting, close idle connections, wait up to `timeout_s` for requests still
        in flight (then they are cancelled)."""
        server = self._server
        if not getattr(server, "started", False):
            return
        self._config.timeout_graceful_shutdown = max(1, math.ceil(timeout_s))
        server.should_exit = True
        if self._ticks is not None:
            await self._ticks
        await server.shutdown()
