"""``run_all`` Taylor on the digits CNN: every layer in one pass vs a training pass, ``run`` and captum.

Model and data as in ``attribution_speed.py``: conv 32 → ReLU → conv 64 → ReLU → max-pool →
linear 128 → ReLU → linear 10 on scikit-learn's 8×8 digits (trained for a few epochs first),
512 examples in batches of 128. Peers, in the same process, each the best of ``--repeats`` rounds (every round runs every peer once):

* ``forward+backward``: one forward and one backward (parameter gradients) per batch, the floor
  any gradient metric over the loader pays;
* ``run_all``: ``TaylorAttributionMetric.run_all(layers, find_best_evaluation_module=True)``,
  the four layers scored after their activation in one pass; ``run_all()`` (the default targets,
  every prunable group) too;
* ``run``: ``attr.run(layer, find_best_evaluation_module=True)`` layer by layer;
* ``captum``: captum's ``LayerGradientXActivation`` on the per-example loss, layer by layer
  (one forward and one backward per layer and batch), summed over positions like Taylor.

The scores of ``run_all``, ``run`` and captum are checked to agree before anything is printed.

    python benchmarks/run_all_speed.py              # 2 threads
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from attribution_speed import digits, digits_cnn, loader, train
from torch import nn

from torchpruner.attributions import TaylorAttributionMetric

#: name: (the layer, where it is scored: the ReLU after it, the output itself for the last)
LAYERS = {"conv 32": (0, 1), "conv 64": (2, 3), "linear 128": (6, 7), "linear 10": (8, 8)}


def interleaved(repeats: int, peers: dict[str, Callable[[], object]]) -> dict[str, tuple[float, object]]:
    """Best time and last result of each peer over ``repeats`` rounds, every round running every
    peer once, so that a change in the machine's load hits all peers alike."""
    best: dict[str, float] = {name: float("inf") for name in peers}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in peers.items():
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], results[name]) for name in peers}


def forward_backward(model: nn.Module, data) -> None:
    for xb, yb in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
    model.zero_grad(set_to_none=True)


def captum_taylor(model: nn.Module, layers: list[nn.Module], data) -> list[np.ndarray]:
    """Mean over examples of ``|Σ_s −g·z|`` per unit, layer by layer, with captum."""
    from captum.attr import LayerGradientXActivation

    scores = []
    for layer in layers:
        total, count = None, 0
        for xb, yb in data:

            def loss(inputs: torch.Tensor, target: torch.Tensor = yb) -> torch.Tensor:
                return F.cross_entropy(model(inputs), target, reduction="none")

            attribution = LayerGradientXActivation(loss, layer).attribute(xb)
            per_unit = (-attribution).reshape(len(xb), attribution.shape[1], -1).sum(2).abs().sum(0)
            total = per_unit if total is None else total + per_unit
            count += len(xb)
        scores.append((total / count).detach().numpy())
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_train, y_train, x, y = digits()
    model = digits_cnn()
    train(model, x_train, y_train)
    data = loader(x, y)
    layers = [model[layer] for layer, _ in LAYERS.values()]
    points = [model[point] for _, point in LAYERS.values()]  # where run_all scores them (find_best)
    attr = TaylorAttributionMetric(model, data, F.cross_entropy, "cpu", progress=False)

    timed = interleaved(
        args.repeats,
        {
            "base": lambda: forward_backward(model, data),
            "run_all": lambda: attr.run_all(layers, find_best_evaluation_module=True),
            "groups": lambda: attr.run_all(),
            "run": lambda: [attr.run(layer, find_best_evaluation_module=True) for layer in layers],
            "captum": lambda: captum_taylor(model, points, data),
        },
    )
    (base_s, _), (all_s, together), (groups_s, by_group), (run_s, alone), (captum_s, by_captum) = timed.values()
    for key, mine, theirs, outside in zip(together, together.values(), alone, by_captum):
        assert np.allclose(mine, theirs, rtol=1e-6, atol=1e-9), key
        assert np.allclose(mine, outside, rtol=1e-4, atol=1e-6 * np.abs(outside).max()), key

    print(
        f"digits CNN, {len(x)} examples in batches of 128, Taylor over {len(layers)} layers "
        f"({', '.join(LAYERS)}), CPU, {args.threads} threads, best of {args.repeats} interleaved rounds, torch {torch.__version__}; "
        "shared machine, timings are noisy, ratios are within this run"
    )
    print("| what | seconds | vs forward+backward |")
    print("|---|---|---|")
    rows = [
        ("one forward+backward pass over the loader", base_s),
        (f"run_all(layers): {len(layers)} layers, one pass", all_s),
        (f"run_all(): the {len(by_group)} prunable groups, one pass", groups_s),
        (f"run(layer), layer by layer ({len(layers)} runs)", run_s),
        (f"captum LayerGradientXActivation, layer by layer ({len(layers)} passes)", captum_s),
    ]
    for what, seconds in rows:
        print(f"| {what} | {seconds:.3f} | {seconds / base_s:.2f}× |")
    print(
        f"\nrun_all vs run layer by layer: {run_s / all_s:.2f}× faster; vs captum layer by layer: "
        f"{captum_s / all_s:.2f}× faster"
    )


if __name__ == "__main__":
    main()
