"""`make demo`: prune the built-in example models with default-style configs and print the reports."""
import torch

import fxprune
from fxprune.examples import EXAMPLES

torch.manual_seed(0)
RUNS = [
    ("resnet", {"target_sparsity": 0.8, "pattern": "4x1"}),
    ("bert-tiny", {"target_sparsity": 0.5, "pattern": "2:4"}),
    ("resnet", {"target_sparsity": 0.5, "pattern": "1xchannel", "pruning_scope": "local", "compact": True}),
]
first = lambda out: out if isinstance(out, torch.Tensor) else out[0]
for name, config in RUNS:
    model, inputs = EXAMPLES[name]()
    # torch.export capture for the HF model and for compaction; symbolic_trace for the plain CNN
    capture_inputs = inputs if name == "bert-tiny" or config.get("compact") else None
    pruned = fxprune.transform(model, config, example_inputs=capture_inputs)
    with torch.no_grad():
        drift = (first(model(*inputs)) - first(pruned(*inputs))).abs().max().item()
    print(f"\n== {name}: {config}")
    print(fxprune.sparsity_report(pruned))
    print(f"max |dense - pruned| output difference: {drift:.4f} (the pruned model still runs)")
