"""``sparse_gpt`` (SparseGPT, Frantar & Alistarh 2023): OBS saliency for the masks, then an OBS
update of the kept weights that compensates for the pruned ones.

Per layer, ``H = X^T X / n`` over the calibration inputs ``X`` of the weight's 2-D view (linear:
``[tokens, in]``; convolution: unfolded patches, kernel-major, channel-minor, one Hessian per conv
group), dampened by ``percdamp`` x mean(diag H), and ``U`` the upper Cholesky factor of ``H^-1``.

1. :meth:`prepare` / :meth:`view_scores`: score ``w^2 / U_jj^2`` (SparseGPT's saliency, the OBS
   error of removing ``w`` when columns are processed left to right). The group's pattern turns
   the scores into masks like any criterion's, so every pattern, scope and max/min rule applies
   and counts are exact.
2. :meth:`update_weights` (called by the rewrite pass with the masks): SparseGPT's column-by-column
   OBS update with lazy batches of ``blocksize`` columns, for the pattern's fixed mask. Pruned
   weights end exactly zero; the kept ones absorb the error.

Memory is bounded: Hessians are collected for a chunk of layers at a time (at most
``max_hessian_bytes`` per chunk, one calibration pass per chunk) and freed once used; only the
``U_jj`` diagonals (O(columns) per layer) are kept between scoring and updating. With
``sequential`` (the default) the update runs layer by layer in graph order, each layer's Hessian
measured on the model whose earlier layers are already pruned and updated (the paper's
sequential mode); each such pass stops the forward right after the layer. Calibration batches
are iterated several times, so a one-shot iterator is kept as a list.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import WeightError
from ..geometry import from_view_2d, to_view_2d
from .base import Criterion, register_criterion
from .calibration import WeightCall, record_inputs, require_data, reusable
from .features import accumulate_hessian, group_of_rows, iter_conv_patches, linear_features


@register_criterion("sparse_gpt")
class SparseGPTCriterion(Criterion):
    needs_data = True
    one_shot_only = True
    zero_weights_score_zero = True   # 0^2 / d^2
    percdamp = 0.01               # dampening: percdamp x mean(diag(H)) added to the diagonal
    blocksize = 128               # lazy-batch width of the OBS update
    max_hessian_bytes = 1 << 30   # Hessians held at once (one calibration pass per chunk)
    sequential = True             # update layer by layer on the progressively pruned model

    def __init__(self, group=None):
        super().__init__(group)
        self.diag: dict[str, Tensor] = {}       # param -> [groups, cols] U_jj
        self.batches = None

    # ------------------------------------------------------------------ scores
    def prepare(self, ctx) -> None:
        require_data(ctx, self.name or "sparse_gpt")
        self.batches = reusable(ctx.calibration)
        targets = ctx.selected(self.group)
        chunks = self._chunks(targets)
        for i, chunk in enumerate(chunks):
            desc = f"{self.name}: Hessians" + (f" {i + 1}/{len(chunks)}" if len(chunks) > 1 else "")
            hessians = self._collect(ctx, chunk, desc, stop_early=len(chunks) > 1)
            for t in chunk:
                u = inverse_hessian_factor(hessians.pop(t.param), self.percdamp, t.name)
                self.diag[t.param] = u.diagonal(dim1=-2, dim2=-1).clone()

    def view_scores(self, param_name: str, weight_view: Tensor) -> Tensor:
        d = self.diag[param_name].to(weight_view.device)
        w = group_of_rows(weight_view.detach().float(), d.shape[0])
        return (w.pow(2) / d.unsqueeze(1).pow(2)).reshape(weight_view.shape)

    # ------------------------------------------------------------------ weight update
    def update_weights(self, ctx, targets) -> None:
        targets = list(targets)
        chunks = [[t] for t in targets] if self.sequential else self._chunks(targets)
        for i, chunk in enumerate(chunks):
            desc = f"{self.name}: update {i + 1}/{len(chunks)}"
            hessians = self._collect(ctx, chunk, desc, stop_early=True)
            for t in chunk:
                u = inverse_hessian_factor(hessians.pop(t.param), self.percdamp, t.name)
                self._update_layer(ctx, t, u)
        self.diag.clear()

    def _update_layer(self, ctx, t, u: Tensor) -> None:
        weight = ctx.model.get_parameter(t.param)
        groups = u.shape[0]
        view = group_of_rows(to_view_2d(weight.detach(), t.geometry).float(), groups)
        pruned = group_of_rows(~ctx.masks[t.param].to(view.device), groups)
        new = torch.stack([obs_prune(view[g], pruned[g], u[g], self.blocksize) for g in range(groups)])
        if not bool(torch.isfinite(new).all()):
            raise WeightError(f"sparse_gpt produced non-finite weights for {t.name}; raise "
                              f"SparseGPTCriterion.percdamp or check the calibration data")
        new = new.reshape(t.geometry.view_shape)
        with torch.no_grad():
            weight.copy_(from_view_2d(new, t.geometry).to(dtype=weight.dtype))

    # ------------------------------------------------------------------ Hessians
    def _chunks(self, targets) -> list[list]:
        chunks, size = [[]], 0
        for t in targets:
            nbytes = _hessian_bytes(t)
            if chunks[-1] and size + nbytes > self.max_hessian_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(t)
            size += nbytes
        return [c for c in chunks if c]

    def _collect(self, ctx, targets, desc: str, stop_early: bool) -> dict[str, Tensor]:
        hessians: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for t in targets:
            cols, groups = t.geometry.view_shape[1], _groups(t)
            hessians[t.param] = torch.zeros(groups, cols, cols, dtype=torch.float32,
                                            device=ctx.model.get_parameter(t.param).device)
            counts[t.param] = 0

        def observe(call: WeightCall) -> None:
            t = call.target
            h = hessians[t.param]
            if call.conv is None:
                feats = linear_features(call.x, t.geometry, t.name).unsqueeze(1)  # [P, 1, in]
                accumulate_hessian(h, feats)
                counts[t.param] += feats.shape[0]
            else:
                for feats in iter_conv_patches(call.x, t.geometry, call.conv):
                    accumulate_hessian(h, feats)
                    counts[t.param] += feats.shape[0]

        record_inputs(ctx, targets, observe, desc, batches=self.batches, stop_early=stop_early)
        for name, h in hessians.items():
            h.div_(max(counts[name], 1))
        return hessians


def inverse_hessian_factor(H: Tensor, percdamp: float, name: str = "") -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` per group (``[groups, cols, cols]``).

    Columns whose input is always zero ("dead") get ``H_jj = 1`` so ``H`` stays invertible; their
    row of ``U`` then carries no update to other columns. A factorization that fails is retried
    with ten times the dampening, up to four times.
    """
    H = H.clone()
    cols = H.shape[-1]
    idx = torch.arange(cols, device=H.device)
    for g in range(H.shape[0]):
        dead = H[g, idx, idx] == 0
        H[g, idx[dead], idx[dead]] = 1.0
    mean_diag = H[:, idx, idx].mean(dim=1, keepdim=True)
    damp = percdamp
    for _ in range(5):
        Hd = H.clone()
        Hd[:, idx, idx] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info.abs().sum()) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info.abs().sum()) == 0 and bool(torch.isfinite(U).all()):
                return U
        damp *= 10
    raise WeightError(f"sparse_gpt: the Hessian of {name} is not positive definite even with "
                      f"dampening {damp / 10:g}; check the calibration data")


def obs_prune(W: Tensor, pruned: Tensor, U: Tensor, blocksize: int = 128) -> Tensor:
    """SparseGPT's OBS update of ``W`` (``[rows, cols]``, float32) for a fixed ``pruned`` mask.

    Columns are processed left to right; removing column ``i``'s pruned weights spreads their
    error ``w / U_ii`` over the later columns through row ``i`` of ``U``. Within a block of
    ``blocksize`` columns the update is applied column by column, to the later blocks in one
    matrix product. Returns a new tensor; pruned weights are exactly zero.
    """
    W = W.clone()
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        P1 = pruned[:, i1:i2]
        U1 = U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if not bool(P1[:, i].any()):
                continue
            e = torch.where(P1[:, i], W1[:, i], 0.0) / U1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            err[:, i] = e
        W1.masked_fill_(P1, 0.0)
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:] -= err @ U[i1:i2, i2:]
    return W


def _groups(t) -> int:
    return t.geometry.groups if t.geometry.kind == "conv" else 1


def _hessian_bytes(t) -> int:
    cols = t.geometry.view_shape[1]
    return 4 * _groups(t) * cols * cols


__all__ = ["SparseGPTCriterion", "inverse_hessian_factor", "obs_prune"]
