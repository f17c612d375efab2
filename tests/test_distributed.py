"""Pruning with torch.distributed: 2 processes (gloo, CPU) started once by the fixture below run
every scenario and save their results; the tests compare them with the single-process results,
computed inside the same processes (a process group of one rank) so both see the same threads.

SparseGPT too is bit-identical here: its Hessians are float64 sums of float32 products (the same
in any order at these sizes), and on these tiny layers the plan keeps each solve whole on one
rank (row ranges split at multiples of 64 rows give the same bits with the BLAS measured; see
docs/distributed.md)."""
import copy
import datetime
import os
import time

import pytest
import torch

import fxprune
from tiny_llm import tiny_llama, token_batches

transformers = pytest.importorskip("transformers")

WORLD = 2
TIMEOUT_S = 20
HANG_TIMEOUT_S = 3
EXAMPLE = (torch.zeros(1, 12, dtype=torch.long),)

CASES = {
    "magnitude_global": {"pruning_type": "magnitude", "pattern": "4x1", "target_sparsity": 0.5,
                         "pruning_scope": "global"},
    "magnitude_local": {"pruning_type": "magnitude", "pattern": "2:4", "target_sparsity": 0.5},
    "wanda_1x1": {"pruning_type": "activation", "pattern": "1x1", "target_sparsity": 0.5,
                  "pruning_scope": "local", "block_batch_tokens": 48},
    "wanda_2of4": {"pruning_type": "activation", "pattern": "2:4", "target_sparsity": 0.5,
                   "pruning_scope": "local", "block_batch_tokens": 48},
    # 2 block batches (72 + 48 tokens), one per rank: each rank's partial Hessian is one float32
    # product and travels as float32; with 3 block batches (48 tokens) rank 0 sums two, as float64
    "sparse_gpt_1x1": {"pruning_type": "sparse_gpt", "pattern": "1x1", "target_sparsity": 0.5,
                       "pruning_scope": "local", "block_batch_tokens": 72},
    "sparse_gpt_2of4": {"pruning_type": "sparse_gpt", "pattern": "2:4", "target_sparsity": 0.5,
                        "pruning_scope": "local", "block_batch_tokens": 48},
    # the kept weights re-fitted after each solve, on the rows each rank solved
    "sparse_gpt_2of4_refit": {"pruning_type": "sparse_gpt", "pattern": "2:4", "target_sparsity": 0.5,
                              "pruning_scope": "local", "block_batch_tokens": 48,
                              "sparse_gpt_refine_steps": 5},
    # a block's layers in 4 stages: statistics reduced and solves split per stage
    "sparse_gpt_1x1_true_sequential": {"pruning_type": "sparse_gpt", "pattern": "1x1",
                                       "target_sparsity": 0.5, "pruning_scope": "local",
                                       "block_batch_tokens": 72, "true_sequential": True},
}


def _llama(layers=2, seed=0):
    return tiny_llama(layers, seed)


def _calib(n=5, seed=1):
    return token_batches(n, seed)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _attempt(call):
    """(error, seconds) of ``call()``: the error as (type name, message), None when it succeeded."""
    start = time.monotonic()
    try:
        call()
        error = None
    except Exception as e:
        error = (type(e).__name__, str(e))
    return error, time.monotonic() - start


def _worker(rank, world, init, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    alone = [dist.new_group([r]) for r in range(world)]   # one-rank groups: the reference
    hang = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=HANG_TIMEOUT_S))
    model, calib = _llama(), _calib()
    calls = [0]     # calls of decoder block 0 (the hook travels with transform's copy)
    model.model.layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    work = [0, 0]   # SparseGPT on this rank: inverse factors computed, weight rows solved
    import fxprune.passes.sequential as seq
    solve, factor = seq.sparsegpt_prune, seq.inverse_hessian_factor
    seq.sparsegpt_prune = lambda W, *a, **k: (work.__setitem__(1, work[1] + W.shape[0]), solve(W, *a, **k))[1]
    seq.inverse_hessian_factor = lambda *a, **k: (work.__setitem__(0, work[0] + 1), factor(*a, **k))[1]
    import fxprune.distributed as fd
    learned, learn = {}, fd.Distributed.learn_costs     # the cost ratios each rank learned

    def learning(self, measured, spent):
        learn(self, measured, spent)
        learned.setdefault(name, []).append({k: v for k, v in self.scales.items()})
    fd.Distributed.learn_costs = learning
    late, plain_add, plain_finish = {}, seq.LateWrites.add, seq.LateWrites.finish

    def deferring(self, g, modules):    # a group whose rows come from the other rank
        self.deferred = getattr(self, "deferred", 0) + 1
        plain_add(self, g, modules)

    def finishing(self):                # the block's end: groups no forward has written yet
        late.setdefault(name, []).append((self.deferred, len(self.pending)))
        plain_finish(self)
    seq.LateWrites.add, seq.LateWrites.finish = deferring, finishing
    results, forwards, zeros = {}, {}, {}
    for name, cfg in CASES.items():
        calls[0] = work[0] = work[1] = 0
        ref = fxprune.transform(model, cfg, EXAMPLE, calibration=calib, group=alone[rank])
        alone_counts = (calls[0], tuple(work))
        calls[0] = work[0] = work[1] = 0
        par = fxprune.transform(model, cfg, EXAMPLE, calibration=calib)
        results[name] = (_weights(ref), _weights(par))
        forwards[name] = (alone_counts, (calls[0], tuple(work)))
        zeros[name] = tuple({layer.param: layer.zeros for layer in fxprune.sparsity_report(m).layers}
                            for m in (ref, par))
    seq.sparsegpt_prune, seq.inverse_hessian_factor = solve, factor
    seq.LateWrites.add, seq.LateWrites.finish = plain_add, plain_finish
    fd.Distributed.learn_costs = learn
    torch.save(late, os.path.join(out_dir, f"late.{rank}.pt"))
    torch.save((results, forwards), os.path.join(out_dir, f"transform.{rank}.pt"))
    torch.save(learned, os.path.join(out_dir, f"learned.{rank}.pt"))
    torch.save(zeros, os.path.join(out_dir, f"zeros.{rank}.pt"))

    # pure FLOP costs: the plan sends factors to the other rank (q/k/v's and down's factors on
    # rank 1, their rows on rank 0); then a solve that fails on rank 1 only
    from fxprune.errors import WeightError
    costs, learn = (fd.solve_cost, fd.factor_cost), fd.Distributed.learn_costs
    fd.solve_cost = lambda r, c: float(r) * c * c
    fd.factor_cost = lambda c: float(c) ** 3 / 3
    fd.Distributed.learn_costs = lambda *a: None      # the same plan in every block
    sends, isend = [0], dist.isend      # factors sent (the other messages: Hessians, rows)
    dist.isend = lambda *a, **k: (sends.__setitem__(0, sends[0] + (k["tag"] % fd._KINDS == fd._FACTOR)), isend(*a, **k))[1]
    split = _weights(fxprune.transform(model, CASES["sparse_gpt_2of4"], EXAMPLE, calibration=calib))
    dist.isend = isend
    rows = seq._sparse_gpt_rows
    if rank == 1:
        def failing(*a, **k):
            raise WeightError("sparse_gpt produced non-finite weights for a test layer")
        seq._sparse_gpt_rows = failing
    error, seconds = _attempt(lambda: fxprune.transform(model, CASES["sparse_gpt_2of4"], EXAMPLE, calibration=calib))
    seq._sparse_gpt_rows = rows
    # two SparseGPT groups in one block: rank 1 fails in the first one's solves while rank 0 may
    # go on to the second; on a model pruned in place, no write hook is left behind
    if rank == 1:
        def failing_attention(ctx, group, shared, *a, **k):
            if "self_attn" in shared[0].name:
                raise WeightError("sparse_gpt produced non-finite weights for an attention layer")
            return rows(ctx, group, shared, *a, **k)
        seq._sparse_gpt_rows = failing_attention
    group = {k: v for k, v in CASES["sparse_gpt_1x1"].items() if k != "block_batch_tokens"}
    two_groups = {"block_batch_tokens": CASES["sparse_gpt_1x1"]["block_batch_tokens"],
                  "pruning_configs": [{**group, "op_names": ["self_attn"]}, {**group, "op_names": ["mlp"]}]}
    subject = copy.deepcopy(model)
    hooks = lambda: sum(len(m._forward_pre_hooks) for m in subject.modules())  # noqa: E731
    hooks_before = hooks()      # the block-call counter above travels with the copy
    error2, seconds2 = _attempt(lambda: fxprune.transform(subject, two_groups, EXAMPLE, calibration=calib,
                                                          inplace=True))
    seq._sparse_gpt_rows = rows
    hooks_left = hooks() - hooks_before
    fd.solve_cost, fd.factor_cost = costs
    fd.Distributed.learn_costs = learn
    torch.save((split, sends[0], error, seconds), os.path.join(out_dir, f"split.{rank}.pt"))
    torch.save((error2, seconds2, hooks_left), os.path.join(out_dir, f"two_groups.{rank}.pt"))

    # rank 1's calibration holds a token id past the vocabulary: it fails in its embedding
    bad = [b.clone() for b in calib]
    if rank == 1:
        bad[1][0, 0] = 64
    outcome = _attempt(lambda: fxprune.transform(model, CASES["wanda_1x1"], EXAMPLE, calibration=bad))
    torch.save(outcome, os.path.join(out_dir, f"error.{rank}.pt"))

    # rank 1 never calls transform (it waits for rank 0 to give up): rank 0's first collective
    # step times out after the group's timeout
    flag = os.path.join(out_dir, "hang.done")
    if rank == 0:
        outcome = _attempt(lambda: fxprune.transform(model, CASES["sparse_gpt_2of4"], EXAMPLE, calibration=calib,
                                                     group=hang))
        torch.save(outcome, os.path.join(out_dir, "hang.0.pt"))
        open(flag, "w").close()
    else:
        deadline = time.monotonic() + 4 * TIMEOUT_S
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)

    # checkpoints: each case pruned by one process (per rank, its own output) and by both ranks
    src = os.path.join(out_dir, "llama")
    errors = {}
    # global 1x1 magnitude works in row pieces: 200 entries (6 rows of 32) at most, so the pieces and the tie
    # split cross the ranks' row ranges; weight bytes read by each run
    import fxprune.checkpoint.sharded as sharded
    from fxprune.checkpoint.shards import ShardSet
    plain_read, read = ShardSet._read, [0]
    ShardSet._read = staticmethod(lambda entry, b, e: (read.__setitem__(0, read[0] + e - b), plain_read(entry, b, e))[1])
    sharded.PIECE_ELEMENTS, reads = 200, {}
    for name, cfg in CHECKPOINT_CASES.items():
        calibration = os.path.join(out_dir, "ids.pt") if cfg["pruning_type"] != "magnitude" else None
        read[0] = 0
        fxprune.prune_checkpoint(src, cfg, os.path.join(out_dir, f"{name}.alone{rank}"),
                                 calibration=calibration, group=alone[rank])
        reads[name], read[0] = [read[0]], 0
        fxprune.prune_checkpoint(src, cfg, os.path.join(out_dir, f"{name}.both"), calibration=calibration)
        reads[name].append(read[0])
    ShardSet._read = staticmethod(plain_read)
    errors["reads"] = reads
    try:    # exists: rank 0 finds it, both stop
        fxprune.prune_checkpoint(src, CHECKPOINT_CASES["magnitude_global_1x1"],
                                 os.path.join(out_dir, "magnitude_local_2of4.both"))
    except Exception as e:
        errors["exists"] = (type(e).__name__, str(e))
    torch.save(errors, os.path.join(out_dir, f"checkpoint_errors.{rank}.pt"))
    dist.destroy_process_group()


CHECKPOINT_CASES = {
    "magnitude_global_1x1": {"pruning_type": "magnitude", "pattern": "1x1", "target_sparsity": 0.6,
                             "pruning_scope": "global"},
    "magnitude_global_4x1": {"pruning_type": "magnitude", "pattern": "4x1", "target_sparsity": 0.5,
                             "pruning_scope": "global", "max_sparsity_ratio_per_op": 0.7},
    "magnitude_local_2of4": {"pruning_type": "magnitude", "pattern": "2:4", "target_sparsity": 0.5},
    "wanda_2of4": {"pruning_type": "activation", "pattern": "2:4", "target_sparsity": 0.5,
                   "pruning_scope": "local", "block_batch_tokens": 24},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    model = _llama()
    with torch.no_grad():   # ties across layers: the global tie split must match too
        model.model.layers[0].mlp.up_proj.weight[:2] = 0.01
        model.model.layers[1].mlp.up_proj.weight[:2] = 0.01
    model.save_pretrained(out / "llama", max_shard_size="20KB")
    torch.save(_calib(), out / "ids.pt")
    init = f"file://{out / 'store'}"
    mp.spawn(_worker, args=(WORLD, init, str(out)), nprocs=WORLD)
    runs = {part: [torch.load(out / f"{part}.{r}.pt") for r in range(WORLD)]
            for part in ("transform", "error", "checkpoint_errors", "split", "learned", "zeros", "late",
                         "two_groups")}
    runs["hang"] = torch.load(out / "hang.0.pt")
    runs["dir"] = out
    return runs


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("case", ["magnitude_global", "magnitude_local", "wanda_1x1", "wanda_2of4"])
def test_bit_identical_to_one_process(runs, case):
    per_rank = [results for results, _ in runs["transform"]]
    for ref, par in (r[case] for r in per_rank):
        pruned = [n for n in ref if ".layers." in n and n.endswith("proj.weight")]
        assert len(pruned) == 14
        zeros = [int((ref[n] == 0).sum()) for n in pruned]
        half = [ref[n].numel() // 2 for n in pruned]
        if case.endswith("global"):
            assert sum(zeros) == sum(half) and zeros != half    # one ranking over all layers
        else:
            assert zeros == half
        _assert_same(ref, par)
    _assert_same(per_rank[0][case][1], per_rank[1][case][1])


@pytest.mark.parametrize("case", ["sparse_gpt_1x1", "sparse_gpt_2of4", "sparse_gpt_2of4_refit",
                                  "sparse_gpt_1x1_true_sequential"])
def test_sparse_gpt_is_bit_identical_to_one_process(runs, case):
    per_rank = [results for results, _ in runs["transform"]]
    for ref, par in (r[case] for r in per_rank):
        changed = 0
        for n in ref:
            assert torch.equal(ref[n] == 0, par[n] == 0), n          # identical masks
            assert torch.equal(par[n], ref[n]), n                    # and weights
            changed += ".layers." in n and not torch.equal(ref[n], _llama().get_parameter(n).detach() * (ref[n] != 0))
        assert changed == 14                      # the OBS update changed every pruned layer
    _assert_same(per_rank[0][case][1], per_rank[1][case][1])   # every rank holds the same


def test_report_counts_the_zeros_of_every_weight(runs):
    """Block by block, each rank counts the zeros of its share of a pruned weight's rows and the
    shares are summed: the report's counts are one process's and those of the weights."""
    for zeros, (results, _) in zip(runs["zeros"], runs["transform"]):
        for case, (alone, both) in zeros.items():
            ref = results[case][0]
            assert alone == both == {n: int((ref[n] == 0).sum()) for n in alone}, case
            pruned = [z for n, z in alone.items() if ".layers." in n]
            assert len(pruned) == 14 and all(pruned), case


def test_every_rank_learns_the_same_costs_from_the_first_block(runs):
    """The SparseGPT step times its factors and solves; the times travel with the next block's
    counts, so block 2's plan uses costs measured on block 1, the same numbers on every rank
    (the results above, with these plans, are still one process's)."""
    per_rank = runs["learned"]
    for case in ("sparse_gpt_1x1", "sparse_gpt_2of4"):
        steps = [learned[case] for learned in per_rank]
        assert steps[0] == steps[1]
        first, scales = steps[0]                # at each block's reduction: none before block 1
        assert first == {} and len(scales) == 1  # before block 2: one geometry (a decoder block)
        (factor_scale, solve_scale), = scales.values()
        assert len(factor_scale) == len(solve_scale) == 4
        assert all(x > 0 for x in factor_scale + solve_scale)
    assert per_rank[0]["wanda_1x1"] == [{}, {}]          # Wanda: nothing timed


def test_each_rank_runs_only_its_share_of_the_calibration(runs):
    """5 batches of 24 tokens, merged into block batches of up to 48 tokens: 3 block batches (2,
    2, 1 batches); rank 0 takes block batches 0 and 2, rank 1 block batch 1. A block runs twice
    per block batch (record, stopped after its last layer's input, then the pruned block for the
    next block's inputs). Magnitude needs no calibration forward."""
    for rank, (_, counts) in enumerate(runs["transform"]):
        mine = 2 if rank == 0 else 1
        forwards = {case: (alone[0], par[0]) for case, (alone, par) in counts.items()}
        # the example inputs' run before capture and the capture's call, no calibration
        capture = forwards["magnitude_global"]
        assert capture[0] == capture[1] <= 2
        # block by block, the layers come from one eager run on the example inputs (block 0 once)
        for case in ("wanda_1x1", "sparse_gpt_2of4"):
            assert forwards[case] == (1 + 2 * 3, 1 + 2 * mine)
        # true_sequential: 4 recording forwards per block batch (one per stage), 2 block batches
        # of 72 + 48 tokens, one per rank
        assert forwards["sparse_gpt_1x1_true_sequential"] == (1 + 5 * 2, 1 + 5 * 1)


def test_sparse_gpt_work_is_split_between_the_ranks(runs):
    """Per block 4 inverse factors (q/k/v share one input, gate/up one, o, down), each computed
    on one rank only, and 256 weight rows (q/k/v 64, o 32, gate/up 128, down 32) split between
    the ranks; one process does all of it."""
    per_rank = [counts for _, counts in runs["transform"]]
    for case in ("sparse_gpt_1x1", "sparse_gpt_2of4", "sparse_gpt_1x1_true_sequential"):
        for counts in per_rank:
            assert counts[case][0][1] == (8, 512)                  # alone: 2 blocks x (4, 256)
        factors = [counts[case][1][1][0] for counts in per_rank]
        rows = [counts[case][1][1][1] for counts in per_rank]
        assert sum(factors) == 8 and sum(rows) == 512             # each piece on one rank
        if case != "sparse_gpt_1x1_true_sequential":    # (a stage's step has a single factor)
            assert min(factors) > 0 and min(rows) > 0
    assert per_rank[0]["wanda_1x1"][1][1] == (0, 0)


def test_rows_from_the_other_rank_are_written_as_the_next_forward_reaches_them(runs):
    """A rank writes the rows it solved at once and the other rank's when the pruned forward
    that makes the next block's inputs reaches their layer (a pre-hook: it starts that forward
    while they may still be arriving); the last block has no such forward, so its other rank's
    rows are all written at its end. The results above are still one process's."""
    for late in runs["late"]:
        for case in ("sparse_gpt_1x1", "sparse_gpt_2of4"):
            (first_deferred, first_left), (last_deferred, last_left) = late[case]   # 2 blocks
            assert first_deferred > 0 and first_left == 0
            assert last_left == last_deferred > 0


def test_factors_sent_between_ranks_give_the_same_result(runs):
    """With a plan that computes factors on one rank and solves their rows on the other (sent
    point-to-point), the result is still one process's, bit for bit."""
    per_rank = [results for results, _ in runs["transform"]]
    for rank, (split, sends, _, _) in enumerate(runs["split"]):
        assert sends == (2 * 2 if rank == 1 else 0)          # 2 factors per block, 2 blocks
        _assert_same(per_rank[rank]["sparse_gpt_2of4"][0], split)


def _rank_1_weight_error_stops_every_rank(outcomes, message: str) -> None:
    """Rank 1 raised ``WeightError(message)``, every other rank ``DistributedError`` with it,
    all within the collective timeout; ``outcomes``: per rank, (error, seconds)."""
    for rank, (error, seconds) in enumerate(outcomes):
        assert error is not None, f"rank {rank} did not fail"
        if rank == 1:
            assert error == ("WeightError", message)
        else:
            assert error == ("DistributedError", f"rank 1 failed: {message}")
        assert seconds < TIMEOUT_S


def test_a_failing_solve_stops_every_rank_with_its_message(runs):
    """The SparseGPT step has no status exchange of its own: the error flag travels with the
    results' all-gather, then every rank raises."""
    _rank_1_weight_error_stops_every_rank([(error, seconds) for _, _, error, seconds in runs["split"]],
                                          "sparse_gpt produced non-finite weights for a test layer")


def test_a_solve_failing_in_one_of_two_groups_stops_every_rank_and_leaves_no_hook(runs):
    _rank_1_weight_error_stops_every_rank([(error, seconds) for error, seconds, _ in runs["two_groups"]],
                                          "sparse_gpt produced non-finite weights for an attention layer")
    assert [hooks_left for _, _, hooks_left in runs["two_groups"]] == [0] * WORLD


def test_a_failing_rank_stops_every_rank_with_its_message(runs):
    for rank, (error, seconds) in enumerate(runs["error"]):
        assert error is not None, f"rank {rank} did not fail"
        kind, message = error
        if rank == 1:   # the failing rank raises its own error
            assert kind == "IndexError"
        else:
            assert kind == "DistributedError"
            assert message.startswith("rank 1 failed: IndexError: index out of range")
        assert seconds < TIMEOUT_S      # reported at the next collective step, not by the timeout


def test_a_hanging_rank_is_reported_after_the_timeout(runs):
    """Rank 1 never reaches a collective step: rank 0 stops with a DistributedError after the
    group's timeout (3 s) instead of waiting forever."""
    error, seconds = runs["hang"]
    assert error is not None
    kind, message = error
    assert kind == "DistributedError"
    assert message.startswith("rank 0: lost the other ranks at ")
    assert "process group's timeout" in message
    assert HANG_TIMEOUT_S <= seconds < HANG_TIMEOUT_S + 10


def _tensors(directory):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_sharded_checkpoint_is_bit_identical_to_one_process(runs, case):
    out = runs["dir"]
    shards = sorted(p.name for p in (out / "llama").glob("*.safetensors"))
    assert len(shards) >= 4
    both = out / f"{case}.both"
    for rank in range(WORLD):
        alone = out / f"{case}.alone{rank}"
        assert sorted(p.name for p in alone.glob("*.safetensors")) == shards
        assert sorted(p.name for p in both.iterdir()) == sorted(p.name for p in alone.iterdir())
        a, b = _tensors(alone), _tensors(both)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        assert (both / "fxprune_report.json").read_text() == (alone / "fxprune_report.json").read_text()
    dense = _tensors(out / "llama")
    zeros = sum(int((t == 0).sum()) - int((dense[k] == 0).sum()) for k, t in _tensors(both).items())
    assert zeros > 0
    assert not [p for p in out.iterdir() if ".partial-" in p.name]     # no leftovers


def test_sharded_global_magnitude_splits_the_reads_between_the_ranks(runs):
    # each rank reads its half of every weight's rows in the selection passes and writes its own
    # shards: together they read what one process reads, each well under it
    (alone0, both0), (alone1, both1) = (r["reads"]["magnitude_global_1x1"] for r in runs["checkpoint_errors"])
    assert alone0 == alone1 == both0 + both1
    assert max(both0, both1) < 0.7 * alone0


def test_sharded_checkpoint_error_stops_both_ranks(runs):
    (kind0, msg0), (kind1, msg1) = (r["exists"] for r in runs["checkpoint_errors"])
    assert kind0 == "CheckpointError" and "exists" in msg0
    assert kind1 == "DistributedError" and msg1.startswith("rank 0 failed: output directory")


def _check_plan(plan, cols, rows, cuts, world, cost):
    import fxprune.distributed as d
    factor_cost = d.factor_cost        # as monkeypatched
    load = [0.0] * world
    for g, owner in enumerate(plan.owner):
        load[owner] += factor_cost(cols[g])
        ends = [0] + [r1 for _, _, r1 in plan.ranges[g]]
        assert [r0 for _, r0, _ in plan.ranges[g]] == ends[:-1] and ends[-1] == rows[g]
        assert all(r0 in cuts[g] for _, r0, _ in plan.ranges[g])
        for r, r0, r1 in plan.ranges[g]:
            load[r] += cost(r1 - r0, cols[g])
    assert load == pytest.approx(plan.load)
    return load


def test_sparse_gpt_plan_splits_the_work_at_allowed_cuts(monkeypatch):
    import fxprune.distributed as d
    # a Llama block of the bench size: q/k/v, o, gate/up, down
    cols, rows = [512, 512, 512, 1376], [1536, 512, 2752, 512]
    cuts = [list(range(0, r, 64)) + [r] for r in rows]
    one = d.plan_sparse_gpt(cols, rows, cuts, 1)
    assert one.owner == [0, 0, 0, 0] and one.ranges == [[(0, 0, r)] for r in rows]
    # with the per-column cost of today's solves, 2 ranks: down_proj (its factor and rows) on
    # one rank, the three others on the other
    two = d.plan_sparse_gpt(cols, rows, cuts, 2)
    assert two.owner == [1, 1, 1, 0]
    assert two.ranges == [[(1, 0, 1536)], [(1, 0, 512)], [(1, 0, 2752)], [(0, 0, 512)]]
    _check_plan(two, cols, rows, cuts, 2, d.solve_cost)
    assert max(two.load) < 1.01 * sum(two.load) / 2
    for world in (3, 4):
        plan = d.plan_sparse_gpt(cols, rows, cuts, world)
        assert plan == d.plan_sparse_gpt(cols, rows, cuts, world)     # the same on every rank
        _check_plan(plan, cols, rows, cuts, world, d.solve_cost)
    # with pure FLOP costs (no per-column cost), splitting rows evens 3 ranks within 5 %
    flops = lambda r, c: float(r) * c * c                                   # noqa: E731
    monkeypatch.setattr(d, "solve_cost", flops)
    monkeypatch.setattr(d, "factor_cost", lambda c: float(c) ** 3 / 3)
    plan = d.plan_sparse_gpt(cols, rows, cuts, 3)
    load = _check_plan(plan, cols, rows, cuts, 3, flops)
    assert max(load) < 1.05 * sum(load) / 3
    assert sum(len(r) for r in plan.ranges) > 4                            # some rows were split
    # unstructured masks: whole layers only
    plan = d.plan_sparse_gpt([512], [1536], [[0, 512, 1024, 1536]], 2)
    assert all(r0 in (0, 512, 1024) for _, r0, _ in plan.ranges[0])


def test_sparse_gpt_plan_follows_measured_costs():
    """Scaled by measured / modelled cost (here: the small layers' solves dearer than modelled,
    down_proj's cheaper), the plan moves the q/k/v and o factors to down_proj's rank: their rows
    stay, the loads even out, and their factors are computed first, before the rows need them."""
    import fxprune.distributed as d
    cols, rows = [512, 512, 512, 1376], [1536, 512, 2752, 512]
    cuts = [list(range(0, r, 64)) + [r] for r in rows]
    model = d.plan_sparse_gpt(cols, rows, cuts, 2)
    fs, ss = [0.84, 0.84, 0.84, 0.73], [0.82, 0.75, 1.02, 0.74]
    plan = d.plan_sparse_gpt(cols, rows, cuts, 2, factor_scale=fs, solve_scale=ss)
    assert plan.owner == [0, 0, 1, 0]
    assert plan.ranges == [[(1, 0, 1536)], [(1, 0, 512)], [(1, 0, 2752)], [(0, 0, 512)]]
    scaled = [0.0, 0.0]
    for g, owner in enumerate(plan.owner):
        scaled[owner] += d.factor_cost(cols[g]) * fs[g]
        for r, r0, r1 in plan.ranges[g]:
            scaled[r] += d.solve_cost(r1 - r0, cols[g]) * ss[g]
    assert scaled == pytest.approx(plan.load)
    assert max(plan.load) < 1.01 * sum(plan.load) / 2
    # the model's whole-group plan, costed the same way, is 9 % above an even share
    whole = [0.0, 0.0]
    for g, owner in enumerate(model.owner):
        whole[owner] += d.factor_cost(cols[g]) * fs[g] + d.solve_cost(rows[g], cols[g]) * ss[g]
    assert max(whole) > 1.08 * sum(whole) / 2
    # unscaled, the whole groups stay together
    assert model.owner == [1, 1, 1, 0]


def test_learned_scales_are_time_over_modelled_cost():
    import fxprune.distributed as d
    key, other = ((512, 1536), (1376, 512)), ((64, 64),)
    scales = d.learned_scales({key: ([0.5, 1.0, 3.0, 2.0], [10.0, 20.0, 1.0, 4.0]),
                               other: ([0.5, 0.25], [1.0, 1.0])})
    assert scales == {key: ([0.05, 0.05], [3.0, 0.5]), other: ([0.5], [0.25])}


def test_plans_use_the_cost_ratios_of_all_the_blocks_so_far():
    """Each block's times add to the earlier blocks' of the same geometry: the scales are the
    ratios of the sums (a noisy block moves them part of the way only), and a step with an
    untimed group (a failed factor) adds nothing."""
    import fxprune.distributed as d
    dist = object.__new__(d.Distributed)        # the learning needs no process group
    dist.scales, dist.cost_sums = {}, {}
    key = ((512, 1536), (1376, 512))
    modelled = [10.0, 20.0, 1.0, 4.0]
    dist.learn_costs([(key, [0.0] * 4, modelled)], [1.0, 2.0, 1.0, 2.0])
    assert dist.scales == {key: ([0.1, 0.1], [1.0, 0.5])}
    dist.learn_costs([(key, [0.0] * 4, modelled)], [3.0, 2.0, 2.0, 2.0])
    assert dist.scales == {key: ([0.2, 0.1], [1.5, 0.5])}       # (1 + 3) / 20, (1 + 2) / 2...
    dist.learn_costs([(key, [0.0] * 4, modelled)], [3.0, 0.0, 2.0, 2.0])   # untimed: kept
    assert dist.scales == {key: ([0.2, 0.1], [1.5, 0.5])}
    other = ((64, 64),)
    dist.learn_costs([(other, [0.0] * 2, [1.0, 1.0]), (key, [0.0] * 4, modelled)],
                     [0.5, 0.25, 0.0, 2.0, 2.0, 4.0])
    assert dist.scales[other] == ([0.5], [0.25])
    assert dist.scales[key] == ([0.2, 0.1], [1.5, 0.5])                  # its step untimed


def test_mean_of_sum_is_the_float64_sum_divided_once():
    """The two ranks' partial Hessians summed and averaged chunk by chunk give the bits of
    the float64 sum divided by the count and rounded once to float32 (BlockInputStats.hessian),
    for float32 and float64 partials, written over a float32 operand."""
    import fxprune.distributed as d
    g = torch.Generator().manual_seed(0)
    for n, (da, db) in [(300, (torch.float32, torch.float32)), (97, (torch.float64, torch.float32)),
                        (64, (torch.float64, torch.float64))]:
        x = torch.randn(200, n, generator=g) * torch.rand(n, generator=g) * 1e3
        y = torch.randn(150, n, generator=g)
        a, b = (x.T @ x).to(da), (y.T @ y).to(db)
        ref = torch.empty(n, n)
        torch.div(torch.zeros(n, n, dtype=torch.float64).add_(a).add_(b), 350, out=ref)
        a2, b2 = a.clone(), b.clone()
        got = d.mean_of_sum(a2, b2, 350)
        assert got.dtype == torch.float32 and torch.equal(got, ref)
        assert (got.data_ptr() == a2.data_ptr()) == (da == torch.float32)
        assert not torch.equal(ref, (a.float() + b.float()) / 350)     # float32 sums differ


def test_cli_under_torchrun_writes_what_one_process_writes(tmp_path):
    """``torchrun --nproc-per-node 2 -m fxprune prune`` on a Hugging Face directory: the same
    pruned checkpoint (SparseGPT 2:4, bit for bit) and report as
    ``python -m fxprune prune``; rank 0 alone prints the table."""
    import json
    import subprocess
    import sys

    from tiny_llm import tiny_llama, token_batches
    src = tmp_path / "llama"
    tiny_llama(2).save_pretrained(src, max_shard_size="20KB")
    torch.save(token_batches(4), tmp_path / "ids.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(CASES["sparse_gpt_2of4"] | {"block_batch_tokens": 24}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    args = ["-m", "fxprune", "prune", str(src), "--config", str(tmp_path / "cfg.json"),
            "--calibration", str(tmp_path / "ids.pt")]
    # the reference in its own process, one thread as each rank (torch.set_num_threads here
    # would change this test process's BLAS for the tests after it)
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one"), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", *args, "--out", str(tmp_path / "two"),
                          "--timeout", "60"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("pruned checkpoint:") == 1                  # rank 0 only
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    linears = [k for k in a if ".layers." in k and k.endswith("proj.weight")]
    assert len(linears) == 14
    assert all(int((a[k] == 0).sum()) == a[k].numel() // 2 for k in linears)    # 2:4
    assert ((tmp_path / "one" / "fxprune_report.json").read_text()
            == (tmp_path / "two" / "fxprune_report.json").read_text())
