"""Prune 50% of every coupled group of torchvision resnet50: torchpruner vs Torch-Pruning.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/prune_resnet50.py [--runs 5]

torchpruner: ``prune_groups(Pruner(model, input_size, optimizer=SGD with momentum), fraction=0.5)``
(trace + dependency analysis + plan + apply + optimizer surgery; per-layer normalised L1 scores).
Torch-Pruning (``pip install torch-pruning``, benchmark only, never a dependency):
``MagnitudePruner(model, example_inputs, MagnitudeImportance(p=1), pruning_ratio=0.5,
ignored_layers=[fc]).step()`` (graph + pruning; it leaves the optimizer alone, so its time does not
include optimizer surgery). Both keep the classifier's 1000 outputs.

Reports wall time of each prune, parameters and FLOPs (``torch.utils.flop_counter.FlopCounterMode``,
one 224x224 image) before/after, and CPU latency (batch 8, 224x224, 2 threads, eval, median).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchpruner.schedule import prune_groups  # noqa: E402
from torchpruner.pruner import Pruner  # noqa: E402


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: torch.nn.Module) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    return counter.get_total_flops()


def latency(model: torch.nn.Module, runs: int) -> float:
    model.eval()
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def trained_resnet50(seed: int = 0):
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, _ = trained_resnet50()
    rows = [("unpruned", None, params(base), flops(base), latency(base, args.runs))]

    model, optimizer = trained_resnet50()
    start = time.perf_counter()
    pruner = Pruner(model, input_size=(3, 224, 224), optimizer=optimizer)
    plan = prune_groups(pruner, fraction=0.5)
    ours_time = time.perf_counter() - start
    # the optimizer keeps training the pruned model
    F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2])).backward()
    optimizer.step()
    rows.append(
        ("torchpruner (+ optimizer surgery)", ours_time, params(model), flops(model), latency(model, args.runs))
    )

    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
        print("torch-pruning is not installed: `pip install torch-pruning` (benchmark only)")
    if tp is not None:
        tp_model, _ = trained_resnet50()
        start = time.perf_counter()
        tp_pruner = tp.pruner.MagnitudePruner(
            tp_model,
            torch.randn(1, 3, 224, 224),
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=[tp_model.fc],
        )
        tp_pruner.step()
        tp_time = time.perf_counter() - start
        rows.append(
            (
                f"Torch-Pruning {getattr(tp, '__version__', '')} MagnitudePruner",
                tp_time,
                params(tp_model),
                flops(tp_model),
                latency(tp_model, args.runs),
            )
        )

    base_params, base_flops, base_latency = rows[0][2], rows[0][3], rows[0][4]
    print(
        f"resnet50, 50% of every group, torch {torch.__version__}, {args.threads} threads, "
        f"latency = median of {args.runs} runs, batch 8, 224x224"
    )
    print(
        "| method | prune time (s) | params | FLOPs (G, 1 image) | latency (ms) | params ratio | FLOP ratio | "
        "latency ratio | latency / FLOP ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, seconds, n, f, lat in rows:
        fr, lr = f / base_flops, lat / base_latency
        print(
            f"| {name} | {'' if seconds is None else f'{seconds:.2f}'} | {n / 1e6:.2f} M | {f / 1e9:.2f} | "
            f"{lat * 1e3:.0f} | {n / base_params:.3f} | {fr:.3f} | {lr:.3f} | {lr / fr:.2f} |"
        )
    print(f"\n{len(plan.edits)} edits, {len(plan.optimizer_slices)} optimizer state slices in our plan")


if __name__ == "__main__":
    main()
