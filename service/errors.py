"""The service's error taxonomy: every error a client can cause or meet, with its gRPC status.

Library code raises these; the servicers turn them into `context.abort(code, message)`, and the
CLI turns them into one line on stderr. Anything else that escapes is a bug: it is logged with
its traceback and answered INTERNAL with a generic message.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """Base class; `code` is the gRPC status the client receives."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(ServingError):
    """The client's data is wrong: undecodable bytes, wrong shape or dtype, a pixel bomb."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServingError):
    """No such model, or no such version of it."""

    code = grpc.StatusCode.NOT_FOUND


class QueueFull(ServingError):
    """The model version's request queue is at its bound; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DecodeBudgetExceeded(ServingError):
    """Decoding an image would take more memory than --decode-budget-mib leaves: now, while
    other images are decoding (retry later), or ever (the image alone needs more)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServingError):
    """The server (or the model) is not ready, or the server is draining."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(ServingError):
    """The request's deadline passed while it waited; it was dropped before computing."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ConfigError(ServingError):
    """A bad option or environment value, or a device that cannot be used (startup only)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelLoadError(ServingError):
    """A model directory that cannot be served (bad metadata, unreadable ONNX, failed warm-up)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ScoringError(ServingError):
    """A directory scoring job cannot go on: its output belongs to another job, the server
    stays unreachable, an optional engine is not installed. Rows written so far are kept."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def shorten(text: str, limit: int = 100) -> str:
    """A client-supplied name as it may appear in a message (gRPC trailers are small)."""
    return text if len(text) <= limit else text[:limit] + "..."
