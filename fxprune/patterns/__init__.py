"""Built-in patterns; importing this package registers them."""
from .base import BasePattern, BlockLayout
from .nxm import NxMPattern
from .ninm import NInMPattern

__all__ = ["BasePattern", "BlockLayout", "NxMPattern", "NInMPattern"]
