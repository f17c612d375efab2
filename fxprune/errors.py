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


class ExtensionError(FxPruneError, TypeError):
    """A user extension (a registered pattern or criterion, a ``loss_fn``) broke its contract:
    the message names the user class or callable, the layer and what it returned."""


class ReportError(FxPruneError, ValueError):
    """A stored sparsity report (JSON file, ``.pt2`` extra file, ONNX metadata) is malformed."""


def describe(e: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of a third-party or user exception, for a one-line message of ours."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:limit] if lines else '(no message)'}"
