"""`ServeConfig`: every setting of the server, frozen, built once by `python -m service serve`
from options and `CNN_SERVING_<NAME>` environment variables. Components receive it in their
constructor and never read the environment themselves."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from imaging.policy import MAX_IMAGE_PIXELS
from service.errors import ConfigError
from service.repository import VersionPolicy

DEVICES = ("auto", "cuda", "cpu")
# Triton's names: poll the repository (load what appears, unload what goes), load only what
# --load-model and RepositoryModelLoad name, or load everything once and change nothing.
EVENT_LOOPS = ("uvloop", "asyncio")  # --event-loop
CONTROL_MODES = ("poll", "explicit", "none")
MiB = 1024 * 1024
# MAX_IMAGE_PIXELS (16 MP, the image policy's default, training's too): decoding one image
# of that size costs up to 61 MiB (RGB PNG) or 244 MiB (lossless WebP), so every image it
# allows fits alone in the default decode budget (bench/decode_memory.py).
DECODE_BUDGET_MIB = 256


@dataclass(frozen=True)
class ServeConfig:
    repository: Path
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    http_port: int = 8000  # -1: no HTTP
    metrics_port: int = 8002  # -1: no metrics endpoint
    device: str = "auto"
    max_batch_size: int = 64
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 1024  # images waiting per model version
    intra_op_threads: int = 0  # 0: 1 for a model whose batches all run inline, else one per core
    poll_interval_s: float = 5.0  # 0: load the repository once, never poll
    model_control_mode: str = "poll"  # CONTROL_MODES
    load_models: tuple[str, ...] = ()  # explicit mode: loaded at start ("*": every model)
    version_policy: str = "all"  # VersionPolicy: all, latest:N, specific:V,V
    max_image_pixels: int = MAX_IMAGE_PIXELS
    decode_budget_mib: int = DECODE_BUDGET_MIB  # decoded pixels in flight per process
    decode_threads: int = 0  # per process; 0: one per CPU the process may use
    max_message_bytes: int = 64 * MiB
    max_concurrent_streams: int = 300  # per HTTP/2 connection; 0: no limit (grpc's default)
    max_pending_rpcs: int = 10_000  # calls grpc holds for the handlers; 0: grpc's (1-3k)
    drain_timeout_s: float = 30.0
    http_body_timeout_s: float = 30.0  # longest an HTTP request head or body may take
    http_body_budget_mib: int = 512  # HTTP request bodies held at once, per process
    http_max_connections: int = 4096  # per process; more are answered 503
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_token_file: Path | None = None
    frontends: int = 0  # front-end processes beside one engine process; 0: one process
    frontend_shm_mib: int = 16  # each front end's shared-memory arena for pixels
    # Not an option: set by the supervisor for its front ends, which serve no /metrics
    # themselves: where the engine serves it (the page at / links to it). -1: nowhere.
    engine_metrics_port: int = -1
    log_level: str = "INFO"
    log_format: str = "text"  # or json: one object per line
    log_requests: bool = False  # one log line per answered request
    event_loop: str = "uvloop"  # EVENT_LOOPS: every server process's

    def __post_init__(self) -> None:
        checks = [
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
            (self.log_format in ("text", "json"), "--log-format must be text or json"),
            (self.event_loop in EVENT_LOOPS, "--event-loop must be uvloop or asyncio"),
            (0 <= self.frontends <= 256, "--frontends must be 0-256 (0: a single process)"),
            (self.frontend_shm_mib >= 1, "--frontend-shm-mib must be at least 1"),
            (0 <= self.grpc_port <= 65535, "--grpc-port must be 0-65535 (0: pick a free port)"),
            (-1 <= self.http_port <= 65535, "--http-port must be -1 (off) or 0-65535"),
            (-1 <= self.metrics_port <= 65535, "--metrics-port must be -1 (off) or 0-65535"),
            (self.max_batch_size >= 1, "--max-batch-size must be at least 1"),
            (self.max_queue_delay_ms >= 0, "--max-queue-delay-ms must be >= 0"),
            (self.max_queue_size >= 1, "--max-queue-size must be at least 1"),
            (self.intra_op_threads >= 0, "--intra-op-threads must be >= 0"),
            (self.poll_interval_s >= 0, "--poll-interval-s must be >= 0"),
            (
                self.model_control_mode in CONTROL_MODES,
                f"--model-control-mode must be one of {', '.join(CONTROL_MODES)}",
            ),
            (
                not self.load_models or self.model_control_mode == "explicit",
                "--load-model needs --model-control-mode explicit (the other modes load "
                "every model in the repository)",
            ),
            (self.max_image_pixels >= 1, "--max-image-pixels must be at least 1"),
            (self.decode_budget_mib >= 1, "--decode-budget-mib must be at least 1 (MiB)"),
            (0 <= self.decode_threads <= 1024, "--decode-threads must be 0-1024 (0: one per CPU)"),
            (self.max_message_bytes >= 1024, "--max-message-bytes must be at least 1024"),
            (
                self.max_concurrent_streams >= 0,
                "--max-concurrent-streams must be >= 0 (0: no limit)",
            ),
            (self.max_pending_rpcs >= 0, "--max-pending-rpcs must be >= 0 (0: grpc's default)"),
            (self.drain_timeout_s >= 0, "--drain-timeout-s must be >= 0"),
            (self.http_body_timeout_s > 0, "--http-body-timeout-s must be > 0"),
            (self.http_body_budget_mib >= 1, "--http-body-budget-mib must be at least 1"),
            (self.http_max_connections >= 1, "--http-max-connections must be at least 1"),
            (
                (self.tls_cert is None) == (self.tls_key is None),
                "--tls-cert and --tls-key go together",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        VersionPolicy.parse(self.version_policy)  # ConfigError saying what is wrong
        object.__setattr__(self, "load_models", tuple(self.load_models))  # from JSON or a list

    @property
    def versions(self) -> VersionPolicy:
        return VersionPolicy.parse(self.version_policy)

    def to_json(self) -> str:
        """For a child process (`from_json`)."""
        values = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        return json.dumps(values)

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        values: dict[str, Any] = json.loads(text)
        paths = {f.name for f in fields(cls) if "Path" in str(f.type)}
        for name in paths:
            if values.get(name) is not None:
                values[name] = Path(values[name])
        return cls(**values)

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0

    def auth_token(self) -> str | None:
        """The bearer token, read from --auth-token-file (surrounding whitespace stripped)."""
        if self.auth_token_file is None:
            return None
        try:
            token = self.auth_token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--auth-token-file {self.auth_token_file}: {exc.strerror}") from exc
        if not token:
            raise ConfigError(f"--auth-token-file {self.auth_token_file} is empty")
        return token

    def tls_credentials(self) -> tuple[bytes, bytes] | None:
        """(certificate chain, private key) PEM bytes, or None without TLS."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        try:
            return self.tls_cert.read_bytes(), self.tls_key.read_bytes()
        except OSError as exc:
            raise ConfigError(f"TLS: {exc.filename}: {exc.strerror}") from exc


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options for the server and our client alike: the same message limit both ways, and
    no SO_REUSEPORT (a second server on a busy port must fail, not silently share its traffic;
    a client ignores the option)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def server_options(config: ServeConfig) -> list[tuple[str, int]]:
    """`channel_options` plus what only a server sets: how many streams one connection may hold
    (grpc refuses more with REFUSED_STREAM, which clients see as UNAVAILABLE, before any of
    our code runs; calls whose client has gone but that no handler has taken yet still count)
    and how many calls grpc holds for the handlers in all before it refuses new ones itself
    (with CANCELLED, see docs/reliability.md, "Short deadlines and overload")."""
    options = channel_options(config.max_message_bytes)
    if config.max_concurrent_streams:
        options += [
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            ("grpc.http2.max_concurrent_streams_overload_protection", 1),
        ]
    if config.max_pending_rpcs:
        options += [
            ("grpc.server.max_pending_requests", config.max_pending_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", config.max_pending_rpcs),
        ]
    return options


ENGINES = ("local", "remote", "ray")
MAX_WORKERS = 256  # decoding processes, requests in flight or actors: more only wait for cores


@dataclass(frozen=True)
class ScoreConfig:
    """A directory scoring job (`python -m service score`). The engine: `local` needs
    `repository`, `remote` needs `server` (connection settings go to the Client), `ray` needs
    `repository` and joins `ray_address` (None: a local Ray)."""

    directory: Path
    model: str
    out: Path
    engine: str = "local"
    version: int = 0  # 0: the newest
    repository: Path | None = None
    server: str | None = None
    ray_address: str | None = None
    batch_size: int = 64
    workers: int = 0  # 0: one per CPU this process may use (local, ray), 4 in flight (remote)
    recursive: bool = True
    limit: int = 0  # 0: every file; N: the first N image files of the walk
    overwrite: bool = False
    device: str = "auto"
    intra_op_threads: int = 0  # local engine; 0: the cores the decoders leave, at least 1
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_message_bytes: int = 64 * MiB
    chunk_rows: int = 1000  # rows per chunk written while the job runs
    chunk_interval_s: float = 10.0  # ... or a chunk at least this often
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}"),
            (self.version >= 0, "--version must be >= 0 (0: the newest)"),
            (
                self.engine == "remote" or self.repository is not None,
                f"--engine {self.engine} needs --repository",
            ),
            (self.engine != "remote" or bool(self.server), "--engine remote needs --server"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.workers >= 0, "--workers must be >= 0 (0: automatic)"),
            (self.workers <= MAX_WORKERS, f"--workers must be at most {MAX_WORKERS}"),
            (self.limit >= 0, "--limit must be >= 0 (0: every file)"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
            (self.intra_op_threads >= 0, "--intra-op-threads must be >= 0"),
            (self.max_image_pixels >= 1, "--max-image-pixels must be at least 1"),
            (self.max_message_bytes >= 1024 * 1024, "--max-message-bytes must be at least 1 MiB"),
            (self.chunk_rows >= 1 and self.chunk_interval_s > 0, "chunks must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
