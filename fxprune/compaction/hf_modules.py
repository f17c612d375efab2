"""Compact classes of Hugging Face modules (see :func:`.modules.register_compact_class`), imported
only when such a module is compacted, so transformers stays optional.

``ConvNextV2GRN`` adds ``1e-6`` written in its ``forward``; :class:`CompactConvNextV2GRN` is the
same computation, op for op, with that constant read from ``self.eps``, so compaction can rescale
it (docs/compact.md, "Norms over the channels").
"""
from __future__ import annotations

import torch
from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2GRN

from .modules import register_compact_class


@register_compact_class(ConvNextV2GRN)
class CompactConvNextV2GRN(ConvNextV2GRN):
    """``ConvNextV2GRN`` with its epsilon an attribute (``eps``, 1e-6 as in the original's code)."""

    eps = 1e-6

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        global_features = torch.linalg.vector_norm(hidden_states, ord=2, dim=(1, 2), keepdim=True)
        norm_features = global_features / (global_features.mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * (hidden_states * norm_features) + self.bias + hidden_states
