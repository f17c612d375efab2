"""``fxprune.prune_checkpoint``: prune a Hugging Face model directory without loading the model.

Steps (each weight is read from the shards when its turn comes and dropped once written):

1. checks, before anything is written: the directory (``config.json``, the safetensors index and
   shards, their headers), the config, the targets (discovered on a weightless skeleton, see
   :mod:`.skeleton`), every selected weight's tensor and dtype, the calibration, the output path;
2. the output is built in a temporary directory next to ``out_dir``: shards copied, then each
   pruned weight written over its bytes; config, tokenizer and generation files copied; the
   sparsity report written;
3. the temporary directory is renamed to ``out_dir`` only when everything succeeded; on any
   error (or Ctrl-C) it is removed, so ``out_dir`` is either complete or absent.

Magnitude, local scope (or N:M at its full target, which ranks nothing across layers): one pass,
layer by layer. Global scope: the pattern's own global selection over lazily-read scores
(:meth:`BasePattern.plan_global`: the exact threshold and tie split, decided in streaming passes
over the shards), then one more pass that masks and writes each layer. The masks equal
``fxprune.transform``'s on the loaded model bit for bit (same scores, same selection code, same
layer order). Data-aware criteria run block by block (:mod:`.calibrated`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import PruningConfig
from ..criteria import get_criterion_class
from ..errors import ConfigError
from ..geometry import from_view_2d
from ..passes import AttachPass, CapturePass, DiscoverPass, PassManager, PruneContext
from ..passes.mask import check_mask, mask_group
from ..passes.record import build_report, layer_report
from ..passes.score import _view_scores
from ..patterns.base import BasePattern
from ..report import SparsityReport, count_zeros
from ..selection import LazyScores
from ..sequential import find_blocks, release_free_memory
from .shards import PRUNABLE_DTYPES, CheckpointError, ShardSet, ShardWriter
from .skeleton import CONFIG_FILE, KeyMap, build_skeleton, example_inputs, load_config

REPORT_FILE = "fxprune_report.json"
FORMATS = ("safetensors", "compressed-tensors")
# Weights in other formats would be the unpruned model again; not copied.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".safetensors")

Progress = Callable[[str, int, int], None]
_FIX_WEIGHTS = "fix the checkpoint's weights (or exclude the layer with excluded_op_names)"


def prune_checkpoint(src_dir: str | os.PathLike, config: Any, out_dir: str | os.PathLike, *,
                     calibration: Any = None, format: str = "safetensors",
                     progress: Progress | None = None, group: Any = None) -> SparsityReport:
    """Prune the Hugging Face model directory ``src_dir`` into ``out_dir``; return the report.

    Args:
        src_dir: a directory with ``config.json`` and safetensors weights (``model.safetensors``
            or shards with ``model.safetensors.index.json``), as ``save_pretrained`` writes it.
        config: as for :func:`fxprune.transform` (dict, YAML/JSON path, PruningConfig).
        out_dir: must not exist; created complete, or not at all. It loads with
            ``AutoModelForCausalLM.from_pretrained(out_dir)`` and holds ``fxprune_report.json``.
        calibration: token ids for the data-aware criteria (``activation``, ``sparse_gpt``): a
            ``[N, seq]`` integer tensor, a list of such batches, or the path of a ``.pt`` file
            holding either.
        format: ``"safetensors"`` (dense weights with zeros, the source's shard layout) or
            ``"compressed-tensors"`` (the sparse format vLLM loads; needs the
            ``compressed-tensors`` package).
        progress: ``progress(stage, done, total)``, called per decoder block.
        group: a ``torch.distributed`` process group: every rank calls ``prune_checkpoint`` with
            the same arguments, each reads and writes its own shards (see
            :mod:`fxprune.checkpoint.sharded`). By default the default process group when one is
            initialised with more than one process.

    Only the weights of one layer (data-aware criteria: one decoder block) are in memory at a time.
    """
    from ..distributed import resolve

    dist = resolve(group)
    if dist is None:
        return _prune(Path(src_dir), config, Path(out_dir), calibration, format, progress, None)
    with dist.guard("the end of prune_checkpoint"):    # one rank's error stops every rank
        return _prune(Path(src_dir), config, Path(out_dir), calibration, format,
                      progress if dist.rank == 0 else None, dist)


def _prune(src: Path, config, out: Path, calibration, format, progress, dist) -> SparsityReport:
    if format not in FORMATS:
        raise ConfigError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    job = _Job(src, config, calibration, progress, dist)
    if format == "compressed-tensors":
        from .compressed import check_available
        check_available(job.hf_config)
    if dist is None:
        tmp = _make_temp_dir(out, src)
    else:   # rank 0 makes the one temporary directory every rank writes into
        made = dist.run("the output directory", lambda: _make_temp_dir(out, src) if dist.rank == 0 else None)
        tmp = Path(dist.all_gather_objects(None if made is None else str(made))[0])
    try:
        job.run(tmp)
        if dist is not None:
            dist.check("the pruned shards")     # every rank's shards are written
        if job.rank0:
            if format == "compressed-tensors":
                from .compressed import compress_directory
                compress_directory(tmp, job.report, job.shards)
            os.rename(tmp, out)
    except BaseException:
        if job.rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return job.report


class _Job:
    """One checkpoint pruning run: everything is checked in ``__init__``, written in ``run``."""

    def __init__(self, src: Path, config: Any, calibration: Any, progress: Progress | None,
                 dist: Any = None):
        self.src, self.progress = src, progress
        self.dist, self.rank0 = dist, dist is None or dist.rank == 0
        self.hf_config = load_config(src)
        self.shards = ShardSet(src)
        cfg = PruningConfig.from_any(config)
        cfg.warn_ignored_keys()
        self.model = build_skeleton(self.hf_config)
        self.ctx = PruneContext(model=self.model, config=cfg,
                                example_inputs=example_inputs(self.hf_config))
        self.ctx.distributed = dist
        self.own_files = None           # several ranks: the shard files this rank reads and writes
        if dist is not None:
            from .sharded import own_files
            self.own_files = own_files(self.shards, dist)
        PassManager([CapturePass(), DiscoverPass(), AttachPass()]).run(self.ctx)
        self.ctx.graph_module = None   # only the targets are needed
        self.keys = KeyMap(self.shards, getattr(self.model, "base_model_prefix", ""))
        self._names: dict[int, list[str]] = {}   # every name of each (tied) parameter
        for name, p in self.model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), []).append(name)
        self._names_of = {n: names for names in self._names.values() for n in names}
        self.key_of: dict[str, str] = {}
        for t in self.ctx.targets.values():
            key = self.keys.find([t.param, *(a + ".weight" for a in t.aliases)])
            if key is None:
                raise CheckpointError(
                    f"{src}: the shards hold no tensor {t.param!r} (layer {t.name}), which the "
                    f"model of {CONFIG_FILE} has; the checkpoint and its config do not match")
            entry = self.shards.entries[key]
            if t.selected and entry.dtype not in PRUNABLE_DTYPES:
                raise CheckpointError(
                    f"{entry.file.name}: tensor {key!r} is stored as {entry.dtype}; fxprune prunes "
                    f"{'/'.join(PRUNABLE_DTYPES)} weights (dequantize the checkpoint first, or "
                    f"exclude {t.name} with excluded_op_names)")
            if entry.shape != t.geometry.weight_shape:
                raise CheckpointError(
                    f"{entry.file.name}: tensor {key!r} has shape {list(entry.shape)}, the model of "
                    f"{CONFIG_FILE} expects {list(t.geometry.weight_shape)}")
            self.key_of[t.param] = key
        self.data_groups, self.plain_groups = [], []
        for group in self.ctx.groups:
            if not self.ctx.selected(group):
                continue
            kind = get_criterion_class(group.pruning_type, group.where)
            if kind.needs_gradients or kind.training_only or group.pruning_type == "pattern_lock":
                raise ConfigError(
                    f"{group.where}: pruning_type {group.pruning_type!r} is not available for "
                    f"checkpoints (it needs training); use magnitude, activation or sparse_gpt, or "
                    f"load the model and use fxprune.transform / fxprune.Pruner")
            (self.data_groups if kind.needs_data else self.plain_groups).append(group)
        self.calibration = None
        if self.data_groups:
            from .calibrated import check_block_sequential, load_calibration
            check_block_sequential(self)
            self.calibration = load_calibration(calibration, self.hf_config, self.data_groups)
        elif calibration is not None:
            raise ConfigError("calibration was given but no pruning group uses a data-aware "
                              "criterion (activation, sparse_gpt); drop it or change pruning_type")
        self.report: SparsityReport | None = None

    # ------------------------------------------------------------------ writing
    def owns(self, t) -> bool:
        """Whether this rank reads and writes the weight of target ``t`` (always, on one process)."""
        return self.own_files is None or self.shards.entries[self.key_of[t.param]].file in self.own_files

    def run(self, out: Path) -> None:
        self.writer = ShardWriter(self.shards, out,
                                  {self.key_of[t.param] for t in self.ctx.selected() if self.owns(t)},
                                  files=self.own_files, index=self.rank0)
        if self.rank0:
            _copy_side_files(self.src, out, self.shards)
        self.zeros: dict[str, int] = {}
        self._ticker = _BlockTicker([t for t in self.ctx.selected() if self.owns(t)],
                                    find_blocks(self.model), self.progress)
        for group in self.plain_groups:
            self._prune_streaming(group)
        if self.data_groups:
            from .calibrated import prune_calibrated
            prune_calibrated(self)
        self.writer.finish()

        def count_the_rest():
            for t in self.ctx.targets.values():
                if t.param not in self.zeros and self.owns(t):
                    self.zeros[t.param] = self.count_stored_zeros(self.key_of[t.param])
        if self.dist is None:
            count_the_rest()
        else:   # each rank counted its own layers
            self.dist.run("the report", count_the_rest)
            for part in self.dist.all_gather_objects(self.zeros):
                self.zeros.update(part)
        layers = [layer_report(t, self.zeros[t.param], t.geometry.numel)
                  for t in self.ctx.targets.values()]
        self.report = build_report(self.ctx, layers)
        self.report.capture = f"meta skeleton, {self.ctx.capture_method}"
        if self.rank0:
            self.report.to_json(out / REPORT_FILE)

    def aliases_of(self, name: str) -> list[str]:
        """The other names of a tied parameter (GPT-2's ``lm_head.weight`` for ``transformer.wte.weight``)."""
        return [n for n in self._names_of.get(name, []) if n != name]

    def write_block_target(self, t, weight: torch.Tensor, keep: torch.Tensor | None) -> None:
        """A target the block-sequential pass pruned in the model: write it (and, for
        output-channel patterns, the bias/BatchNorm entries it zeroed) into the output shards."""
        if not self.owns(t):        # another rank writes it
            return
        self.writer.write(self.key_of[t.param], weight)
        self.zeros[t.param] = count_zeros(weight)
        if getattr(t.pattern, "prunes_output_channels", False):
            for name in ([t.bias] if t.bias else []) + t.channel_followers:
                key = self.keys.find([name])
                if key is not None:
                    module_name, _, attr = name.rpartition(".")
                    self.writer.write(key, getattr(self.model.get_submodule(module_name), attr).detach())

    def read_weight(self, t) -> torch.Tensor:
        return self.shards.read(self.key_of[t.param])

    def write_pruned(self, t, weight: torch.Tensor, keep: torch.Tensor) -> None:
        """Zero the pruned weights of ``t`` (and whole channels' bias/BatchNorm entries for
        output-channel patterns) and write them into the output shards."""
        t.status = "pruned"
        if not self.owns(t):        # another rank writes it
            return
        with torch.no_grad():
            weight.mul_(from_view_2d(keep, t.geometry).to(dtype=weight.dtype))
        self.writer.write(self.key_of[t.param], weight)
        self.zeros[t.param] = count_zeros(weight)
        if getattr(t.pattern, "prunes_output_channels", False):
            dead = ~keep.any(dim=1)
            for name in ([t.bias] if t.bias else []) + t.channel_followers:
                key = self.keys.find([name])
                if key is None:
                    continue
                tensor = self.shards.read(key)
                if tensor.shape[:1] == dead.shape:
                    tensor[dead] = 0
                    self.writer.write(key, tensor)
        self._ticker.done(t.name)
        del weight, keep
        release_free_memory()

    def _prune_streaming(self, group) -> None:
        targets = self.ctx.selected(group)
        pattern = targets[0].pattern
        criterion = get_criterion_class(group.pruning_type, group.where)(group)

        def scores_of(t):
            # the previous layer's buffers, freed, go back to the system first: glibc keeps
            # multi-MB blocks in its heap once they were freed, and the selection passes read
            # every layer several times, so the resident peak would drift by hundreds of MB
            release_free_memory()
            weight = self.read_weight(t)
            return weight, _view_scores(criterion, t, weight, f" in {self.src}", _FIX_WEIGHTS)

        if not pattern.layers_are_independent() and _ranks_with_plans(pattern):
            from .sharded import OneRank, prune_rows, rows_apply
            if rows_apply(targets, pattern, criterion):
                def scores_of_rows(t, start, stop):
                    release_free_memory()
                    weight = self.shards.read_rows(self.key_of[t.param], start, stop)
                    return weight, _view_scores(criterion, t, weight,
                                                f" (rows {start}-{stop - 1}) in {self.src}", _FIX_WEIGHTS)
                prune_rows(self, targets, pattern, scores_of_rows, self.dist or OneRank())
                return

        if self.dist is not None:
            from .sharded import prune_streaming
            done = prune_streaming(self, group, scores_of)
            for t in targets:
                t.status = "pruned"
            if done:
                return

        if pattern.layers_are_independent():
            self.write_independent(group, targets, scores_of)
        elif _ranks_with_plans(pattern):
            lazy = self.lazy_block_scores(pattern, targets, scores_of)
            plans = pattern.plan_global(lazy, {t.param: t.layout for t in targets})
            del lazy
            self.write_planned(pattern, plans, targets, scores_of)
        else:
            # A pattern with its own global ranking gets every layer's scores at once, as in memory
            # (float32 scores of the whole group are held).
            masks = mask_group(group, targets, {t.param: scores_of(t)[1] for t in targets})
            for t in targets:
                self.write_pruned(t, self.read_weight(t), masks.pop(t.param))


    def write_independent(self, group, targets, scores_of) -> None:
        """Layers whose masks do not depend on each other: the mask pass's path, one layer at a
        time."""
        for t in targets:
            weight, scores = scores_of(t)
            keep = mask_group(group, [t], {t.param: scores}, warn=False)[t.param]
            self.write_pruned(t, weight, keep)

    def write_rows(self, t, cut, pieces, scores_of_rows) -> None:
        """Mask and write the weight of ``t`` piece by piece (row ranges, in order) with its share
        ``cut`` of a global selection over 1x1 blocks."""
        key = self.key_of[t.param]
        ties = zeros = 0
        for n, (start, stop) in enumerate(pieces):
            weight, scores = scores_of_rows(t, start, stop)
            pruned, ties = cut.pruned_part(scores.view(torch.int32), ties)
            del scores
            # as weight.mul_(keep) in write_pruned (a pruned negative weight becomes -0.0), with
            # bool temporaries only
            negative = torch.signbit(weight)
            negative &= pruned
            weight.masked_fill_(pruned, 0.0)
            weight.masked_fill_(negative, -0.0)
            del pruned, negative
            self.writer.write_rows(key, start, weight, last=n == len(pieces) - 1)
            zeros += count_zeros(weight)
            del weight
        if not pieces:
            self.writer.write(key, self.read_weight(t))
        self.zeros[t.param] = zeros
        self._ticker.done(t.name)
        release_free_memory()

    def count_stored_zeros(self, key: str) -> int:
        """Zeros of a tensor that is not rewritten, read piece by piece: in pieces of one rank's
        share, so that no rank holds more of a weight than its share at a time."""
        from .sharded import row_pieces
        entry = self.shards.entries[key]
        world = 1 if self.dist is None else self.dist.world
        zeros = 0
        for share in row_pieces(entry.rows, entry.numel // max(entry.rows, 1), world):
            for start, stop in share:
                release_free_memory()   # the last piece's freed buffer stays resident until trimmed
                zeros += count_zeros(self.shards.read_rows(key, start, stop))
        release_free_memory()
        return zeros

    @staticmethod
    def lazy_block_scores(pattern: BasePattern, targets, scores_of) -> dict[str, LazyScores]:
        """Each layer's block scores, recomputed from the shards whenever a selection pass needs
        them."""
        return {t.param: LazyScores(lambda t=t: pattern.block_scores(scores_of(t)[1], t.layout),
                                    (t.layout.num_blocks,)) for t in targets}

    def write_planned(self, pattern: BasePattern, plans: dict, targets, scores_of) -> None:
        """Apply a global ranking decided as per-layer plans, one layer at a time (scores read
        again per layer; ``plans`` is consumed)."""
        for t in targets:
            weight, scores = scores_of(t)
            pruned = plans.pop(t.param).pruned(pattern.block_scores(scores, t.layout))
            view = scores if pattern.expand_needs_scores else None
            keep = ~pattern.expand(pruned, t.layout, tuple(t.geometry.view_shape), view)
            check_mask(pattern, t, keep)
            self.write_pruned(t, weight, keep)


def _ranks_with_plans(pattern: BasePattern) -> bool:
    """The global ranking is the base one (built-in patterns): it can be decided in streaming
    passes and applied layer by layer. A user pattern overriding it gets the in-memory call."""
    cls = type(pattern)
    own_masks = cls.get_masks.__module__.startswith("fxprune.patterns")
    return own_masks and cls.get_masks_global is BasePattern.get_masks_global


class _BlockTicker:
    """``progress("prune", blocks done, blocks)`` each time the last layer of a decoder block is
    written (layers outside the blocks, such as a pruned ``lm_head``, count as one more step)."""

    def __init__(self, targets, blocks, progress: Progress | None):
        self.progress = progress
        self.block_of = {t.name: (blocks.index_of(t.param) if blocks is not None else None)
                         for t in targets}
        self.left: dict = {}
        for name, block in self.block_of.items():
            self.left.setdefault(block, set()).add(name)
        self.total, self.finished = len(self.left), 0

    def done(self, name: str) -> None:
        block = self.block_of.get(name, "?")
        if block not in self.left:
            return
        self.left[block].discard(name)
        if not self.left[block]:
            del self.left[block]
            self.finished += 1
            if self.progress is not None:
                self.progress("prune", self.finished, self.total)


def _make_temp_dir(out: Path, src: Path) -> Path:
    if out.exists():
        raise CheckpointError(f"output directory {out} exists; remove it or choose another output path")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {out}: directory {parent} is not writable")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it private; the result should not be
    return tmp


def _copy_side_files(src: Path, out: Path, shards: ShardSet) -> None:
    """config.json, tokenizer, generation config...: every top-level file but the weights."""
    skip = {p.name for p in shards.files}
    if shards.index_file is not None:
        skip.add(shards.index_file.name)
    for path in sorted(src.iterdir()):
        if path.name in skip or not path.is_file() or path.name == REPORT_FILE:
            continue
        if path.name.endswith(_OTHER_WEIGHTS):
            continue
        shutil.copyfile(path, out / path.name)
