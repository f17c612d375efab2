"""The pass pipeline (docs/design.md, "Pipeline"): run the example inputs, capture, discover,
attach, score, mask, rewrite, record (and, with ``compact=True``, the compact pass of :mod:`.compact`)."""
from .attach import AttachPass
from .base import Pass, PassManager
from .capture import CapturePass
from .context import PruneContext, Target
from .discover import DiscoverPass
from .mask import MaskPass, mask_group
from .record import RecordPass
from .rewrite import RewritePass
from .run_inputs import RunInputsPass
from .score import ScorePass, score_targets

CAPTURE_PASSES = (RunInputsPass, CapturePass, DiscoverPass)
PRUNE_PASSES = (AttachPass, ScorePass, MaskPass, RewritePass, RecordPass)

__all__ = ["AttachPass", "CapturePass", "DiscoverPass", "MaskPass", "Pass", "PassManager",
           "PruneContext", "RecordPass", "RewritePass", "RunInputsPass", "ScorePass", "Target",
           "mask_group", "score_targets",
           "CAPTURE_PASSES", "PRUNE_PASSES"]
