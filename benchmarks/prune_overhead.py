"""Cost of one ``prune_model`` call against one training step, on a VGG-style CNN (CPU).

``prune_model`` = plan (trace the model for shape probing + follow the data flow + validate) +
apply (slice parameters, gradients, BatchNorm statistics) + optimizer surgery (SGD momentum
buffers). Each measurement prunes 10% of one layer's units on a fresh copy of a model whose
optimizer already holds state; the training step is forward + backward + SGD step on a batch of 32
CIFAR-sized images.

    python benchmarks/prune_overhead.py            # 1 thread, 7 repeats
    python benchmarks/prune_overhead.py --threads 2 --repeats 11
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, List, Tuple

import torch
import torch.nn as nn

from torchpruner.graph import invalidate_graph
from torchpruner.pruner import Pruner

VGG_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"]


def vgg(num_classes: int = 10) -> nn.Sequential:
    layers: List[nn.Module] = []
    channels = 3
    for item in VGG_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            channels = item
    layers += [
        nn.Flatten(),
        nn.Linear(512 * 2 * 2, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    ]
    return nn.Sequential(*layers)


def cascade_of(model: nn.Sequential, index: int) -> List[nn.Module]:
    """BatchNorm/Dropout after layer ``index`` and the next Conv/Linear."""
    cascade = []
    for module in list(model)[index + 1 :]:
        if isinstance(module, (nn.BatchNorm2d, nn.Dropout)):
            cascade.append(module)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            cascade.append(module)
            break
    return cascade


def timed(fn: Callable[[], None], repeats: int, setup: Callable[[], None] = lambda: None) -> float:
    times = []
    for _ in range(repeats):
        setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = vgg()
    base_optimizer = torch.optim.SGD(base.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))

    def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    train_step(base, base_optimizer)  # optimizer state exists (momentum buffers)
    step_ms = timed(lambda: train_step(base, base_optimizer), args.repeats)

    prunable = [i for i, m in enumerate(base) if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    rows: List[Tuple[str, str, float, float, float]] = []
    for index in prunable:
        state = {}

        def setup() -> None:
            model = copy.deepcopy(base)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            optimizer.load_state_dict(base_optimizer.state_dict())
            invalidate_graph(model)
            state.update(
                model=model, optimizer=optimizer, pruner=Pruner(model, input_size=(3, 32, 32), optimizer=optimizer)
            )

        def units(model: nn.Module) -> int:
            layer = model[index]
            return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features

        def indices(model: nn.Module) -> List[int]:
            return list(range(0, units(model), 10))  # 10% of the units

        def prune() -> None:
            model = state["model"]
            state["pruner"].prune_model(model[index], indices(model), cascade_of(model, index))

        def plan_only() -> None:
            model = state["model"]
            state["plan"] = state["pruner"].plan(model[index], indices(model), cascade_of(model, index))

        def setup_with_plan() -> None:
            setup()
            plan_only()

        def apply_only() -> None:
            state["plan"].apply(state["model"], state["optimizer"])

        total_ms = timed(prune, args.repeats, setup)
        plan_ms = timed(plan_only, args.repeats, setup)
        apply_ms = timed(apply_only, args.repeats, setup_with_plan)
        layer = base[index]
        label = f"{index}: {type(layer).__name__}"
        rows.append((label, f"{len(indices(base))}/{units(base)}", plan_ms, apply_ms, total_ms))

    print(
        f"VGG-style CNN, CPU, {args.threads} thread(s), median of {args.repeats}; "
        f"training step (batch {args.batch_size}, fwd+bwd+SGD): {step_ms:.1f} ms"
    )
    print("plan = trace + data flow + validation; apply = slicing + optimizer surgery; prune = prune_model")
    print(f"{'layer':<14}{'pruned':>10}{'plan ms':>10}{'apply ms':>10}{'prune ms':>10}{'vs step':>9}")
    for label, pruned, plan_ms, apply_ms, total_ms in rows:
        print(f"{label:<14}{pruned:>10}{plan_ms:>10.1f}{apply_ms:>10.1f}{total_ms:>10.1f}{total_ms / step_ms:>8.2f}x")


if __name__ == "__main__":
    main()
