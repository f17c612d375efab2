"""``activation`` (Wanda, Sun et al. 2023): score = |W| x the L2 norm of the weight's input feature.

One pass over the calibration batches keeps a running sum of squares per input feature of every
selected layer (O(input features) memory per layer, no stored activations):

- linear kinds: feature ``j`` of the ``[..., in]`` input, over every token / row;
- convolutions: input *channel* ``c``, over every sample and pixel of the conv input; the norm is
  broadcast over the kernel positions, consistently with the view's kernel-major, channel-minor
  columns (``view[o, kpos * Cin_g + c]`` multiplies channel ``g(o) * Cin_g + c``).

A weight used by several calls (tied) sums the squares over all of them. Scores are
``|w| * sqrt(sum of squares)`` in float32, so within a layer the ranking is Wanda's; across layers
(global scope) the norms are not normalised by the token count, as in the paper's definition.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import WeightError
from .base import Criterion, register_criterion
from .calibration import WeightCall, record_inputs, require_data
from .features import conv_input, linear_features


@register_criterion("activation")
class ActivationCriterion(Criterion):
    needs_data = True
    one_shot_only = True
    zero_weights_score_zero = True   # |0| x norm

    def __init__(self, group=None):
        super().__init__(group)
        self.sumsq: dict[str, Tensor] = {}
        self.geometry = {}

    def prepare(self, ctx) -> None:
        require_data(ctx, self.name or "activation")
        targets = ctx.selected(self.group)
        self.geometry = {t.param: t.geometry for t in targets}
        self.sumsq = {}
        record_inputs(ctx, targets, self.observe, desc=f"{self.name}: calibration")

    def observe(self, call: WeightCall) -> None:
        t = call.target
        geom = t.geometry
        if call.conv is not None:
            x = conv_input(call.x, geom).float()
            s = x.pow(2).sum(dim=[0, *range(2, x.dim())])          # [Cin]
        else:
            s = linear_features(call.x, geom, t.name).pow(2).sum(dim=0)  # [in]
        prev = self.sumsq.get(t.param)
        self.sumsq[t.param] = s if prev is None else prev + s

    def feature_norms(self, param_name: str) -> Tensor:
        """``[rows, cols]`` float32 (a broadcast view): the input norm each weight of the view
        multiplies. Raises when a norm is not finite."""
        geom = self.geometry[param_name]
        norm = self.sumsq[param_name].sqrt()
        # checked before the broadcast: once per input feature, not once per weight
        if not bool(torch.isfinite(norm).all()):
            raise WeightError(f"the calibration inputs of {param_name} have NaN/inf values (or their "
                              f"squares overflow float32); check the model and the batches")
        rows, cols = geom.view_shape
        if geom.kind != "conv":
            return norm.reshape(1, cols).expand(rows, cols)
        g, cin_g, k = geom.groups, geom.in_channels_per_group, geom.kernel_numel
        per_group = norm.reshape(g, 1, cin_g).expand(g, k, cin_g).reshape(g, 1, k * cin_g)
        return per_group.expand(g, rows // g, k * cin_g).reshape(rows, cols)

    def view_scores(self, param_name: str, weight_view: Tensor) -> Tensor:
        norms = self.feature_norms(param_name).to(weight_view.device)
        return weight_view.detach().float().abs() * norms
