"""BN scale and FPGM scores side by side with Torch-Pruning's, and ThiNet's cost per layer.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/criteria_vs_torch_pruning.py

On torchvision resnet18 (random init, BatchNorm scales drawn from U(0, 1) so they differ), for
every coupled group whose first source is a convolution:

* BN scale: torchpruner's ``BNScaleAttributionMetric.run(group)`` (Σ|γ_c| over the group's
  BatchNorms) and Torch-Pruning's ``BNScaleImportance()`` on the group of that convolution (the
  mean over the group's BatchNorms, divided by its mean). The definitions agree up to
  normalisation, so after dividing ours by its mean the two must be equal: the table prints the
  largest difference.
* FPGM: torchpruner's ``FPGMAttributionMetric.run(conv)`` (Σ_j ‖W_c − W_j‖₂ over the layer's
  filters, He et al. 2019) and Torch-Pruning's ``FPGMImportance()``. The definitions differ —
  Torch-Pruning takes distances between the element-wise squares |W|², and averages over the
  consumers' input slices too — so the table prints the Spearman rank correlation, not equality.

ThiNet: the time to score each layer of a small digits CNN against the time of one forward pass
over the same data (ThiNet's greedy selection runs on sampled consumer outputs).
Torch-Pruning (``pip install torch-pruning``) is a benchmark dependency only.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchpruner import (
    BNScaleAttributionMetric,
    FPGMAttributionMetric,
    Pruner,  # noqa: E402
    ThiNetAttributionMetric,
)
from torchpruner.attributions.groups import member_slices  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def first_source_conv(group, modules):
    for member in member_slices(group):
        if member.direction == "out" and isinstance(modules[member.module_name], nn.Conv2d):
            return member.module_name
    return None


def compare_with_torch_pruning() -> None:
    import torch_pruning as tp
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0, 1)
    example = torch.randn(1, 3, 64, 64)
    modules = dict(model.named_modules())
    groups = Pruner(model, input_size=(3, 64, 64)).groups()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    bn_ours, fpgm_ours = BNScaleAttributionMetric(model, None, None), FPGMAttributionMetric(model, None, None)
    bn_tp, fpgm_tp = tp.importance.BNScaleImportance(), tp.importance.FPGMImportance()
    print("resnet18: torchpruner vs Torch-Pruning", tp.__version__, "per coupled group")
    print(
        f"{'group source':<22}{'units':>6}{'BN scale max |diff|':>22}{'FPGM rho (layer)':>18}{'FPGM rho (group)':>18}"
    )
    for group in groups:
        name = first_source_conv(group, modules)
        if name is None:
            continue
        conv = modules[name]
        tp_group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        ours = np.asarray(bn_ours.run(group), dtype=np.float64)
        theirs = bn_tp(tp_group).double().numpy()
        difference = np.abs(ours / ours.mean() - theirs).max()
        fpgm_theirs = fpgm_tp(tp_group).double().numpy()
        rho_layer = spearman(np.asarray(fpgm_ours.run(conv)), fpgm_theirs)
        rho_group = spearman(np.asarray(fpgm_ours.run(group)), fpgm_theirs)
        print(f"{name:<22}{len(ours):>6}{difference:>22.2e}{rho_layer:>18.3f}{rho_group:>18.3f}")


def thinet_cost() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    data = DataLoader(TensorDataset(torch.randn(512, 1, 8, 8), torch.randint(0, 10, (512,))), batch_size=128)
    with torch.no_grad():
        times = []
        for _ in range(5):  # the fastest of 5 passes (the first one warms up)
            start = time.perf_counter()
            for images, _ in data:
                model(images)
            times.append(time.perf_counter() - start)
        forward = min(times)
    print(
        f"\nThiNet on the digits CNN (512 examples, batch 128); one forward pass over the data: {forward * 1e3:.1f} ms"
    )
    print(f"{'layer':<10}{'units':>6}{'samples/batch':>15}{'seconds':>10}{'x forward':>11}")
    for index in (0, 2, 6):
        for samples in (64, 256):
            metric = ThiNetAttributionMetric(model, data, None, samples_per_batch=samples, seed=0)
            metric.run(model[index])  # warm-up: the trace is cached after the first run
            start = time.perf_counter()
            scores = metric.run(model[index])
            seconds = time.perf_counter() - start
            print(
                f"{type(model[index]).__name__ + str(index):<10}{len(scores):>6}{samples:>15}{seconds:>10.3f}"
                f"{seconds / forward:>11.1f}"
            )


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (a shared, noisy machine)\n")
    compare_with_torch_pruning()
    thinet_cost()
