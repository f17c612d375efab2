"""``fxprune.Pruner``: gradual pruning during training, with INC's schedule keys.

    pruner = fxprune.Pruner(model, config, optimizer=opt)
    for batch in loader:
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()          # fxprune's optimizer hooks: gradient scores before, re-masking after
        opt.zero_grad()
        pruner.step()       # advance the schedule; prunes when it says so
    model = pruner.finalize()   # plain model, masks baked in, report attached

or INC's callbacks in an existing loop: ``on_step_begin()`` before the forward,
``on_before_optimizer_step()`` after backward, ``on_after_optimizer_step()`` after the
optimizer step.

The layers, groups and patterns are chosen as by ``fxprune.transform`` (capture, discover and
attach passes; the model is pruned in place, since it is being trained). At each pruning step of
a group's :class:`~fxprune.schedule.Schedule`, its criterion scores the weights and its pattern
turns the scores into masks at the scheduled sparsity, through the same score and mask path as
``fxprune.transform`` (``score_targets``, ``mask_group``: global or local, exact counts, the same
checks; the target-missed warning at the last pruning step). Built with ``example_inputs``, a
group whose pattern removes output channels selects coupled channel classes instead, as
``transform`` does, so ``fxprune.compact(model, example_inputs)`` can remove them afterwards. Masks only grow: pruned weights score 0, live ones at least the smallest normal float,
so a pruned block is pruned again first. Between pruning steps the masks are kept: gradients of
pruned weights are masked (a tensor hook on each weight) and the weights are re-masked after
every optimizer step (momentum or weight decay cannot revive them). ``pattern_lock`` groups lock
the zeros the weights have when the Pruner is built. ``finalize()`` removes every hook and
returns the model with the report (``fxprune.sparsity_report``); nothing is added to the model,
so its ``state_dict`` loads into the original class.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_weights
from .config import PruningConfig
from .criteria import Criterion
from .registry import get_criterion_class
from .errors import ConfigError, FxPruneError
from .extensions import calling
from .geometry import from_view_2d, to_view_2d
from .passes import AttachPass, CapturePass, DiscoverPass, PassManager, PruneContext, RecordPass
from .compaction import ChannelAnalysis, joint_selection, plan_from_masks, select_classes, zero_removed
from .passes.mask import mask_group
from .passes.rewrite import zero_pruned_channels
from .passes.score import score_targets
from .schedule import Schedule

LIVE_FLOOR = torch.finfo(torch.float32).tiny   # lowest score of a weight that is not pruned


@dataclass
class _Group:
    config: Any                      # GroupConfig
    targets: list                    # the passes' Targets (selected)
    criterion: Criterion
    schedule: Schedule
    pattern: Any
    completed: int = 0               # INC's completed_pruned_cnt
    sparsity: float = 0.0            # current sparsity of the group's weights
    params: dict = field(default_factory=dict)
    plan: Any = None                 # coupled channel classes: the CompactionPlan of the last step

    @property
    def locked(self) -> bool:
        return self.config.pruning_type == "pattern_lock"


class Pruner:
    """Gradual pruning of ``model`` during training (in place). See the module docstring."""

    def __init__(self, model: nn.Module, config: Any = None, optimizer: torch.optim.Optimizer | None = None,
                 example_inputs: Any = None):
        if not isinstance(model, nn.Module):
            raise FxPruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise FxPruneError(f"optimizer must be a torch.optim.Optimizer built over the model's "
                               f"parameters (or None), got {type(optimizer).__name__}")
        ctx = PruneContext(model=model, config=PruningConfig.from_any(config),
                           example_inputs=example_inputs)
        PassManager([CapturePass(), DiscoverPass(), AttachPass()]).run(ctx)
        # With example inputs, output-channel groups select coupled channel classes, as transform
        # does: the channel analysis is kept, the rest of the graph is not needed any more.
        joint = [g for g in ctx.groups if ctx.selected(g) and joint_selection(ctx, ctx.selected(g)[0].pattern)]
        self._analysis = ChannelAnalysis(ctx.graph_module, ctx.param_of_node, ctx.model).run() if joint else None
        ctx.graph_module = None
        self.model, self.ctx, self.optimizer = model, ctx, optimizer
        self.groups = [self._group(g, ctx) for g in ctx.groups if ctx.selected(g)]
        check_weights(model, ctx.selected())
        if optimizer is not None:
            _check_optimizer_holds(optimizer, self.groups)
        self.masks: dict[str, Tensor] = {}       # param -> keep-mask on the 2-D view (bool)
        self._weight_masks: dict[str, Tensor] = {}  # param -> the mask in the weight's shape
        self._handles: list = []
        self.global_step = 0
        self._begun = self._observed = None
        self._advanced = False
        self._closed = False
        try:
            for g in self.groups:
                for t in g.targets:
                    weight = model.get_parameter(t.param)
                    view = to_view_2d(weight.detach(), t.geometry)
                    self._set_mask(t, (view != 0) if g.locked else torch.ones_like(view, dtype=torch.bool))
                    if weight.requires_grad:
                        self._handles.append(weight.register_hook(functools.partial(self._mask_grad, t.param)))
            if optimizer is not None:
                self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.on_before_optimizer_step()))
                self._handles.append(optimizer.register_step_post_hook(lambda *_: self.on_after_optimizer_step()))
            self.on_step_begin(0)
        except BaseException:
            self._remove_hooks()   # a failed Pruner leaves no hook on the caller's model
            raise

    def _group(self, group, ctx) -> _Group:
        cls = get_criterion_class(group.pruning_type, group.where)
        with calling(cls, "__init__", f"for {group.where}"):
            criterion = cls(group)
        if criterion.one_shot_only:
            raise ConfigError(
                f"{group.where}: pruning_type {group.pruning_type!r} prunes in one shot from "
                f"calibration data; use fxprune.transform(model, config, example_inputs, "
                f"calibration=...) for it, or a training criterion (magnitude, snip_momentum, snip, "
                f"gradient, pattern_lock) with the Pruner")
        schedule = Schedule.from_group(group)
        if criterion.needs_gradients and schedule.one_shot and schedule.start_step == 0:
            raise ConfigError(
                f"{group.where}: pruning_type {group.pruning_type!r} scores from gradients, which "
                f"do not exist yet at step 0; set start_step (and end_step) >= 1")
        targets = ctx.selected(group)
        with calling(criterion, "bind", f"for {group.where}"):
            criterion.bind(targets)
        g = _Group(group, targets, criterion, schedule, targets[0].pattern,
                   completed=schedule.first_count)
        g.params = {t.param: ctx.model.get_parameter(t.param) for t in targets}
        return g

    # ------------------------------------------------------------------ training-loop callbacks
    def on_step_begin(self, local_step: int | None = None) -> None:
        """Before the forward of a step: prune if the schedule says so (once per step).

        As in INC, ``local_step`` (often the step inside the epoch) is accepted and not used: the
        Pruner counts steps itself (``global_step``, advanced by ``on_after_optimizer_step``), so
        a loop that restarts its step index every epoch keeps one schedule."""
        self._check_open()
        self._advanced = False
        if self._begun == self.global_step:
            return
        # Every group's masks first, then apply them: a group that fails (bad weights, a user
        # pattern's error) leaves the model and every group's state as they were.
        plans = [(g, self._plan(g, self.global_step)) for g in self.groups]
        for g, plan in plans:
            if plan is not None:
                self._apply_plan(g, *plan)
        self._begun = self.global_step

    def on_before_optimizer_step(self) -> None:
        """After backward, before ``optimizer.step()``: gradient criteria read the gradients."""
        self._check_open()
        if self._observed == self.global_step:
            return
        self._observed = self.global_step
        for g in self.groups:
            if g.criterion.needs_gradients and self.global_step <= g.schedule.end_step:
                with calling(g.criterion, "observe_gradients", f"at step {self.global_step}"):
                    g.criterion.observe_gradients(g.params)

    def on_after_optimizer_step(self) -> None:
        """After ``optimizer.step()``: re-apply the masks and advance the step counter."""
        self._check_open()
        self.apply_masks()
        if not self._advanced:
            self.global_step += 1
            self._advanced = True

    def step(self) -> None:
        """Once per training step, after ``optimizer.step()``: finish this step (masks re-applied,
        counter advanced, unless the optimizer hooks or the callbacks did it already) and begin
        the next one (prune when the schedule says so)."""
        self._check_open()
        if not self._advanced:
            scoring = [g for g in self.groups
                       if g.criterion.needs_gradients and self.global_step <= g.schedule.end_step]
            if scoring and self._observed != self.global_step:
                if any(p.grad is None for g in scoring for p in g.params.values()):
                    raise FxPruneError(
                        "gradient criteria need the gradients of each step: pass optimizer=... to "
                        "fxprune.Pruner, or call pruner.on_before_optimizer_step() before "
                        "optimizer.step() (or pruner.step() before optimizer.zero_grad())")
                self.on_before_optimizer_step()
            self.on_after_optimizer_step()
        self.on_step_begin()

    # ------------------------------------------------------------------ masks
    def apply_masks(self) -> None:
        """Zero the pruned weights (and, for output-channel patterns, their bias/BatchNorm entries)."""
        with torch.no_grad():
            for g in self.groups:
                for t in g.targets:
                    if t.param not in self._weight_masks:
                        continue
                    weight = g.params[t.param]
                    weight.mul_(self._weight_masks[t.param])
                    zero_pruned_channels(self.model, t, self.masks[t.param])
                if g.plan is not None:
                    zero_removed(self.model, g.plan)

    def sparsity(self) -> float:
        """Current fraction of pruned weights over the selected layers."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total if total else 0.0

    def _set_mask(self, t, keep: Tensor) -> None:
        self.masks[t.param] = keep
        if bool(keep.all()):
            self._weight_masks.pop(t.param, None)
            return
        weight = self.model.get_parameter(t.param)
        self._weight_masks[t.param] = (from_view_2d(keep, t.geometry)
                                       .to(device=weight.device, dtype=weight.dtype).contiguous())

    def _mask_grad(self, param: str, grad: Tensor) -> Tensor:
        mask = self._weight_masks.get(param)
        return grad if mask is None else grad * mask

    def _plan(self, g: _Group, step: int):
        """INC's ``update_masks`` without changing anything: None when ``step`` does not prune
        ``g``, else (its pruning count after the step, its keep-masks or None, its coupled
        channel plan or None)."""
        if g.locked or not g.schedule.is_pruning_step(step):
            return None
        if g.sparsity > g.schedule.target_sparsity:
            return None
        ratio = g.schedule.sparsity(g.completed)
        if g.criterion.needs_gradients and not g.criterion.has_scores():
            if ratio <= g.sparsity:
                return g.completed + 1, None, None
            raise FxPruneError(
                f"{g.config.where}: pruning step {step} needs gradient scores, but no gradients were "
                f"observed yet: pass optimizer=... to fxprune.Pruner or call "
                f"on_before_optimizer_step() after backward")
        scores = score_targets(self.model, g.targets, g.criterion, when=f" at step {self.global_step}",
                               fix="check the training (learning rate, loss)")
        scores = {t.param: self._floored(t, scores[t.param]) for t in g.targets}
        # The target-missed warning once, at the last pruning step: earlier steps of a schedule
        # legitimately round down to fewer whole blocks.
        last = step == g.schedule.pruning_steps()[-1]
        if self._analysis is not None and g.pattern.prunes_output_channels:
            plan = select_classes(self.ctx, self._analysis, [g.config], scores, target_sparsity=ratio,
                                  warn=last)
            kept = plan.kept_rows(g.targets)
            keep = {t.param: kept[t.param][:, None].expand(t.geometry.view_shape).clone() for t in g.targets}
            return g.completed + 1, keep, plan
        return g.completed + 1, mask_group(g.config, g.targets, scores, target_sparsity=ratio, warn=last), None

    def _apply_plan(self, g: _Group, completed: int, keep: dict | None, plan=None) -> None:
        g.completed = completed
        if keep is None:
            return
        if plan is not None:
            g.plan = plan
        for t in g.targets:
            self._set_mask(t, keep[t.param].to(self.masks[t.param].device))
        self.apply_masks()
        masks = [self.masks[t.param] for t in g.targets]
        g.sparsity = sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks)

    def _floored(self, t, s: Tensor) -> Tensor:
        """Masks only grow: pruned weights score 0, live ones at least ``LIVE_FLOOR``."""
        keep = self.masks[t.param].to(s.device)
        return torch.where(keep, s.clamp_min(LIVE_FLOOR), torch.zeros((), device=s.device)).contiguous()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The pruning state to save next to the model's and optimizer's: step counter, schedule
        progress, masks and gradient-criterion scores (``snip_momentum``'s momentum)."""
        return {"global_step": self.global_step,
                "groups": [{"completed": g.completed, "sparsity": g.sparsity,
                            "scores": g.criterion.state_dict()}
                           for g in self.groups],
                "masks": dict(self.masks)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (a Pruner built with the same model and config)."""
        self._check_open()
        if not (isinstance(state, dict) and {"global_step", "groups", "masks"} <= set(state)
                and isinstance(state["groups"], list) and isinstance(state["masks"], dict)):
            raise FxPruneError(f"load_state_dict takes the dict of Pruner.state_dict() (keys "
                               f"global_step, groups, masks), got "
                               f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        if len(state["groups"]) != len(self.groups) or set(state["masks"]) != set(self.masks):
            raise FxPruneError("this pruning state was saved for another model or config")
        for name, mask in state["masks"].items():
            if not (isinstance(mask, Tensor) and mask.dtype == torch.bool
                    and mask.shape == self.masks[name].shape):
                raise FxPruneError(f"the saved mask of {name} is not a bool tensor of shape "
                                   f"{tuple(self.masks[name].shape)}; the state was saved for "
                                   f"another model")
        for g, saved in zip(self.groups, state["groups"]):
            g.completed, g.sparsity = saved["completed"], saved["sparsity"]
            g.criterion.load_state_dict(saved["scores"])
            for t in g.targets:
                self._set_mask(t, state["masks"][t.param].to(self.masks[t.param].device))
            if self._analysis is not None and g.pattern.prunes_output_channels:
                g.plan = plan_from_masks(self.ctx, self._analysis, [g.config], self.masks)
        self.global_step = state["global_step"]
        self._begun = self.global_step      # the saved step had begun already
        self.apply_masks()

    # ------------------------------------------------------------------ end
    def finalize(self) -> nn.Module:
        """Bake the masks in, remove every hook, attach the report; return the (same) model."""
        self._check_open()
        self.apply_masks()
        self._remove_hooks()
        for g in self.groups:
            for t in g.targets:
                t.status = "pruned"
        RecordPass()(self.ctx)
        for layer in self.ctx.report.layers:
            if layer.criterion == "pattern_lock":
                layer.requested_sparsity = layer.achieved_sparsity
        self._closed = True
        self._weight_masks.clear()
        return self.model

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise FxPruneError("this Pruner was finalized; build a new one to prune again")

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.config.pruning_type}/{g.config.pattern}->{g.schedule.target_sparsity}"
                           for g in self.groups)
        return f"Pruner(step={self.global_step}, sparsity={self.sparsity():.4f}, groups=[{groups}])"


def _check_optimizer_holds(optimizer: torch.optim.Optimizer, groups: list[_Group]) -> None:
    """The optimizer must train the weights it is asked to keep pruned: one built over another
    model (or a copy of this one) would re-mask nothing and prune nothing useful."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = {name: p for g in groups for name, p in g.params.items()}
    if params and not any(id(p) in held for p in params.values()):
        first = next(iter(params))
        raise FxPruneError(f"the optimizer ({type(optimizer).__name__}) holds none of the weights "
                           f"to prune (e.g. {first}): build it over this model's parameters, "
                           f"e.g. torch.optim.SGD(model.parameters(), lr=...), after any copy of the model")
