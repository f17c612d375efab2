"""Channel compaction: find the output channels that can be removed together, and remove them.

- :mod:`.values`: atoms (removable channels), their union-find, what is known of each tensor;
- :mod:`.analysis`: :class:`ChannelAnalysis`, one walk over the ATen graph applying the rules;
- :mod:`.rules`: the rules registry (:func:`register_rule`: add a rule for your own op);
  built-in rules in :mod:`.ops` and :mod:`.layout`, norms averaging over the channels (RMSNorm,
  GRN: epsilon and weight rescaled) in :mod:`.folds`;
- :mod:`.classes`: the coupled classes as arrays (:class:`ChannelClasses`), scored and ranked;
- :mod:`.plan`: coupled classes selected by score (:func:`plan_channels`) or found zero in an
  already-pruned model (:func:`plan_zero_channels`);
- :mod:`.slicing`: physical removal on the user's modules, with undo;
- :mod:`.modules`: modules swapped in where the original cannot run compacted sizes
  (:class:`CompactMultiheadAttention`) or writes a constant that must be rescaled
  (:func:`register_compact_class`: a compact class for your own module; Hugging Face's in
  :mod:`.hf_modules`);
- :mod:`.apply`: zero, slice, verify against the masked model, report;
- :mod:`.hf_config`: a Hugging Face model's config follows the compacted sizes.

``fxprune.compact(model, example_inputs)`` compacts an already-pruned model;
``fxprune.transform(..., compact=True)`` prunes and compacts in one go.
"""
from .analysis import ChannelAnalysis
from .apply import compact_model, nothing_to_compact, summary, zero_removed
from .hf_config import update_hf_configs
from .plan import (CompactionPlan, joint_selection, output_dim, plan_channels, plan_from_masks,
                   plan_zero_channels, select_classes)
from .modules import COMPACT_CLASSES, CompactMultiheadAttention, register_compact_class
from .rules import RULES, find_rule, keep, nonzero_reason, register_rule, unknown_op, where, whole_along
from .values import Chan, ParamRef

__all__ = ["COMPACT_CLASSES", "RULES", "Chan", "ChannelAnalysis", "CompactMultiheadAttention", "CompactionPlan", "ParamRef", "compact_model",
           "find_rule", "joint_selection", "keep", "nonzero_reason", "nothing_to_compact",
           "output_dim", "plan_channels", "plan_from_masks", "plan_zero_channels", "register_compact_class", "register_rule", "select_classes", "summary",
           "unknown_op", "update_hf_configs", "where", "whole_along", "zero_removed"]
