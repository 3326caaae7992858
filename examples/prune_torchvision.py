"""Prune a torchvision model by a global ratio and print the plan first (a dry run).

ResNet-18 (random weights: nothing is downloaded) loses 30% of its units ranked over all coupled
groups at once; a residual stream loses the same channels in the stem and in every block.

    python examples/prune_torchvision.py
"""

import torch
import torchvision

from torchpruner import Pruner, count_flops, count_parameters, prune_groups

torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10)
pruner = Pruner(model, input_size=(3, 64, 64))

groups = pruner.groups()
print(f"{len(groups)} coupled groups; the first: {groups[0]}")

plan = prune_groups(pruner, fraction=0.3, global_ranking=True, dry_run=True)  # changes nothing
lines = str(plan).splitlines()  # the first line describes every group; then one line per change
print("\n".join(lines[1:12] + [f"  ... {len(lines) - 13} more changes", lines[-1]]))

params, flops = count_parameters(model), count_flops(model, input_size=(3, 64, 64))
prune_groups(pruner, fraction=0.3, global_ranking=True)
print(
    f"parameters {params:,} -> {count_parameters(model):,}; "
    f"FLOPs {flops:,} -> {count_flops(model, input_size=(3, 64, 64)):,}"
)
print("output:", tuple(model(torch.randn(2, 3, 64, 64)).shape))
