"""fxprune: a pruning compiler for PyTorch.

    pruned = fxprune.transform(model, {"target_sparsity": 0.8, "pattern": "4x1"})
    print(fxprune.sparsity_report(pruned))
"""
from ._version import __version__
from .config import PruningConfig
from .errors import CaptureError, ConfigError, ExtensionError, FxPruneError, ReportError, WeightError
from .registry import (CRITERIA, PATTERNS, get_criterion_class, get_pattern, register_criterion,
                       register_pattern)
from .patterns import BasePattern, BlockLayout, PatternNInM, PatternNxM
from .criteria import Criterion
from .pruner import Pruner
from .report import LayerReport, SparsityReport, sparsity_report
from .transform import capture, compact, transform
from .checkpoint import prune_checkpoint

__all__ = [
    "__version__", "transform", "compact", "capture", "sparsity_report", "SparsityReport", "LayerReport",
    "PruningConfig", "register_pattern", "get_pattern", "PATTERNS", "BasePattern", "BlockLayout",
    "PatternNxM", "PatternNInM", "register_criterion", "get_criterion_class", "CRITERIA", "Criterion",
    "FxPruneError", "ConfigError", "CaptureError", "WeightError", "ExtensionError", "ReportError",
    "Pruner", "prune_checkpoint",
]
