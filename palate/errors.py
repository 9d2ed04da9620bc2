"""One exception type per layer.

Every message names the offending input and says how to fix it. The CLI prints ``str(err)`` on one
line and exits with code 2, so a user mistake never shows a traceback.
"""

from __future__ import annotations


class PalateError(Exception):
    """Base class of every error palate raises on purpose."""


class ConfigError(PalateError):
    """A configuration value, flag or YAML file is invalid."""


class EnvError(PalateError):
    """An environment id does not exist or cannot be built."""


class CheckpointError(PalateError):
    """A run directory or checkpoint is missing, incomplete or incompatible."""


class DataError(PalateError):
    """A dataset file or line is malformed; the message names file, line and field."""


class ModelError(PalateError):
    """A model file or name cannot be found or loaded."""


class PreferenceError(PalateError):
    """A label, comparison or preference-learning setting is invalid."""


class FeedbackError(PalateError):
    """The feedback service or its client was given bad input or answered with an error."""
