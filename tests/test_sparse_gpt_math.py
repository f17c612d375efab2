"""SparseGPT's per-layer math (``fxprune/criteria/sparse_gpt.py``): the column loop against a
float64 transcription of the paper's algorithm (in the original column order and in act order),
the adaptive N:M choice, the triangular inverse, and the row split (rows solved apart equal the
whole)."""
import threading

import pytest
import torch

from fxprune.criteria.sparse_gpt import (act_order, hessian_from_factor, inverse_hessian_factor,
                                         lower_triangular_inverse, permute_square,
                                         refine_kept_weights, reverse_square_, sparsegpt_prune,
                                         unstructured_block_mask)
from fxprune.patterns.ninm import NInMPattern, n_lowest_of_each_column

def _paper_sparsegpt(W, H, sparsity=0.0, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """A float64 transcription of SparseGPT's algorithm (Frantar & Alistarh 2023, Alg. 1 with
    lazy batches), adaptive masks; the unstructured per-block count is made exact with the
    cumulative share floor(k * c1 / cols) - floor(k * c0 / cols) of k = floor(sparsity * numel)."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    k = int(sparsity * W.numel())
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            share = (k * i2) // cols - (k * i1) // cols
            mask1 = torch.zeros_like(W1, dtype=torch.bool).flatten()
            mask1[torch.argsort(tmp.flatten())[:share]] = True
            mask1 = mask1.reshape(W1.shape)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / torch.diag(Hinv1)[i:i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, mask


def _layer(rows=24, cols=80, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) * torch.rand(cols, generator=g) * 3
    W = torch.randn(rows, cols, generator=g)
    return W, X.T @ X / tokens


# 80 columns in blocks of 32: the last block is partial (16 columns); 328 in blocks of 128: two
# full blocks of 8 column panels, then 72 columns (4 panels and a partial one)
@pytest.mark.parametrize("shape,blocksize", [((24, 80), 32), ((40, 328), 128)])
@pytest.mark.parametrize("kind", ["unstructured", "2:4", "fixed"])
def test_sparsegpt_update_matches_a_float64_transcription_of_the_paper(kind, shape, blocksize):
    W, H = _layer(*shape)
    U = inverse_hessian_factor(H.unsqueeze(0), 0.01)[0]
    cols = shape[1]
    if kind == "unstructured":
        ref, ref_mask = _paper_sparsegpt(W, H, sparsity=0.5, blocksize=blocksize)
        new, pruned = sparsegpt_prune(W, U, blocksize, counts=[W.numel() // 2], rows=[W.shape[0]])
        k, last = W.numel() // 2, (cols - 1) // blocksize * blocksize
        assert int(pruned.sum()) == k                         # exact count for the layer
        assert int(pruned[:, last:].sum()) == k - (k * last) // cols   # the partial block's share
    elif kind == "2:4":
        ref, ref_mask = _paper_sparsegpt(W, H, prunen=2, prunem=4, blocksize=blocksize)
        new, pruned = sparsegpt_prune(W, U, blocksize, n_of_m=(2, 4))
        assert torch.equal(pruned.reshape(-1, 4).sum(1), torch.full((W.numel() // 4,), 2))
    else:
        g = torch.Generator().manual_seed(3)
        fixed = torch.rand(W.shape, generator=g) < 0.4
        ref_mask = fixed
        # the paper's update for a given mask: the same loop with mask1 = the fixed mask
        ref = _fixed_reference(W, H, fixed, blocksize)
        new, pruned = sparsegpt_prune(W, U, blocksize, fixed=fixed)
    assert torch.equal(pruned, ref_mask)
    assert torch.equal(new == 0, pruned | (W == 0))
    torch.testing.assert_close(new.double(), ref, rtol=0, atol=2e-4)


def _fixed_reference(W, H, fixed, blocksize):
    W = W.double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    H += 0.01 * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1, dtype=torch.float64)
        for i in range(i2 - i1):
            err = torch.where(fixed[:, i1 + i], W1[:, i], 0.0) / Hinv[i1 + i, i1 + i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv[i1 + i, i1:i2][i:].unsqueeze(0)
            Err1[:, i] = err
        W1[fixed[:, i1:i2]] = 0
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def test_sparsegpt_shared_rows_equal_separate_layers():
    """Layers sharing one input (q/k/v) run as one matrix: the same as each layer alone."""
    W, H = _layer(rows=30)
    U = inverse_hessian_factor(H.unsqueeze(0), 0.01)[0]
    a, b = W[:12], W[12:]
    joint, pj = sparsegpt_prune(W, U, 32, counts=[a.numel() // 2, b.numel() * 3 // 4], rows=[12, 18])
    sa, pa = sparsegpt_prune(a, U, 32, counts=[a.numel() // 2], rows=[12])
    sb, pb = sparsegpt_prune(b, U, 32, counts=[b.numel() * 3 // 4], rows=[18])
    assert torch.equal(pj, torch.cat([pa, pb]))
    torch.testing.assert_close(joint, torch.cat([sa, sb]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (5, 16)])
def test_n_lowest_of_each_column_orders_like_the_pattern(n, m):
    """The adaptive N:M choice ([M, k], one comparison) = NInMPattern's ([k, M]), ties included."""
    g = torch.Generator().manual_seed(m + n)
    scores = torch.randint(0, 3, (m, 500), generator=g).float()     # many exact ties
    scores[:, :3] = 0.0                                               # all-tied groups
    pattern = NInMPattern({"pattern": f"{n}:{m}", "target_sparsity": n / m})
    expected = pattern._n_smallest(scores.t().contiguous()).reshape(500, m).t()
    got = n_lowest_of_each_column(scores, n)
    assert torch.equal(got, expected)
    assert torch.equal(got[:, 0], torch.arange(m) < n)               # ties: the lowest rows
    out = torch.ones(m, 500)                                          # float 0/1 output
    n_lowest_of_each_column(scores, n, out=out)
    assert torch.equal(out, expected.float())


def test_adaptive_n_of_m_ties_go_to_the_lower_column():
    """H = I (no updates between columns) and |w| = 1 everywhere: every saliency ties, and each
    group prunes its first N columns."""
    W = torch.ones(6, 48)
    W[::2] = -1.0
    U = inverse_hessian_factor(torch.eye(48).unsqueeze(0), 0.01)[0]
    new, pruned = sparsegpt_prune(W, U, 16, n_of_m=(2, 4))
    assert torch.equal(pruned, (torch.arange(48) % 4 < 2).expand(6, 48))
    assert torch.equal(new, torch.where(pruned, 0.0, W))


@pytest.mark.parametrize("n", [7, 128, 300, 700])     # 700: products by triangular halves
def test_lower_triangular_inverse(n):
    g = torch.Generator().manual_seed(n)
    L = torch.randn(n, n, generator=g).tril() * 0.1 + torch.eye(n) * 2
    out = lower_triangular_inverse(L, torch.zeros(n, n))
    assert torch.equal(out, out.tril())
    torch.testing.assert_close(out.double(), torch.linalg.inv(L.double()), rtol=0, atol=1e-5)
    batch = torch.stack([L, L.t().flip(0, 1)])                      # [2, n, n], both lower
    outs = lower_triangular_inverse(batch, torch.zeros(2, n, n))
    torch.testing.assert_close(outs.double(), torch.linalg.inv(batch.double()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (2, 7, 7), (300, 300), (1, 363, 363)])
def test_reverse_square_in_place_equals_flip(shape):
    # 363^2 = 131769 entries: two full chunks and a partial one, and a middle entry that stays
    A = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    expected = A.flip(-2, -1)
    ptr = A.data_ptr()
    out = reverse_square_(A)
    assert out.data_ptr() == ptr and torch.equal(out, expected)
    with pytest.raises(ValueError, match="contiguous"):
        reverse_square_(torch.zeros(4, 4).t()[:, :3])


def test_inverse_hessian_factor_overwrite_gives_the_same_bits():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(500, 2, 260, generator=g)
    X[:, 1, 17] = 0                                   # a dead column
    H = torch.einsum("tgi,tgj->gij", X, X) / 500
    kept = H.clone()
    expected = inverse_hessian_factor(H, 0.01)
    assert torch.equal(H, kept)                       # without overwrite H is left as it was
    got = inverse_hessian_factor(H.clone(), 0.01, overwrite=True)
    assert torch.equal(got, expected)
    assert torch.equal(got, got.triu())
    # U^T U is the dampened inverse Hessian
    damped = kept.double().clone()
    d = damped.diagonal(dim1=-2, dim2=-1)
    d.masked_fill_(d == 0, 1.0)
    d.add_(0.01 * d.mean(dim=-1, keepdim=True))
    torch.testing.assert_close(got.double().mT @ got.double(), torch.linalg.inv(damped),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["2:4", "fixed"])
@pytest.mark.parametrize("refine_steps", [0, 12])
def test_rows_solved_apart_equal_the_whole(kind, refine_steps):
    """N:M and fixed masks: rows are independent given U (a split across processes by rows),
    with the kept weights re-fitted or not."""
    W, H = _layer(rows=30, cols=96)
    U = inverse_hessian_factor(H.unsqueeze(0), 0.01)[0]
    fixed = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    kw = (lambda r: {"n_of_m": (2, 4)}) if kind == "2:4" else (lambda r: {"fixed": fixed[r]})
    kw = (lambda r, kw=kw: {**kw(r), "refine_steps": refine_steps})
    whole, pw = sparsegpt_prune(W, U, 32, **kw(slice(None)))
    parts = [sparsegpt_prune(W[r], U, 32, **kw(r)) for r in (slice(0, 11), slice(11, 30))]
    assert torch.equal(pw, torch.cat([p for _, p in parts]))
    torch.testing.assert_close(whole, torch.cat([w for w, _ in parts]), rtol=0, atol=1e-5)


def test_unstructured_rows_split_with_a_gathering_select_block():
    """Unstructured: the per-block choice couples a layer's rows. Two threads stand for two
    ranks, each solving its rows; ``select_block`` gathers both ranks' saliencies, chooses on the
    whole with ``unstructured_block_mask`` and keeps its rows: the result equals the whole."""
    W, H = _layer(rows=30, cols=200)
    U = inverse_hessian_factor(H.unsqueeze(0), 0.01)[0]
    counts, rows = [12 * 200 // 2, 18 * 200 * 3 // 4], [12, 18]   # two layers sharing U
    whole, pw = sparsegpt_prune(W, U, 64, counts=counts, rows=rows)
    splits = [slice(0, 17), slice(17, 30)]                         # across the layer boundary
    barrier, posted, results = threading.Barrier(2), [None, None], [None, None]

    def rank(r):
        def select_block(sal, c0, c1):
            posted[r] = sal
            barrier.wait()                                           # all_gather
            full = torch.cat(posted)
            barrier.wait()
            mask = unstructured_block_mask(full, c0, c1, counts=counts, rows=rows, cols=200)
            return mask[splits[r]]
        results[r] = sparsegpt_prune(W[splits[r]], U, 64, select_block=select_block)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(pw, torch.cat([p for _, p in results]))
    torch.testing.assert_close(whole, torch.cat([w for w, _ in results]), rtol=0, atol=1e-5)
    assert int(pw[:12].sum()) == counts[0] and int(pw[12:].sum()) == counts[1]


# ---------------------------------------------------------------- refinement of the kept weights
def _damped(H, percdamp=0.01):
    return H + percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)


def _exact_kept(W, pruned, H):
    """Each row's kept weights minimising (x - w) H (x - w)^T with the pruned ones at zero: one
    float64 solve per row, H_KK x_K = (w H)_K (an independent computation of the optimum)."""
    W, H = W.double(), H.double()
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        k = (~pruned[r]).nonzero()[:, 0]
        out[r, k] = torch.linalg.solve(H[k][:, k], (W[r] @ H)[k])
    return out


def _error(X, W, H):
    """Per row: (x - w) H (x - w)^T, float64."""
    D = X.double() - W.double()
    return ((D @ H.double()) * D).sum(1)


def test_hessian_from_factor_inverts_the_factor():
    W, H = _layer(cols=80)
    U = inverse_hessian_factor(H.double().unsqueeze(0), 0.01)[0]
    torch.testing.assert_close(hessian_from_factor(U), _damped(H.double()), rtol=1e-9, atol=1e-9)


def test_refine_reaches_the_exact_masked_least_squares_solution():
    W, H = _layer(rows=12, cols=40)
    W, Hd = W.double(), _damped(H.double())
    g = torch.Generator().manual_seed(5)
    pruned = torch.rand(W.shape, generator=g) < 0.5
    pruned[3] = True                                          # a row with nothing kept
    start = torch.where(pruned, 0.0, W)                       # plain magnitude-style start
    got = refine_kept_weights(W, start, pruned, Hd, steps=40)  # CG: exact after <= 40 steps
    assert torch.equal(got[pruned], torch.zeros(int(pruned.sum()), dtype=got.dtype))
    torch.testing.assert_close(got, _exact_kept(W, pruned, Hd), rtol=0, atol=1e-8)


def test_refine_steps_never_raise_the_error_of_any_row():
    W, H = _layer(rows=16, cols=64)
    U = inverse_hessian_factor(H.unsqueeze(0), 0.01)[0]
    obs, pruned = sparsegpt_prune(W, U, 32, counts=[W.numel() // 2], rows=[W.shape[0]])
    W, obs, Hd = W.double(), obs.double(), _damped(H.double())     # float64 steps from here
    errors = [_error(obs, W, Hd)]
    for steps in (1, 2, 4, 8, 16):
        errors.append(_error(refine_kept_weights(W, obs, pruned, Hd, steps), W, Hd))
    for before, after in zip(errors, errors[1:]):
        assert bool((after <= before * (1 + 1e-12)).all())
    optimum = _error(_exact_kept(W, pruned, Hd), W, Hd)
    assert bool((errors[0] > optimum * 1.01).all())           # the OBS pass leaves a gap ...
    torch.testing.assert_close(errors[-1], optimum, rtol=1e-6, atol=0)   # ... that the steps close


@pytest.mark.parametrize("kind", ["unstructured", "2:4", "fixed"])
def test_sparsegpt_prune_with_refine_steps_keeps_the_mask_and_counts(kind):
    W, H = _layer(rows=24, cols=80)
    U = inverse_hessian_factor(H.unsqueeze(0), 0.01)[0]
    W_before = W.clone()
    if kind == "unstructured":
        args = dict(counts=[W.numel() // 2], rows=[W.shape[0]])
    elif kind == "2:4":
        args = dict(n_of_m=(2, 4))
    else:
        args = dict(fixed=torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.4)
    obs, pruned = sparsegpt_prune(W, U, 32, **args)
    new, pruned_refined = sparsegpt_prune(W, U, 32, refine_steps=80, **args)
    assert torch.equal(W, W_before)                           # the input is not changed
    # a column-major W (a Hugging Face Conv1D weight's view): the OBS pass works in W's own
    # memory there, and the re-fit must still start from the dense weights
    W_cols = W.t().contiguous().t()
    new_cols, _ = sparsegpt_prune(W_cols, U, 32, refine_steps=80, **args)
    torch.testing.assert_close(new_cols, new, rtol=0, atol=1e-5)
    assert torch.equal(pruned_refined, pruned)                # the same mask ...
    assert torch.equal(new == 0, pruned)                      # ... exactly zero, the rest not
    if kind == "2:4":
        assert torch.equal(pruned.reshape(-1, 4).sum(1), torch.full((W.numel() // 4,), 2))
    elif kind == "unstructured":
        assert int(pruned.sum()) == W.numel() // 2
    Hd = _damped(H.double())
    torch.testing.assert_close(new.double(), _exact_kept(W, pruned, Hd), rtol=0, atol=2e-3)
    assert bool((_error(new, W, Hd) < _error(obs, W, Hd)).all())


def test_refine_in_row_chunks_equals_one_chunk(monkeypatch):
    import fxprune.criteria.sparse_gpt as sg

    W, H = _layer(rows=40, cols=64)
    Hd = _damped(H)
    pruned = torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    start = torch.where(pruned, 0.0, W)
    whole = refine_kept_weights(W, start, pruned, Hd, 10)
    monkeypatch.setattr(sg, "REFINE_ROWS", 16)                # chunks of 16, 16 and 8 rows
    torch.testing.assert_close(refine_kept_weights(W, start, pruned, Hd, 10), whole,
                               rtol=0, atol=1e-6)


# ---------------------------------------------------------------- act order
def test_act_order_is_descending_diag_with_ties_to_the_lower_index():
    d = torch.tensor([1.0, 3.0, 0.0, 3.0, 2.0, 1.0])
    assert act_order(d).tolist() == [1, 3, 4, 0, 5, 2]


@pytest.mark.parametrize("overwrite", [False, True])
def test_permute_square_equals_indexing(overwrite):
    A = torch.randn(2, 7, 7, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    expected = A[:, perm][:, :, perm]
    got = permute_square(A.clone() if overwrite else A, perm, overwrite=overwrite)
    assert torch.equal(got, expected)


def test_inverse_hessian_factor_with_an_order_is_the_factor_of_the_permuted_hessian():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(300, 90, generator=g) * torch.rand(90, generator=g) * 3
    X[:, 11] = 0                                       # a dead column
    H = (X.T @ X / 300).unsqueeze(0)
    order = act_order(H[0].diagonal())
    expected = inverse_hessian_factor(H[:, order][:, :, order].contiguous(), 0.01)
    assert torch.equal(inverse_hessian_factor(H, 0.01, order=order), expected)
    assert torch.equal(inverse_hessian_factor(H.clone(), 0.01, overwrite=True, order=order), expected)


# 80 columns in blocks of 32 (a partial last block), 328 in blocks of 128
@pytest.mark.parametrize("shape,blocksize", [((24, 80), 32), ((40, 328), 128)])
@pytest.mark.parametrize("kind", ["unstructured", "fixed"])
def test_act_order_equals_the_paper_on_the_permuted_columns(kind, shape, blocksize):
    """With ``order``, SparseGPT is the paper's algorithm run on the columns (and the Hessian)
    taken in that order, the results put back in the original order: the float64 transcription
    on the permuted layer, un-permuted, gives the same mask (exact per-layer count, each block's
    share counted in the processing order) and weights."""
    W, H = _layer(*shape)
    order = act_order(H.diagonal())
    assert not torch.equal(order, torch.arange(shape[1]))  # a real permutation of this layer
    back = torch.argsort(order)
    U = inverse_hessian_factor(H.unsqueeze(0), 0.01, order=order)[0]
    Wp, Hp = W[:, order], H[order][:, order]
    if kind == "unstructured":
        k = W.numel() // 2
        ref, ref_mask = _paper_sparsegpt(Wp, Hp, sparsity=0.5, blocksize=blocksize)
        new, pruned = sparsegpt_prune(W, U, blocksize, counts=[k], rows=[W.shape[0]], order=order)
        assert int(pruned.sum()) == k
        first = order[:blocksize]                          # the first block: the top-energy columns
        assert int(pruned[:, first].sum()) == (k * blocksize) // shape[1]
    else:
        fixed = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.4
        ref, ref_mask = _fixed_reference(Wp, Hp, fixed[:, order], blocksize), fixed[:, order]
        new, pruned = sparsegpt_prune(W, U, blocksize, fixed=fixed, order=order)
    assert torch.equal(pruned, ref_mask[:, back])
    assert torch.equal(new == 0, pruned | (W == 0))
    torch.testing.assert_close(new.double(), ref[:, back], rtol=0, atol=2e-4)


def test_act_order_is_refused_for_n_of_m():
    W, H = _layer()
    U = inverse_hessian_factor(H.unsqueeze(0), 0.01)[0]
    with pytest.raises(ValueError, match="N:M groups keep the original column order"):
        sparsegpt_prune(W, U, 32, n_of_m=(2, 4), order=torch.arange(W.shape[1]).flip(0))


@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (64, 129)])
def test_all_finite_agrees_with_isfinite_for_every_position_and_kind(shape):
    from fxprune.checks import all_finite
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert all_finite(x) and all_finite(x[:0]) and all_finite(x.t() if x.dim() == 2 else x)
    flat = x.view(-1)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in range(flat.numel()):       # every lane of the vectorised reduction
            y = flat.clone()
            y[i] = bad
            assert not all_finite(y.view(shape)), (bad, i)
    y = flat.clone()
    y[0], y[-1] = -float("inf"), float("inf")
    assert not all_finite(y)


def test_all_finite_on_a_tensor_the_reduction_splits_among_threads():
    """Above torch's grain size (32768 entries) the CPU reduction is split among threads and its
    partial results combined: a NaN or infinity anywhere, at the split points too, is found."""
    from fxprune.checks import all_finite
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(300, 129, generator=torch.Generator().manual_seed(1))
        assert all_finite(x)
        flat = x.view(-1)
        n = flat.numel()
        positions = {0, n - 1, n // 2 - 1, n // 2, 32767, 32768, *range(0, n, 997)}
        for bad in (float("nan"), float("inf"), -float("inf")):
            for i in sorted(positions):
                y = flat.clone()
                y[i] = bad
                assert not all_finite(y.view(300, 129)), (bad, i)
    finally:
        torch.set_num_threads(threads)


def test_stacked_rows_t_is_a_fresh_contiguous_copy_of_the_stacked_rows_transposed():
    """A solve's rows copied once from the layers' views: the values of ``torch.cat(views)[r0:r1]``
    transposed, contiguous (the solve's working layout, updated in place) and never the layers'
    memory, for every range: one-row ranges, ranges inside one layer or across several, and a
    layer stored ``[in, out]`` (its view is the weight transposed)."""
    from fxprune.passes.sequential import stacked_rows_t
    g = torch.Generator().manual_seed(0)
    in_out = torch.randn(8, 4, generator=g)
    views = [torch.randn(5, 8, generator=g), in_out.t(), torch.randn(6, 8, generator=g)]
    whole = torch.cat(views)
    before = [v.clone() for v in views]
    for r0 in range(0, 15):
        for r1 in range(r0, 16):
            got = stacked_rows_t(views, r0, r1)
            assert got.shape == (8, r1 - r0) and got.is_contiguous()
            assert torch.equal(got, whole[r0:r1].t())
            got.fill_(float("nan"))         # what an in-place solve does to its working copy
            assert all(torch.equal(v, b) for v, b in zip(views, before)), (r0, r1)
