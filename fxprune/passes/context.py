"""The one object the passes share: the model, the config, the graph and what each pass adds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, fx, nn

from ..config import GroupConfig, PruningConfig
from ..geometry import WeightGeometry


@dataclass
class Target:
    """One prunable weight (a parameter used as the weight of a linear or convolution)."""

    param: str                        # canonical parameter FQN: "layer1.0.conv1.weight"
    name: str                         # what op_names match: the module FQN ("layer1.0.conv1")
    module_type: str                  # owner class name ("Conv2d", "Conv1D") or op kind if functional
    op: str                           # "linear" or "conv1d" / "conv2d" / "conv3d"
    geometry: WeightGeometry
    nodes: list[str] = field(default_factory=list)   # graph nodes that use it as a weight
    position: int = 0                 # graph position of the last use
    bias: str | None = None           # bias parameter FQN
    channel_followers: list[str] = field(default_factory=list)  # BN weight/bias/mean after it
    aliases: list[str] = field(default_factory=list)  # other module names of a tied weight
    status: str = "candidate"         # -> "selected", "pruned", "skipped: ...", "excluded: ..."
    group: GroupConfig | None = None
    pattern: Any = None               # the group's BasePattern object
    layout: Any = None                # the pattern's BlockLayout for this weight

    @property
    def selected(self) -> bool:
        return self.status == "selected"

    @property
    def uses_per_forward(self) -> int:
        """Calls of the weight in one forward (its graph uses; one when found without a graph)."""
        return max(1, len(self.nodes))


# How the graph was captured (``PruneContext.capture_method``, the report's ``capture``). The two
# captures with example inputs record every value's shape (``node.meta["val"]``).
EXPORT_CAPTURE = "torch.export"
ATEN_TRACE_CAPTURE = "aten_trace"
SYMBOLIC_CAPTURE = "symbolic_trace"
# no graph: the layers found from one eager run of the blocks (passes/eager.py)
EAGER_CAPTURE = "eager (blocks from the first block)"


@dataclass
class PruneContext:
    model: nn.Module                  # the model being rewritten (a copy unless inplace=True)
    config: PruningConfig
    example_inputs: tuple | None = None
    calibration: Any = None           # iterable of batches, for data-aware criteria
    loss_fn: Any = None               # loss_fn(model, batch) -> loss, for gradient criteria
    compact: bool = False             # run the compact pass after rewrite
    # capture
    graph_module: fx.GraphModule | None = None
    capture_method: str = ""          # one of the *_CAPTURE names above (or the eager discovery's)
    param_of_node: dict[str, str] = field(default_factory=dict)   # node name -> param/buffer FQN
    # discover / attach
    targets: dict[str, Target] = field(default_factory=dict)      # by param FQN, graph order
    groups: list[GroupConfig] = field(default_factory=list)
    # score / mask
    scores: dict[str, Any] = field(default_factory=dict)          # param -> float32 view scores
                                                                  # (a Tensor or a LazyScores)
    masks: dict[str, Tensor] = field(default_factory=dict)        # param -> keep mask (view, bool)
    criteria: dict[int, Any] = field(default_factory=dict)        # group index -> its Criterion
    # the mask pass's CompactionPlan (with example inputs), sliced by the compact pass
    compaction: Any = None
    # record
    report: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    # progress(stage, done, total): called per layer by the long passes; None for silence
    progress: Any = None
    # block-sequential calibration: hook(index, name, block) around each repeated block, the
    # plan it followed, and zero counts of the weights it pruned (for the record pass, since a
    # streaming caller may have released them by then)
    on_block_start: Any = None
    on_block_end: Any = None
    block_plan: Any = None
    zero_counts: dict[str, int] = field(default_factory=dict)
    # several processes (torch.distributed): fxprune.distributed.Distributed, else None
    distributed: Any = None
    # the module table (fxprune.aten.ModuleLookup) the passes of one PassManager run share
    lookup: Any = None

    @property
    def shapes_known(self) -> bool:
        """Whether the graph is held and records every value's shape (captured with example
        inputs), which the channel analysis follows."""
        return self.graph_module is not None and self.capture_method in (EXPORT_CAPTURE, ATEN_TRACE_CAPTURE)

    def tick(self, stage: str, done: int, total: int) -> None:
        if self.progress is None:
            return
        try:
            self.progress(stage, done, total)
        except Exception as e:  # the caller's callback: say so, not a raw error from a pass
            from ..errors import ExtensionError, describe
            name = getattr(self.progress, "__qualname__", type(self.progress).__name__)
            raise ExtensionError(f"the progress callback {name} raised {describe(e)} at "
                                 f"{stage} {done}/{total}; it is called as progress(stage, done, "
                                 f"total)") from e

    def module_lookup(self):
        """The model's :class:`~fxprune.aten.ModuleLookup`: the one the passes of the current
        ``PassManager`` run share (walked again after a pass that may replace modules: see
        ``Pass.keeps_module_tree``), else a fresh one."""
        if self.lookup is not None and self.lookup.model is self.model:
            return self.lookup
        from ..aten import ModuleLookup
        return ModuleLookup(self.model)

    def selected(self, group: GroupConfig | None = None) -> list[Target]:
        return [t for t in self.targets.values()
                if t.selected and (group is None or t.group is group)]
