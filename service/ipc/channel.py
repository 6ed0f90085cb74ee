"""A framed local socket on asyncio's protocol API: frames in, frames out, at most one write
per loop turn.

Both ends are single-threaded event loops, so what a turn produces (many requests in a front
end, many answers in the engine) is joined into one write: one system call per turn, however
many requests it carries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from service.ipc.records import LENGTH, Kind, frame

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 256 * 1024 * 1024  # far above any record; a larger length is a broken peer


class Channel(asyncio.Protocol):
    """`on_frame(kind, payload)` for each frame received; `on_lost(exc)` once, when the peer
    goes away (or `close` is called)."""

    def __init__(
        self,
        on_frame: Callable[[Channel, Kind, bytes], None],
        on_lost: Callable[[Channel], None],
    ) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._inbox = bytearray()
        self._outbox: list[bytes] = []
        self._flush_armed = False
        self._closing = False
        self.closed = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        inbox = self._inbox
        inbox += data
        offset = 0
        while len(inbox) - offset >= LENGTH.size:
            (size,) = LENGTH.unpack_from(inbox, offset)
            if not 1 <= size <= MAX_FRAME_BYTES:
                log.error("broken frame of %d bytes on the local channel; closing it", size)
                self.close()
                return
            end = offset + LENGTH.size + size
            if end > len(inbox):
                break
            try:
                kind = Kind(inbox[offset + LENGTH.size])
            except ValueError:
                log.error("unknown record kind on the local channel; closing it")
                self.close()
                return
            # bytes, not a view: a record (a Result's arrays) may keep it
            self._on_frame(self, kind, bytes(inbox[offset + LENGTH.size + 1 : end]))
            offset = end
        del inbox[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.closed:
            self.closed = True
            self._on_lost(self)

    # ---- sending

    def send(self, kind: Kind, payload: bytes) -> None:
        """Queue a frame; everything queued in this loop turn goes out in one write."""
        if self.closed or self._closing:
            return
        self._outbox.append(frame(kind, payload))
        if not self._flush_armed:
            self._flush_armed = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_armed = False
        if self._transport is not None and self._outbox:
            self._transport.write(b"".join(self._outbox))
        self._outbox.clear()

    def close(self) -> None:
        if self._transport is not None and not self._closing:
            self._flush()
            self._closing = True  # nothing more is sent; connection_lost follows
            self._transport.close()
