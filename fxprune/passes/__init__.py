"""The pass pipeline (docs/design.md, "Pipeline"): capture (which runs the example inputs), discover,
attach, check, block_sequential, score, mask, rewrite, record (and, with ``compact=True``, the
compact pass of :mod:`.compact`)."""
from .attach import AttachPass
from .base import Pass, PassManager
from .capture import CapturePass
from .context import PruneContext, Target
from .discover import DiscoverPass
from .eager import CaptureIfNeededPass, EagerDiscoverPass
from .mask import MaskPass, mask_group
from .record import RecordPass
from .rewrite import RewritePass
from .run_inputs import RunInputsPass
from .score import CheckWeightsPass, ScorePass, score_targets
from .sequential import BlockSequentialPass

CAPTURE_PASSES = (CapturePass, DiscoverPass)
# the passes after the layers are known and their patterns attached
_AFTER_ATTACH = (CheckWeightsPass, BlockSequentialPass, ScorePass, MaskPass, RewritePass, RecordPass)
PRUNE_PASSES = (AttachPass, *_AFTER_ATTACH)
# transform's pipeline: the layers from one eager run when every group can go block by block
# (falling back to the capture passes otherwise, see passes/eager.py)
TRANSFORM_PASSES = (EagerDiscoverPass, AttachPass, CaptureIfNeededPass, *_AFTER_ATTACH)

__all__ = ["AttachPass", "BlockSequentialPass", "CaptureIfNeededPass", "CapturePass", "EagerDiscoverPass", "CheckWeightsPass", "DiscoverPass",
           "MaskPass", "Pass", "PassManager", "PruneContext", "RecordPass", "RewritePass",
           "RunInputsPass", "ScorePass", "Target", "mask_group", "score_targets", "CAPTURE_PASSES",
           "PRUNE_PASSES", "TRANSFORM_PASSES"]
