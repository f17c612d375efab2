"""`make demo`: prune the built-in example models with a default config and print the reports."""
import torch

import fxprune
from fxprune.examples import EXAMPLES

torch.manual_seed(0)
for name, config in [("resnet", {"target_sparsity": 0.8, "pattern": "4x1"}),
                     ("bert-tiny", {"target_sparsity": 0.5, "pattern": "2:4"})]:
    model, inputs = EXAMPLES[name]()
    pruned = fxprune.transform(model, config, example_inputs=inputs if name == "bert-tiny" else None)
    with torch.no_grad():
        dense_out, pruned_out = model(*inputs), pruned(*inputs)
    first = lambda out: out if isinstance(out, torch.Tensor) else out[0]
    print(f"\n== {name}: {config}")
    print(fxprune.sparsity_report(pruned))
    drift = (first(dense_out) - first(pruned_out)).abs().max().item()
    print(f"max |dense - pruned| output difference: {drift:.4f} (the pruned model still runs)")
