"""Independent reference for Intel Neural Compressor 2.x *magnitude* pruning masks (pure torch).

Follows neural_compressor/compression/pruner/{criteria.py, patterns/base.py, patterns/nxm.py,
patterns/ninm.py} (one-shot: a single ``get_masks`` call on all-ones pre-masks, so the scheduler and
progressive pruning play no part). It deliberately does not import fxprune.

INC's algorithm, as implemented here:
* score = |w| (MagnitudeCriterion), in float32 here.
* NxM: block score = reduce(reduce(view[r/N, N, c/M, M], -1), 1) (INC's two-stage reduce_tensor).
* N:M: per run of M columns, the N smallest (``kthvalue(N)`` then ``<=``) are the candidates; group
  score = reduce over the M-vector with the non-candidates zeroed (``score * ~mask``), so ``mean`` is
  sum(N smallest) / M. A pruned group zeroes its candidates; other groups stay dense.
* global: K = int(total_blocks * ratio); threshold = kthvalue(all scores, K); prune ``score <= thr``.
  A layer above max_sparsity_ratio_per_op is reset to int(max * n) blocks by its own kthvalue, frozen,
  and the residual K is re-thresholded over the other layers until no new layer exceeds (nxm.py /
  ninm.py ``get_masks_global``). For N:M, ratios are in group units: ratio * M / N.
* local: INC runs ``get_masks_global`` on each layer alone, so K = int(layer_blocks * ratio).

That iteration ends at the "water level" t where sum_l clamp(#{s_l <= t}, lo_l, hi_l) == K (a
layer frozen at a lower threshold still exceeds its cap at any higher one). We compute t directly:
each layer's lowest lo_l blocks are forced, its next hi_l - lo_l are optional, and t is the
(K - sum lo)-th smallest optional score. With lo = 0 this gives INC's masks exactly on tie-free
scores, and it also gives min_ratio the natural clamp semantics (see below).

Ties/rounding: as INC, a threshold prunes every score <= it, so ties overshoot (fxprune breaks ties
by index instead, docs/design.md "Exactness"); INC's int(x * ratio) is a float floor (int(100 * 0.29) == 28).

Where INC is not followed (not a tie/rounding matter):
* min_sparsity_ratio_per_op: INC's BasePattern.adjust_ratio is a heuristic (it shrinks a layer being
  capped to leave budget for layers below the minimum, and never raises those directly), so it does
  not guarantee the minimum. We clamp: each layer prunes >= ceil(min * n) blocks.
* INC decides a cap with ``zeros / n > max`` but caps to int(max * n); when max * n rounds below an
  integer in float (0.29 * 100) it can leave a layer one block above its cap. We cap at int(max * n).
* INC's N:M counts a group as pruned when count_nonzero(mask) <= N, which only holds for N >= M / 2;
  for e.g. 1:4 its max_sparsity_ratio_per_op never binds. We apply the cap for every N:M.
"""
from __future__ import annotations

import math

import torch

__all__ = ["inc_masks"]


def _reduce(x: torch.Tensor, dim: int, how: str) -> torch.Tensor:
    if how == "mean":
        return x.mean(dim=dim)
    if how == "sum":
        return x.sum(dim=dim)
    if how == "max":
        return x.max(dim=dim).values
    raise ValueError(f"reduce must be mean, sum or max, got {how!r}")


def _parse(pattern: str) -> tuple[str, int, int]:
    kind, sep = ("nm", ":") if ":" in pattern else ("nxm", "x")
    try:
        n, m = (int(v) for v in pattern.split(sep))
    except ValueError:
        raise ValueError(f"unsupported pattern {pattern!r} (expected e.g. '4x1' or '2:4')") from None
    if n < 1 or m < 1 or (kind == "nm" and n > m):
        raise ValueError(f"bad pattern {pattern!r}")
    return kind, n, m


def _prune_lowest(s: torch.Tensor, c: int) -> torch.Tensor:
    """INC get_single_mask_per_target_ratio: prune score <= kthvalue(c); nothing when c < 1."""
    if c < 1:
        return torch.zeros_like(s, dtype=torch.bool)
    return s <= torch.kthvalue(s, c).values


def _select(scores: list[torch.Tensor], k: int, lo: list[int], hi: list[int]) -> list[torch.Tensor]:
    """Pruned-block masks (True = prune) for 1-D block scores, k blocks in all, lo..hi per layer."""
    for a, b in zip(lo, hi):
        if a > b:
            raise ValueError("min_ratio gives more blocks than max_ratio allows")
    residual = k - sum(lo)
    optional = torch.cat([s.sort().values[a:b] for s, a, b in zip(scores, lo, hi)])
    if residual <= 0:
        thr = -math.inf  # only the forced minimum (INC: k <= 0 returns the pre-masks untouched)
    elif residual >= optional.numel():
        thr = math.inf  # target not reachable under max_ratio: every layer sits at its cap
    else:
        thr = torch.kthvalue(optional, residual).values.item()
    out = []
    for s, a, b in zip(scores, lo, hi):
        below = s <= thr
        n = int(below.sum())
        c = min(max(n, a), b)
        out.append(below if c == n else _prune_lowest(s, c))  # frozen layers use their own kthvalue
    return out


def inc_masks(weights: dict[str, torch.Tensor], *, pattern: str, target: float, scope: str = "global",
              reduce: str = "mean", max_ratio: float = 0.98,
              min_ratio: float = 0.0) -> dict[str, torch.Tensor]:
    """INC magnitude masks (float, 1 keep / 0 prune) for 2-D [out, in] weights.

    ``pattern``: "NxM" (N rows x M columns blocks) or "N:M" (N of every M consecutive columns).
    Layers not divisible by the block stay all-ones and are left out of the ranking.
    Per layer of n blocks (N:M: n groups), pruned blocks are clamped to
    [ceil(min_ratio' * n), int(max_ratio' * n)] with ratio' = ratio (NxM) or ratio * M / N (N:M).
    """
    if scope not in ("global", "local"):
        raise ValueError(f"scope must be global or local, got {scope!r}")
    if not 0.0 <= min_ratio <= max_ratio <= 1.0:
        raise ValueError("need 0 <= min_ratio <= max_ratio <= 1")
    kind, N, M = _parse(pattern)
    if kind == "nm" and target > N / M:
        raise ValueError(f"target {target} above {N}/{M}, the most an {pattern} pattern can prune")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target must be in [0, 1), got {target}")
    # N:M ratios are counted in groups; same float expression order as ninm.py (ratio * M / N).
    scale = (lambda r: r * M / N) if kind == "nm" else (lambda r: r)
    t_ratio, hi_ratio, lo_ratio = scale(target), scale(max_ratio), scale(min_ratio)

    masks = {name: torch.ones(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    names, scores, candidates = [], [], {}
    for name, w in weights.items():
        if w.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D [out, in] view, got shape {tuple(w.shape)}")
        r, c = w.shape
        a = w.detach().float().abs()
        if kind == "nxm":
            if r % N or c % M:
                continue  # INC: invalid layer, skipped
            s = _reduce(_reduce(a.reshape(r // N, N, c // M, M), -1, reduce), 1, reduce)
        else:
            if c % M:
                continue  # INC's N:M only checks the columns
            g = a.reshape(r, c // M, M)
            cand = g <= torch.kthvalue(g, N, dim=2, keepdim=True).values  # ties: > N candidates (INC)
            candidates[name] = cand
            s = _reduce(g * cand, -1, reduce)  # INC: score * ~least_ninm_mask, then reduce over M
        names.append(name)
        scores.append(s.flatten())

    def bounds(n: int) -> tuple[int, int]:
        # INC caps with int(max * n). min: natural clamp, ceil with a tolerance so 0.7 * 10 -> 7.
        return min(math.ceil(lo_ratio * n - 1e-9), n), min(int(hi_ratio * n), n)

    lo, hi = zip(*(bounds(s.numel()) for s in scores)) if scores else ((), ())
    if scope == "global":
        total = sum(s.numel() for s in scores)
        pruned = _select(scores, int(total * t_ratio), list(lo), list(hi)) if scores else []
    else:
        pruned = [_select([s], int(s.numel() * t_ratio), [a], [b])[0] for s, a, b in zip(scores, lo, hi)]

    for name, p in zip(names, pruned):
        r, c = weights[name].shape
        if kind == "nxm":
            keep = ~p.reshape(r // N, c // M)
            keep = keep.repeat_interleave(N, 0).repeat_interleave(M, 1)
        else:
            keep = ~(p.reshape(r, c // M, 1) & candidates[name])  # INC: group mask OR least-N mask
            keep = keep.reshape(r, c)
        masks[name] = keep.float()
    return masks
