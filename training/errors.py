"""Errors a user can act on. `python -m training` prints them as one line and exits non-zero."""


class TrainingError(Exception):
    """Base class: the message names the path or option and what is wrong with it."""


class DataError(TrainingError):
    """A data source is missing, unreadable or malformed."""


class ConfigError(TrainingError):
    """An option has a value that cannot work (e.g. an unknown class index)."""
