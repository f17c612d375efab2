"""fxprune: a pruning compiler for PyTorch.

    pruned = fxprune.transform(model, {"target_sparsity": 0.8, "pattern": "4x1"})
    print(fxprune.sparsity_report(pruned))
"""
from ._version import __version__
from .config import PruningConfig
from .errors import CaptureError, ConfigError, ExtensionError, FxPruneError, ReportError, WeightError
from .patterns import BasePattern, BlockLayout
from .pruner import Pruner
from .registry import PATTERNS, get_pattern, register_pattern
from .report import LayerReport, SparsityReport, sparsity_report
from .transform import capture, transform

__all__ = [
    "__version__", "transform", "capture", "sparsity_report", "SparsityReport", "LayerReport",
    "PruningConfig", "register_pattern", "get_pattern", "PATTERNS", "BasePattern", "BlockLayout",
    "FxPruneError", "ConfigError", "CaptureError", "WeightError", "ExtensionError", "ReportError",
    "Pruner",
]
