"""The front-end package: a process that runs the gRPC server (both APIs, health, reflection,
auth) and decodes images, holding no model; it reaches the one engine process through
`EngineClient`, a `Core` whose inference crosses a local socket with pixels in shared memory."""

from service.frontend.remote import EngineClient

__all__ = ["EngineClient"]
