"""Pruning of Hugging Face checkpoint directories larger than memory (:func:`prune_checkpoint`)."""
from .prune import REPORT_FILE, prune_checkpoint
from .shards import CheckpointError

__all__ = ["prune_checkpoint", "CheckpointError", "REPORT_FILE"]
