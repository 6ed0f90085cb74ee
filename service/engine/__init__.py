"""The engine package: model versions, batching and onnxruntime (`Engine`), and the engine
process that serves front-end processes over a local socket (`service.engine.host`)."""

from service.core import ImageInput, Model, Stats
from service.engine.core import Engine, LoadedModel

__all__ = ["Engine", "ImageInput", "LoadedModel", "Model", "Stats"]
