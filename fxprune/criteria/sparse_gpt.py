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
   weights end exactly zero; the kept ones absorb the error. With the group key
   ``sparse_gpt_refine_steps``, conjugate-gradient steps then re-fit the kept weights to the
   layer's calibration error (:func:`refine_kept_weights`).

Memory is bounded: Hessians are collected for a chunk of layers at a time (at most
``max_hessian_bytes`` per chunk, one calibration pass per chunk) and freed once used; only the
``U_jj`` diagonals (O(columns) per layer) are kept between scoring and updating. With
``sequential`` (the default) the update runs layer by layer in graph order, each layer's Hessian
measured on the model whose earlier layers are already pruned and updated (the paper's
sequential mode); each such pass stops the forward right after the layer. Calibration batches
are iterated several times, so a one-shot iterator is kept as a list.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from ..checks import all_finite
from ..errors import WeightError
from ..geometry import from_view_2d, to_view_2d
from ..patterns.ninm import n_lowest_of_each_column
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
                u = inverse_hessian_factor(hessians.pop(t.param), self.percdamp, t.name,
                                           overwrite=True)
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
                u = inverse_hessian_factor(hessians.pop(t.param), self.percdamp, t.name,
                                           overwrite=True)
                self._update_layer(ctx, t, u)
        self.diag.clear()

    def _update_layer(self, ctx, t, u: Tensor) -> None:
        weight = ctx.model.get_parameter(t.param)
        groups = u.shape[0]
        view = group_of_rows(to_view_2d(weight.detach(), t.geometry).float(), groups)
        pruned = group_of_rows(~ctx.masks[t.param].to(view.device), groups)
        steps = group_refine_steps(self.group)
        new = torch.stack([obs_prune(view[g], pruned[g], u[g], self.blocksize, steps)
                           for g in range(groups)])
        if not all_finite(new):
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


def inverse_hessian_factor(H: Tensor, percdamp: float, name: str = "", *,
                           overwrite: bool = False, order: Tensor | None = None) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` per group (``[groups, cols, cols]``).

    Columns whose input is always zero ("dead") get ``H_jj = 1`` so ``H`` stays invertible; their
    row of ``U`` then carries no update to other columns. A factorization that fails is retried
    with ten times the dampening, up to four times. ``overwrite=True`` lets it use ``H``'s memory
    (contiguous; its contents are lost): one ``cols x cols`` matrix fewer at a time.

    ``order`` (a permutation of the columns, e.g. :func:`act_order`): ``U`` is the factor of
    ``H`` with its rows and columns taken in that order (``H[order][:, order]``), for
    :func:`sparsegpt_prune` with the same ``order``.
    """
    # With J the reversal, J H J = M M^T gives H^-1 = A^T A for the upper A = J M^-1 J: the
    # upper factor of H^-1 from one Cholesky and one triangular inverse (blocked, matrix
    # products: about 1.7x faster than a triangular solve against the identity). Memory: the
    # reversed H, then M, then M^-1 written over the reversed H (a 1376-column matrix is 7.5 MB).
    if order is not None:       # J P H P^T J in one permutation: the order reversed
        H = permute_square(H, order.flip(0), overwrite)
    else:
        H = reverse_square_(H) if overwrite else H.flip(-2, -1)   # J H J, changed in place below
    diag = H.diagonal(dim1=-2, dim2=-1)
    diag.masked_fill_(diag == 0, 1.0)
    base = diag.clone()
    mean_diag = base.mean(dim=-1, keepdim=True)
    damp = percdamp
    for _ in range(5):
        diag.copy_(base + damp * mean_diag)
        M, info = torch.linalg.cholesky_ex(H)
        if int(info.abs().sum()) == 0:
            U = reverse_square_(lower_triangular_inverse(M, H.zero_()))
            del M
            if all_finite(U):
                return U
            break
        damp *= 10
    raise WeightError(f"sparse_gpt: the Hessian of {name} is not positive definite even with "
                      f"dampening {damp / 10:g}; check the calibration data")


def act_order(diag_h: Tensor) -> Tensor:
    """The columns by descending ``diag(H)`` (ties to the lower index): the order in which
    :func:`sparsegpt_prune` takes them with its ``order`` argument (GPTQ's "act order"). The
    columns with the most input energy go first, while nearly all the others are still there to
    absorb their pruned weights' error."""
    return torch.argsort(diag_h, descending=True, stable=True)


def permute_square(A: Tensor, perm: Tensor, overwrite: bool = False) -> Tensor:
    """``A[..., perm, :][..., perm]`` for ``[..., n, n]`` ``A``; ``overwrite=True`` writes it into
    ``A`` (contiguous; one ``n x n`` temporary instead of two)."""
    rows = A.index_select(-2, perm)
    if overwrite:
        if not A.is_contiguous():
            raise ValueError("permute_square(overwrite=True) needs a contiguous tensor")
        return torch.index_select(rows, -1, perm, out=A)
    return rows.index_select(-1, perm)


_REVERSE_CHUNK = 1 << 16


def reverse_square_(A: Tensor) -> Tensor:
    """``A.flip(-2, -1)`` in place, for contiguous ``A`` (``[..., n, n]``): reversing both axes of a
    matrix reverses its entries in memory order, done by swapping chunks from both ends (small
    temporaries instead of a copy of the matrix). Returns ``A``."""
    if not A.is_contiguous():
        raise ValueError("reverse_square_ needs a contiguous tensor")
    n = A.shape[-1] * A.shape[-2]
    for flat in A.reshape(-1, n).unbind(0):
        half = n // 2
        for s in range(0, half, _REVERSE_CHUNK):
            e = min(s + _REVERSE_CHUNK, half)
            head, tail = flat[s:e], flat[n - e:n - s]
            kept = head.flip(0)
            head.copy_(tail.flip(0))
            tail.copy_(kept)
    return A


def lower_triangular_inverse(L: Tensor, out: Tensor, base: int = 128) -> Tensor:
    """``L^-1`` of lower-triangular ``L`` (``[..., n, n]``) written into ``out`` (zero above the
    diagonal on entry), by halves: ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``,
    so nearly all the work is matrix products (by triangular factors: half the arithmetic of
    full products); blocks of at most ``base`` use a (batched) triangular solve."""
    n = L.shape[-1]
    if n <= base:
        eye = torch.eye(n, dtype=L.dtype, device=L.device).expand_as(L)
        return out.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
    if L.dim() > 2:                                      # grouped: one at a time
        for g in range(L.shape[0]):
            lower_triangular_inverse(L[g], out[g], base)
        return out
    k = n // 2
    lower_triangular_inverse(L[:k, :k], out[:k, :k], base)
    lower_triangular_inverse(L[k:, k:], out[k:, k:], base)
    cb = _lower_times(out[k:, k:], L[k:, :k], torch.empty_like(L[k:, :k]))
    _times_lower(cb, out[:k, :k], out[k:, :k])
    out[k:, :k].neg_()
    return out


_TRIANGULAR_PRODUCT_BASE = 256    # below this, a full product beats recursing further


def _lower_times(T: Tensor, F: Tensor, out: Tensor) -> Tensor:
    """``out = T @ F`` for lower-triangular ``T`` (the zeros above its diagonal skipped)."""
    n = T.shape[0]
    if n <= _TRIANGULAR_PRODUCT_BASE:
        return torch.matmul(T, F, out=out)
    k = n // 2
    _lower_times(T[:k, :k], F[:k], out[:k])
    _lower_times(T[k:, k:], F[k:], out[k:])
    out[k:].addmm_(T[k:, :k], F[:k])
    return out


def _times_lower(G: Tensor, T: Tensor, out: Tensor) -> Tensor:
    """``out = G @ T`` for lower-triangular ``T`` (the zeros above its diagonal skipped)."""
    n = T.shape[0]
    if n <= _TRIANGULAR_PRODUCT_BASE:
        return torch.matmul(G, T, out=out)
    k = n // 2
    _times_lower(G[:, :k], T[:k, :k], out[:, :k])
    out[:, :k].addmm_(G[:, k:], T[k:, :k])
    _times_lower(G[:, k:], T[k:, k:], out[:, k:])
    return out


def obs_prune(W: Tensor, pruned: Tensor, U: Tensor, blocksize: int = 128,
              refine_steps: int = 0) -> Tensor:
    """SparseGPT's OBS update of ``W`` (``[rows, cols]``, float32) for a fixed ``pruned`` mask.

    Columns are processed left to right; removing column ``i``'s pruned weights spreads their
    error ``w / U_ii`` over the later columns through row ``i`` of ``U``. Within a block of
    ``blocksize`` columns the update is applied column by column, to the later blocks in one
    matrix product. Returns a new tensor; pruned weights are exactly zero. ``refine_steps``: see
    :func:`sparsegpt_prune`.
    """
    return sparsegpt_prune(W, U, blocksize, fixed=pruned, refine_steps=refine_steps)[0]


# Column panel inside a block: the column-by-column updates reach only the panel's columns, the
# rest of the block gets one matrix product per panel (less memory traffic than rank-1 updates
# over the whole block; the arithmetic is the same).
PANEL = 16


def sparsegpt_prune(W: Tensor, U: Tensor, blocksize: int = 128, *, fixed: Tensor | None = None,
                    counts: list[int] | None = None, rows: list[int] | None = None,
                    n_of_m: tuple[int, int] | None = None,
                    select_block: Callable[[Tensor, int, int], Tensor] | None = None,
                    refine_steps: int = 0, order: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SparseGPT on ``W`` (``[rows, cols]`` float32, the rows of one or more layers that share
    the inverse-Hessian factor ``U``): returns the updated weights, zero where pruned, and the
    pruned mask.

    The mask is either ``fixed`` (chosen beforehand) or chosen *adaptively*, as the paper does:
    each block of ``blocksize`` columns picks its mask on the weights already updated by the
    earlier blocks, by the saliency ``w^2 / U_jj^2``:

    - unstructured (``counts``: pruned weights per layer, ``rows``: the layers' row counts): a
      block prunes the lowest saliencies of each layer, ``floor(k * c1 / cols) - floor(k * c0 /
      cols)`` of them for columns ``[c0, c1)``, so the layer prunes exactly ``k`` in all (the last,
      partial block gets its proportional share); ties go to the lowest index
      (:func:`unstructured_block_mask`). ``select_block(saliency, c0, c1)``, given, replaces
      that choice (``saliency``: ``[rows, c1 - c0]``, contiguous; returns the bool pruned mask
      of the same shape) - e.g. to choose over rows split across processes;
    - N:M (``n_of_m = (n, m)``): at every ``m``-th column, the ``n`` lowest saliencies of the
      next ``m`` columns (per row, ties to the lower column) are pruned; ``blocksize`` is rounded
      down to a multiple of ``m`` so that no group straddles two blocks.

    ``refine_steps > 0``: once the mask is final, that many conjugate-gradient steps re-fit every
    row's kept weights to the layer objective (:func:`refine_kept_weights`), which the OBS pass
    only approximates; the mask is unchanged.

    ``order`` (a permutation of the columns, e.g. :func:`act_order`; unstructured and fixed masks
    only): the columns are processed in that order, ``U`` being the factor of the Hessian taken
    in it (:func:`inverse_hessian_factor` with the same ``order``); ``fixed``, the results and the
    blocks' shares refer to the permuted columns, and the results come back in ``W``'s order.
    N:M groups are runs of ``m`` columns of the original order, so ``n_of_m`` takes no ``order``.

    Rows are independent given ``U`` except for the unstructured choice: for a fixed mask or N:M,
    ``sparsegpt_prune(W[r0:r1], ...)`` gives rows ``r0:r1`` of the whole result (same masks).

    The work is done on ``W`` transposed (columns contiguous), where the column-by-column rank-1
    updates run on contiguous memory (about 100x faster on CPU than on a column slice).
    """
    if order is not None:
        if n_of_m is not None:
            raise ValueError("sparsegpt_prune: N:M groups keep the original column order "
                             "(no order= with n_of_m=)")
        new, pruned = sparsegpt_prune(
            W[:, order], U, blocksize, fixed=None if fixed is None else fixed[:, order],
            counts=counts, rows=rows, select_block=select_block, refine_steps=refine_steps)
        back = torch.argsort(order)
        return new[:, back], pruned[:, back]
    n_rows, cols = W.shape
    adaptive_nm = n_of_m is not None
    panel = PANEL
    if adaptive_nm:
        if len(n_of_m) != 2:
            raise TypeError(f"sparsegpt_prune: n_of_m is (n, m), got {len(n_of_m)} values")
        n, m = n_of_m
        if cols % m:
            raise ValueError(f"sparsegpt_prune: {cols} columns are not divisible by M={m}")
        blocksize = max(m, blocksize - blocksize % m)
        panel = m * max(1, PANEL // m)
    elif fixed is None:
        if select_block is None:
            rows = [n_rows] if rows is None else rows
            if counts is None or len(counts) != len(rows) or sum(rows) != n_rows:
                raise ValueError("sparsegpt_prune needs fixed=, n_of_m= or counts= with rows=")
            select_block = functools.partial(unstructured_block_mask, counts=counts, rows=rows,
                                             cols=cols)
    dense = W
    if refine_steps and W.t().is_contiguous():   # WT below is W itself (updated in place)
        dense = W.clone(memory_format=torch.contiguous_format)
    WT = W.t().contiguous()                                   # [cols, rows]
    prunedT = torch.zeros(WT.shape, dtype=torch.bool, device=W.device)
    diag = U.diagonal()
    # The error of a pruned w_i is w_i / U_ii spread over w_j by U_ij: with V = U / U_ii (rows of
    # U scaled, per block), the error is the pruned weight itself, w_j -= w_i V_ij: a multiply by
    # a float 0/1 mask per column, no per-group scale to compute for N:M.
    err = torch.empty(min(blocksize, cols), n_rows, dtype=W.dtype, device=W.device)
    chosen = torch.empty_like(err)                            # 1.0 where pruned, else 0.0
    for c0 in range(0, cols, blocksize):
        c1 = min(c0 + blocksize, cols)
        width = c1 - c0
        W1 = WT[c0:c1]                                        # contiguous view, updated in place
        d1 = diag[c0:c1].unsqueeze(1)
        V = U[c0:c1, c0:] / d1                                # [width, cols - c0]
        V1 = V[:, :width]
        P1, E1, F1 = prunedT[c0:c1], err[:width], chosen[:width]
        if not adaptive_nm:
            if fixed is not None:
                P1.copy_(fixed[:, c0:c1].t())
            else:
                sal = (W1.t().pow(2) / d1.t().pow(2)).contiguous()   # [rows, width]
                P1.copy_(select_block(sal, c0, c1).t())
            F1.copy_(P1)
        # per-column views made in a few calls (indexing costs as much as the arithmetic here)
        w_rows, f_rows, e_rows = W1.unbind(0), F1.unbind(0), E1.unbind(0)
        e_outer, v_cols = E1.unsqueeze(1).unbind(0), V1.unsqueeze(2).unbind(0)
        for a in range(0, width, panel):
            b = min(a + panel, width)
            for i in range(a, b):
                if adaptive_nm and (i - a) % m == 0:          # on the updated weights
                    sal = torch.div(W1.narrow(0, i, m), d1.narrow(0, i, m)).pow_(2)  # [m, rows]
                    n_lowest_of_each_column(sal, n, out=F1.narrow(0, i, m))
                torch.mul(w_rows[i], f_rows[i], out=e_rows[i])  # pruned w_i, else 0
                k = b - i - 1
                if k:                                         # w_j -= e_i * V_ij, j in the panel
                    W1.narrow(0, i + 1, k).addmm_(v_cols[i].narrow(0, i + 1, k), e_outer[i],
                                                  alpha=-1.0)
            if b < width:
                W1[b:].addmm_(V1[a:b, b:].t(), E1[a:b], alpha=-1.0)
        if adaptive_nm:
            P1.copy_(F1)
        W1.masked_fill_(P1, 0.0)
        if c1 < cols:
            WT[c1:].addmm_(V[:, width:].t(), E1, alpha=-1.0)
    new, pruned = WT.t().contiguous(), prunedT.t().contiguous()
    if refine_steps:        # (conjugate gradients end in at most `cols` steps: more are no use)
        new = refine_kept_weights(dense, new, pruned, hessian_from_factor(U), min(refine_steps, cols))
    return new, pruned


def hessian_from_factor(U: Tensor) -> Tensor:
    """The dampened Hessian ``H = (U^T U)^-1 = U^-1 U^-T`` from ``U`` (``[cols, cols]``), the
    upper Cholesky factor of its inverse: one triangular inverse and one product, so the solve
    needs nothing but the factor it already has."""
    inv_lower = lower_triangular_inverse(U.t().contiguous(), torch.zeros_like(U))   # U^-T
    return inv_lower.t() @ inv_lower


# Rows of one conjugate-gradient chunk: rows are independent, so the [rows, cols] work tensors
# (about seven at a step's peak) are held for a chunk at a time (a multiple of 64 rows, like the solves' row cuts).
REFINE_ROWS = 1024


def refine_kept_weights(dense: Tensor, start: Tensor, pruned: Tensor, H: Tensor,
                        steps: int) -> Tensor:
    """``steps`` conjugate-gradient steps on each row's layer error ``(x - w) H (x - w)^T`` over
    its kept entries (``w``: the row of ``dense``; pruned entries held at zero), from ``start``.

    This is the exact reconstruction that the SparseGPT paper sets aside as too costly (one
    masked ``H`` solve per row): its OBS pass only moves a weight to compensate for the columns
    pruned *before* it, so its error can be several times the optimum for the same mask. With
    the Jacobi preconditioner (``diag H``) and a start at the OBS solution, a few tens of steps
    reach the optimum closely; each step is one ``[rows, cols] x [cols, cols]`` product. A
    preconditioned CG step never raises this calibration error (held-out quality is another
    matter: docs/llm.md). Returns a new tensor of ``start``'s dtype, zero where ``pruned``.
    """
    out = torch.empty_like(start)
    dinv = 1.0 / H.diagonal()
    for r0 in range(0, start.shape[0], REFINE_ROWS):
        r1 = min(r0 + REFINE_ROWS, start.shape[0])
        keep = (~pruned[r0:r1]).to(start.dtype)
        x = out[r0:r1].copy_(start[r0:r1]).mul_(keep)
        resid = torch.sub(dense[r0:r1], x).matmul(H).mul_(keep)      # -gradient / 2
        z = resid * dinv
        direction = z.clone()
        rz = (resid * z).sum(dim=1, keepdim=True)
        for _ in range(steps):
            hp = direction.matmul(H).mul_(keep)
            curv = (direction * hp).sum(dim=1, keepdim=True)
            # rows already at their optimum (or with nothing kept) have zero curvature: no step
            alpha = torch.where(curv > 0, rz / curv, torch.zeros_like(curv))
            x.addcmul_(alpha, direction)
            resid.addcmul_(alpha, hp, value=-1.0)
            torch.mul(resid, dinv, out=z)
            rz_next = (resid * z).sum(dim=1, keepdim=True)
            beta = torch.where(rz > 0, rz_next / rz, torch.zeros_like(rz))
            direction = z.addcmul(beta, direction)
            rz = rz_next
        x.mul_(keep)
    return out


def unstructured_block_mask(saliency: Tensor, c0: int, c1: int, *, counts: list[int],
                            rows: list[int], cols: int) -> Tensor:
    """SparseGPT's unstructured choice for columns ``[c0, c1)`` of layers with ``cols`` columns:
    ``saliency`` ``[sum(rows), c1 - c0]``; per layer (a range of ``rows``), its share
    ``floor(k * c1 / cols) - floor(k * c0 / cols)`` of its count ``k`` on the lowest saliencies,
    exactly (ties to the lowest index of the layer's ``[rows, c1 - c0]`` block). Bool, True =
    pruned."""
    from ..selection import select_local

    out = torch.empty(saliency.shape, dtype=torch.bool, device=saliency.device)
    r0 = 0
    for k, r in zip(counts, rows):
        share = (k * c1) // cols - (k * c0) // cols
        block = saliency[r0:r0 + r]
        out[r0:r0 + r] = select_local(block.reshape(-1), share).reshape(r, c1 - c0)
        r0 += r
    return out


def group_refine_steps(group) -> int:
    """The group's ``sparse_gpt_refine_steps`` (0 without a group: SparseGPT as published)."""
    return getattr(group, "sparse_gpt_refine_steps", 0) if group is not None else 0


def group_act_order(group) -> bool:
    """The group's ``sparse_gpt_act_order`` (True without a group)."""
    return getattr(group, "sparse_gpt_act_order", True) if group is not None else True


def _groups(t) -> int:
    return t.geometry.groups if t.geometry.kind == "conv" else 1


def _hessian_bytes(t) -> int:
    cols = t.geometry.view_shape[1]
    return 4 * _groups(t) * cols * cols


__all__ = ["SparseGPTCriterion", "act_order", "group_act_order",
           "hessian_from_factor", "inverse_hessian_factor",
           "lower_triangular_inverse", "obs_prune", "permute_square", "refine_kept_weights",
           "reverse_square_", "sparsegpt_prune", "unstructured_block_mask"]
