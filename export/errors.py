"""Errors a user can act on; `python -m export` prints them as one line and exits non-zero."""


class ExportError(Exception):
    """The run, the repository or the exported model is not what it must be."""


class ParityError(ExportError):
    """Keras, the SavedModel and onnxruntime disagree beyond the tolerance."""
