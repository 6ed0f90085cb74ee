"""The server: both gRPC APIs, health, reflection, the HTTP app (service.rest) beside them in the
same event loop, metrics, auth, TLS and a clean drain.

    python -m service serve --repository models        (see `python -m service serve --help`)

On SIGTERM or SIGINT: health turns NOT_SERVING, new RPCs get UNAVAILABLE, RPCs in flight finish
(up to --drain-timeout-s), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import loops
from service._proto.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from service._proto.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from service.config import ServeConfig, server_options
from service.core import SERVER, Core
from service.engine import Engine
from service.errors import ConfigError, Unauthenticated
from service.metrics import Metrics
from service.repository import LIVENESS  # SERVING while the process answers
from service.rest.app import HttpServer, build_app, listen
from service.servicers import classifier, inference
from service.servicers.calls import (
    GRPC_STATUS,
    HOLD_S,
    Calls,
    refuse_malformed,
    wellformed_requests,
)
from service.servicers.classifier import ClassifierServicer
from service.servicers.inference import InferenceServicer

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
QUIET_S = 0.1  # a drain stops the gRPC server once no RPC was refused for this long...
MAX_LINGER_S = 1.0  # ...or after this long
GOAWAY_FIRST_S = 0.05  # from gRPC's stop to the answers of the calls held until then
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TokenAuth(grpc.aio.ServerInterceptor):
    """Every RPC but health needs `authorization: Bearer <token>` (compared in constant time)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        return _refuse(handler)


class WellFormed(grpc.aio.ServerInterceptor):
    """Requests that are not valid protobuf are answered INVALID_ARGUMENT, not gRPC's own
    UNKNOWN with a logged traceback: those of our own services reach their handler as
    `Malformed` (a stream goes on), those of health and reflection are refused before theirs.
    Every call of our services is counted here (`cnn_serving_rpcs_received_total`), the first
    code of ours it meets: grpc drops the calls whose client has gone before they reach a
    handler, unanswered and otherwise unseen."""

    def __init__(self, apis: dict[str, str], max_fields: int, metrics: Metrics) -> None:
        self._apis = {f"/{service}/": api for service, api in apis.items()}  # prefix -> api
        self._prefixes = tuple(self._apis)
        self._max_fields = max_fields
        self._metrics = metrics
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, Any]] = {}  # wrapped, counter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        known = self._handlers.get(method)
        if known is None:
            handler = await continuation(details)
            if handler is None:  # UNIMPLEMENTED, from gRPC
                return handler
            ours = method.startswith(self._prefixes)
            guard = wellformed_requests if ours else refuse_malformed
            received = None
            if ours:
                prefix, name = method.rsplit("/", 1)
                received = self._metrics.rpcs_received.labels(self._apis[f"{prefix}/"], name)
            wrapped = guard(handler, method, self._max_fields)
            known = self._handlers[method] = (wrapped, received)
        if known[1] is not None:
            known[1].inc()
        return known[0]


def _refuse(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    error = Unauthenticated(
        "missing or wrong bearer token (send metadata 'authorization: Bearer <token>')"
    )

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(GRPC_STATUS[error.code], str(error))

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(GRPC_STATUS[error.code], str(error))
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(deny)
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


class Server:
    """The gRPC server over a core: the in-process `Engine` by default, or a front end's
    `EngineClient`."""

    def __init__(self, config: ServeConfig, engine: Core | None = None, frontend: int = 0) -> None:
        self.config = config
        self.engine = engine or Engine(config, Metrics())
        self.metrics = self.engine.metrics
        self.frontend = frontend  # N > 0: front end N of several sharing the port
        self.calls = Calls(self.engine)
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.http_port = -1
        self.metrics_port = -1
        self._http: HttpServer | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._serving: bool | None = None  # the readiness last reported, to log changes
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind, load the repository (health NOT_SERVING until done), then report ready."""
        config = self.config
        token = config.auth_token()
        apis = {
            classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name: classifier.API,
            grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name: (
                inference.API
            ),
        }
        ours = tuple(apis)
        # A request's fields, nested ones included: a Classify of --max-queue-size raw
        # tensors holds about 7 per image; a V2 request far fewer.
        max_fields = 8 * config.max_queue_size + 1024
        interceptors: list[grpc.aio.ServerInterceptor] = [
            WellFormed(apis, max_fields, self.metrics)
        ]
        if token:
            interceptors.insert(0, TokenAuth(token))
        options = server_options(config)
        if self.frontend:  # every front end listens on the same port
            options = [(k, 1 if k == "grpc.so_reuseport" else v) for k, v in options]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        self._server = server
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.calls), server
        )
        classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(self.calls), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = (
            *ours,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(services, server)
        address = f"{config.host}:{config.grpc_port}"
        tls = config.tls_credentials()
        try:
            if tls:
                credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
                self.grpc_port = server.add_secure_port(address, credentials)
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address} (gRPC): {exc}") from exc
        http_socket = None
        if config.http_port >= 0:  # bound before loading, so that a taken port fails at once
            http_socket = listen(config.host, config.http_port, shared=bool(self.frontend))
            self.http_port = http_socket.getsockname()[1]
            app = build_app(self.calls, config, self._metrics_link)
            self._http = HttpServer(app, config)
        await self.health.set(SERVER, NOT_SERVING)
        self.engine.on_model_change(self._model_health)
        if config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
        if self.frontend:  # know what is loaded before taking a share of the connections
            await self.engine.start()
        await server.start()
        if self._http is not None and http_socket is not None:
            await self._http.start(http_socket)
        if not self.frontend:
            log.info(
                "gRPC listening on %s:%d%s; metrics on :%d/metrics",
                config.host,
                self.grpc_port,
                " (TLS)" if tls else "",
                self.metrics_port,
            )
            self._log_http()
            await self.engine.start()
        await self.health.set(LIVENESS, SERVING)
        # a front end's engine may have gone again already (its listener said NOT_SERVING)
        await self._server_health()
        if self.frontend:
            log.info("front end %d serving on port %d", self.frontend, self.grpc_port)
        else:
            self._log_ready()

    def _model_health(self, name: str, serving: bool) -> None:
        """A model's health follows its versions; the server's (readiness) is recomputed on
        every change, since the last model going away makes it NOT_SERVING."""
        if name == SERVER:
            task = asyncio.get_running_loop().create_task(self._server_health())
        else:
            status = SERVING if serving and not self.engine.draining else NOT_SERVING
            task = asyncio.get_running_loop().create_task(self._set_health(name, status))
        self._tasks.add(task)  # keep a reference until it ran
        task.add_done_callback(self._tasks.discard)

    async def _set_health(self, name: str, status: int) -> None:
        """A model's health, then the server's, which may follow from it."""
        await self.health.set(name, status)
        await self._server_health()

    async def _server_health(self) -> None:
        serving = self.engine.serving
        changed = self._serving is not None and serving != self._serving
        if changed and self.engine.ready and not self.engine.draining:
            if serving:
                log.info("a model is ready: health %r SERVING", SERVER)
            else:
                log.warning("no model is ready: health %r NOT_SERVING until one is", SERVER)
        self._serving = serving
        await self.health.set(SERVER, SERVING if serving else NOT_SERVING)

    def _metrics_link(self) -> int:
        """The port of the /metrics that covers this server (the page links to it)."""
        return self.metrics_port if self.metrics_port >= 0 else self.config.engine_metrics_port

    def _log_http(self) -> None:
        if self.http_port < 0:
            log.info("HTTP off (--http-port -1)")
            return
        scheme = "https" if self.config.tls_cert else "http"
        log.info(
            "HTTP listening on %s://%s:%d (V2 REST, /v1 classify, /docs)",
            scheme,
            self.config.host,
            self.http_port,
        )

    def _log_ready(self) -> None:
        served = []
        for name in self.engine.names():
            for version in self.engine.versions(name):
                providers = self.engine.model(name, version).providers
                served.append(f"{name} v{version} on {providers[0]}")
        if not served:
            log.warning(
                "ready, but %s holds no loadable model yet; polling every %ss",
                self.config.repository,
                self.config.poll_interval_s,
            )
        log.info("ready: serving %s on port %d", "; ".join(served) or "nothing", self.grpc_port)

    async def drain(self) -> None:
        """Health NOT_SERVING, refuse new RPCs, let in-flight ones finish, stop."""
        if self.engine.draining:
            return
        self.engine.draining = True
        began = time.monotonic()
        # NOT_SERVING for the server and every model; liveness stays SERVING: the process is
        # healthy, only going away (a liveness probe must not kill it mid-drain)
        for name in (SERVER, *self.engine.names()):
            await self.health.set(name, NOT_SERVING)
        log.info(
            "draining: %d RPCs in flight (up to %ss)",
            self.calls.in_flight,
            self.config.drain_timeout_s,
        )
        if not await self.calls.wait_idle(self.config.drain_timeout_s):
            log.warning(
                "drain timeout: %d RPCs still in flight are cancelled", self.calls.in_flight
            )
        # grpc cancels (CANCELLED, not UNAVAILABLE) calls that reached it but no handler yet
        # when it stops (grpc/grpc#41785). Calls refused from now on are held in their handler
        # (`Calls.refuse`), so a client still sending has its call with us, not in that queue;
        # once none came for QUIET_S, gRPC stops (listener closed, GOAWAY sent) and only then
        # are they answered UNAVAILABLE.
        await self.calls.wait_quiet(QUIET_S, min(MAX_LINGER_S, self.config.drain_timeout_s))
        left_s = max(1.0, self.config.drain_timeout_s - (time.monotonic() - began))
        await asyncio.gather(self._stop_http(left_s), self._stop_grpc())
        await self.engine.stop()
        self.metrics.close()
        self._stopped.set()
        log.info("stopped")

    async def _stop_http(self, timeout_s: float) -> None:
        """Close the HTTP listener and idle connections; requests still running (past the
        drain's timeout) get what is left of it."""
        if self._http is not None:
            await self._http.stop(timeout_s)

    async def _stop_grpc(self) -> None:
        if self._server is None:
            return
        stopping = asyncio.ensure_future(self._server.stop(grace=HOLD_S + 1.0))
        # stop() begins at once (listener closed, GOAWAY on every connection); the held
        # answers go out a moment later, after the GOAWAY, so that a client's next call goes
        # elsewhere rather than into a queue that gRPC would cancel
        await asyncio.sleep(GOAWAY_FIRST_S)
        self.calls.closing.set()
        await stopping

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(config: ServeConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain; raises ServingError for a startup failure."""
    server = Server(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a startup error (bad port, --device cuda without CUDA) raises
            loops.freeze_startup_objects()
            await stopping
        else:  # a signal while models load: stop loading, exit cleanly
            log.info("signal received while loading; stopping")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        log.info("signal received")
    finally:
        stopping.cancel()
        await server.drain()
