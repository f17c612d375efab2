"""Errors raised by ``fxprune.export``."""
from __future__ import annotations

from fxprune.errors import FxPruneError


class ExportError(FxPruneError):
    """The model could not be exported: bad path, wrong example inputs, exporter failure."""


class ValidationError(FxPruneError):
    """The exported file failed validation.

    ``checks`` holds every check (passed and failed); ``result`` is the ``ExportResult``
    of the export that failed (the file is left on disk so it can be inspected).
    """

    def __init__(self, message: str, checks=(), result=None):
        super().__init__(message)
        self.checks = list(checks)
        self.result = result
