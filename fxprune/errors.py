"""Exceptions raised by fxprune.

Every user-facing error derives from :class:`FxPruneError`; the message names the key, layer or
file at fault and says how to fix it.
"""


class FxPruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class ConfigError(FxPruneError, ValueError):
    """The pruning config is invalid (unknown key, bad value, selects nothing)."""


class CaptureError(FxPruneError, RuntimeError):
    """The model could not be captured as an FX graph."""


class WeightError(FxPruneError, ValueError):
    """A weight cannot be pruned as asked (NaN/inf values, unsupported layout)."""
