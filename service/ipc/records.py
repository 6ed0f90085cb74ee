"""The records front ends and the engine exchange, each with its own encode/decode.

A frame on the wire is a 4-byte little-endian length, then a 1-byte `Kind`, then the record.
The hot ones (`Infer`, `Result`, `Failure`, `Cancel`, `Done`) are packed with `struct`; the rare
control ones (`Hello`, `Catalogue`, statistics) are JSON. Pixels never travel here: an `Infer`
names a shared-memory segment and the offset of its (n, H, W, C) uint8 images (`service.ipc.shm`).
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import (
    ControlRefused,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    QueueFull,
    ServingError,
    Unauthenticated,
    Unavailable,
)

LENGTH = struct.Struct("<I")


class Kind(enum.IntEnum):
    HELLO = 1  # front end -> engine, on every (re)connection
    CATALOGUE = 2  # engine -> front ends: what is loaded (on hello and on every change)
    INFER = 3  # front end -> engine
    RESULT = 4  # engine -> front end
    FAILURE = 5  # engine -> front end
    CANCEL = 6  # front end -> engine: the caller went away
    DONE = 7  # front end -> engine: a request finished (for ModelStatistics)
    STATS_ASK = 8  # front end -> engine
    STATS = 9  # engine -> front end
    CONTROL_ASK = 10  # front end -> engine: repository index, model load or unload
    CONTROL = 11  # engine -> front end: its answer
    APPLIED = 12  # front end -> engine: the catalogue of this generation is in force here


def frame(kind: Kind, payload: bytes) -> bytes:
    return LENGTH.pack(len(payload) + 1) + bytes((kind,)) + payload


@dataclass(frozen=True)
class Infer:
    request: int  # the front end's id for this request
    model: str
    version: int  # the version the front end resolved (and decoded the images for)
    count: int  # images, of `shape`
    shape: tuple[int, int, int]  # (H, W, C) of each image, the version's input
    segment: str  # shared-memory segment name
    offset: int  # bytes into the segment
    deadline: float  # time.monotonic() (one clock for every process); 0: none
    transient: bool  # a one-off segment: map it for this request only
    labels: int  # ModelSpec.labels_crc of the version it resolved (answers use its labels)

    _HEAD = struct.Struct("<QIIQdIIII?HB")

    def encode(self) -> bytes:
        model, segment = self.model.encode(), self.segment.encode()
        head = self._HEAD.pack(
            self.request,
            self.version,
            self.count,
            self.offset,
            self.deadline,
            *self.shape,
            self.labels,
            self.transient,
            len(model),
            len(segment),
        )
        return head + model + segment

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Infer:
        request, version, count, offset, deadline, h, w, c, labels, transient, m, s = (
            cls._HEAD.unpack_from(data)
        )
        start = cls._HEAD.size
        model = bytes(data[start : start + m]).decode()
        segment = bytes(data[start + m : start + m + s]).decode()
        shape = (h, w, c)
        return cls(
            request, model, version, count, shape, segment, offset, deadline, transient, labels
        )


@dataclass(frozen=True)
class Result:
    request: int
    probabilities: np.ndarray  # (n, K) float32
    bottleneck: np.ndarray  # (n, 2) float32

    _HEAD = struct.Struct("<QII")

    def encode(self) -> bytes:
        n, k = self.probabilities.shape
        return (
            self._HEAD.pack(self.request, n, k)
            + np.ascontiguousarray(self.probabilities, "<f4").tobytes()
            + np.ascontiguousarray(self.bottleneck, "<f4").tobytes()
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Result:
        request, n, k = cls._HEAD.unpack_from(data)
        start = cls._HEAD.size
        values = np.frombuffer(data, "<f4", count=n * (k + 2), offset=start)
        return cls(request, values[: n * k].reshape(n, k), values[n * k :].reshape(n, 2))

    def outputs(self) -> dict[str, np.ndarray]:
        return {"probabilities": self.probabilities, "bottleneck": self.bottleneck}


# The errors the engine may answer with, by their status name; anything else is INTERNAL.
ERRORS: dict[str, type[ServingError]] = {
    cls.code.name: cls
    for cls in (
        ControlRefused,  # FAILED_PRECONDITION (a failed model load too)
        InvalidInput,
        ModelNotFound,
        QueueFull,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
    )
}


@dataclass(frozen=True)
class Failure:
    request: int
    code: str  # a status name (ERRORS)
    message: str

    _HEAD = struct.Struct("<Q")

    @classmethod
    def of(cls, request: int, error: ServingError) -> Failure:
        return cls(request, error.code.name, str(error))

    def error(self) -> ServingError:
        return ERRORS.get(self.code, ServingError)(self.message)

    def encode(self) -> bytes:
        return self._HEAD.pack(self.request) + f"{self.code}\n{self.message}".encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Failure:
        (request,) = cls._HEAD.unpack_from(data)
        code, _, message = bytes(data[cls._HEAD.size :]).decode().partition("\n")
        return cls(request, code, message)


@dataclass(frozen=True)
class Cancel:
    request: int

    _HEAD = struct.Struct("<Q")

    def encode(self) -> bytes:
        return self._HEAD.pack(self.request)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Cancel:
        return cls(*cls._HEAD.unpack_from(data))


@dataclass(frozen=True)
class Done:
    """Requests of `model` `version` that finished in a front end since its last Done: how many
    succeeded and failed, and their summed durations (ns). One per version per loop turn."""

    model: str
    version: int
    ok: int
    ok_ns: int
    failed: int
    failed_ns: int

    _HEAD = struct.Struct("<IIQIQ")

    def encode(self) -> bytes:
        head = self._HEAD.pack(self.version, self.ok, self.ok_ns, self.failed, self.failed_ns)
        return head + self.model.encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Done:
        version, ok, ok_ns, failed, failed_ns = cls._HEAD.unpack_from(data)
        return cls(bytes(data[cls._HEAD.size :]).decode(), version, ok, ok_ns, failed, failed_ns)


@dataclass(frozen=True)
class Control:
    """A JSON record: Hello {index, pid}, Catalogue {ready, models}, StatsAsk {request,
    models: [[name, version], ...]}, Stats {request, stats: [Stats.to_dict(), ...]},
    ControlAsk {request, op: index|load|unload, name, ready}, Control {request, index:
    [IndexEntry.to_dict(), ...]} or {request, error: [code name, message]}."""

    body: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Control:
        return cls(json.loads(bytes(data)))
