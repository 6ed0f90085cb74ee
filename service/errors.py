"""The service's error taxonomy: every error a client can cause or meet, with a code of our own.

Library code raises these. Each transport maps the codes to its statuses in one table of its
own (gRPC: `service.servicers.calls.GRPC_STATUS`; HTTP: `service.rest.status.HTTP_STATUS`), and
the CLI turns an error into one line on stderr. Anything else that escapes is a bug: it is
logged with its traceback and answered INTERNAL (500) with a generic message. This module
imports no transport: the core (engine, batcher, runtime, repository, images, metrics) raises
these without knowing how the client is reached.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """What went wrong, named like gRPC's status codes (the protocol the service began with;
    `Code.X.name` is the string classifier.v1 and the V2 stream errors carry)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class ServingError(Exception):
    """Base class; `code` says what the client receives (each transport maps it)."""

    code: Code = Code.INTERNAL


class InvalidInput(ServingError):
    """The client's data is wrong: undecodable bytes, wrong shape or dtype, a pixel bomb."""

    code = Code.INVALID_ARGUMENT


class ModelNotFound(ServingError):
    """No such model, or no such version of it."""

    code = Code.NOT_FOUND


class QueueFull(ServingError):
    """The model version's request queue is at its bound; retry later."""

    code = Code.RESOURCE_EXHAUSTED


class DecodeBudgetExceeded(ServingError):
    """Decoding an image would take more memory than --decode-budget-mib leaves: now, while
    other images are decoding (retry later), or ever (the image alone needs more)."""

    code = Code.RESOURCE_EXHAUSTED


class Unavailable(ServingError):
    """The server (or the model) is not ready, or the server is draining."""

    code = Code.UNAVAILABLE


class Unauthenticated(ServingError):
    code = Code.UNAUTHENTICATED


class DeadlineExceeded(ServingError):
    """The request's deadline passed while it waited; it was dropped before computing."""

    code = Code.DEADLINE_EXCEEDED


class ConfigError(ServingError):
    """A bad option or environment value, or a device that cannot be used (startup only)."""

    code = Code.FAILED_PRECONDITION


class ModelLoadError(ServingError):
    """A model directory that cannot be served (bad metadata, unreadable ONNX, failed warm-up)."""

    code = Code.FAILED_PRECONDITION


class ControlRefused(ServingError):
    """A model load or unload asked of a server whose --model-control-mode does not take
    them (poll or none)."""

    code = Code.FAILED_PRECONDITION


class ScoringError(ServingError):
    """A directory scoring job cannot go on: its output belongs to another job, the server
    stays unreachable, an optional engine is not installed. Rows written so far are kept."""

    code = Code.FAILED_PRECONDITION


def shorten(text: str, limit: int = 100) -> str:
    """A client-supplied name as it may appear in a message (gRPC trailers are small)."""
    return text if len(text) <= limit else text[:limit] + "..."
