"""Patterns: how a weight's 2-D view is cut into blocks. Importing this package registers the
built-in ones (``NxM`` and ``N:M`` families)."""
from .base import PATTERNS, BasePattern, BlockLayout, get_pattern_class, register_pattern
from .nxm import NxMPattern
from .ninm import NInMPattern

# The names of Intel Neural Compressor's pattern classes (``compression.pruner.patterns``), so code
# written against that API imports.
PatternNxM = NxMPattern
PatternNInM = NInMPattern

__all__ = ["PATTERNS", "BasePattern", "BlockLayout", "NInMPattern", "NxMPattern", "PatternNInM",
           "PatternNxM", "get_pattern_class", "register_pattern"]
