"""Network slimming (Liu et al., ICCV 2017): sparsity training on BatchNorm scales, a global prune by
|γ|, fine-tuning.

Three steps, each one call of torchpruner:

1. ``update_bn(model, s)`` between ``backward()`` and ``step()`` adds the L1 subgradient
   ``s·sign(γ)`` to every BatchNorm scale (``torchpruner.regularize``), pushing the scales of
   unimportant channels towards zero. A baseline is trained the same way with ``s = 0``.
2. ``prune_groups(pruner, fraction=r, scores=BNScaleAttributionMetric(model, None, None).run,
   global_ranking=True)`` removes the fraction ``r`` of all channels with the smallest |γ| over the
   whole model (each group's scores over their mean, as ``select_units`` ranks globally), with
   the live SGD optimizer (its momentum is sliced with the weights).
3. Fine-tuning with that same optimizer.

Prints the three tables of the network-slimming code (test accuracy, parameters, FLOPs of one
example) for the ratios ``--ratios``, the fraction of |γ| below ``--small`` before and after
sparsity training, and saves a plot of the sorted |γ| of both models.

    python -m experiments.slimming                          # digits, < 1 min on 2 cores
    python -m experiments.slimming --quick                  # a few seconds (the smoke test)
    python -m experiments.slimming --dataset cifar10 --data-root ~/data --widths 32,64,128 --epochs 40
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python experiments/slimming.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from experiments.common import (
    base_parser,
    evaluate,
    format_table,
    pyplot,
    resolve_device,
    results_folder,
    seed_everything,
    write_csv,
    write_json,
    run_reproducibly,
)
from experiments.data import load_dataset
from torchpruner import BNScaleAttributionMetric, Pruner, prune_groups
from torchpruner.regularize import update_bn
from torchpruner.utils import count_flops, count_parameters

DEFAULT_WIDTHS = (32, 64, 64)
ACCURACY_COLUMNS = ["model", "test_accuracy", "test_loss", "channels"]
SIZE_COLUMNS = ["model", "params", "params_ratio"]
FLOP_COLUMNS = ["model", "flops", "flops_ratio"]


class SlimNet(nn.Module):
    """(conv, BatchNorm, ReLU) blocks with a 2x2 max pool after every second block, global average
    pooling and one Linear classifier: every prunable channel has a BatchNorm."""

    def __init__(self, input_size=(1, 8, 8), num_classes=10, widths=DEFAULT_WIDTHS):
        super().__init__()
        channels = input_size[0]
        layers: list[nn.Module] = []
        for position, width in enumerate(widths):
            layers += [nn.Conv2d(channels, int(width), 3, padding=1, bias=False), nn.BatchNorm2d(int(width)), nn.ReLU()]
            if position % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            channels = int(width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def all_gammas(model: nn.Module) -> np.ndarray:
    return np.concatenate([bn.weight.detach().abs().cpu().double().numpy() for bn in batchnorms(model)])


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0], epochs=30)
    parser.set_defaults(lr=0.05, batch_size=32)
    parser.add_argument(
        "--widths", default=",".join(map(str, DEFAULT_WIDTHS)), help="conv widths, one (conv, BN, ReLU) block each"
    )
    parser.add_argument("--s", type=float, default=2e-2, help="L1 strength on the BatchNorm scales (update_bn)")
    parser.add_argument("--ratios", default="0.3,0.5,0.7", help="fractions of all channels pruned globally")
    parser.add_argument("--finetune-epochs", type=int, default=8, help="epochs of fine-tuning after each prune")
    parser.add_argument("--min-units", type=int, default=2, help="never leave a layer with fewer channels")
    parser.add_argument("--small", type=float, default=1e-2, help="|γ| below this counts as (nearly) zero")
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test (a few epochs)")
    parser.add_argument("--no-figure", action="store_true", help="skip the plot of the sorted |γ|")
    return parser


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    epochs: int,
    lr: float,
    s: float,
    device,
    progress: bool,
    desc: str,
) -> None:
    """SGD epochs (learning rate ``lr`` on a cosine schedule) with ``update_bn(model, s)`` between
    ``backward()`` and ``step()``."""
    for epoch in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * epoch / epochs))
        model.train()
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), targets).backward()
            if s:
                update_bn(model, s)
            optimizer.step()
    model.eval()


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def costs(model: nn.Module, input_size) -> tuple[int, int]:
    return count_parameters(model), count_flops(model, input_size=tuple(input_size))


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    return run_reproducibly(run, args)


def run(args) -> dict:
    if args.quick:  # a smaller net for fewer epochs, with a stronger penalty so that γ still moves
        args.epochs, args.finetune_epochs = min(args.epochs, 5), min(args.finetune_epochs, 1)
        args.widths = "8,16" if args.widths == ",".join(map(str, DEFAULT_WIDTHS)) else args.widths
        args.s = max(args.s, 5e-2)
    started = time.perf_counter()
    device = resolve_device(args.device)
    progress = not args.no_progress
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    widths = tuple(int(w) for w in args.widths.split(","))
    splits = load_dataset(args.dataset, args.data_root, split_seed=args.split_seed)
    train_loader, _, test_loader = splits.loaders(batch_size=args.batch_size, seed=args.seed)

    def fresh_model() -> nn.Module:
        seed_everything(args.seed)
        return SlimNet(splits.input_size, splits.num_classes, widths).to(device)

    # 1. the baseline and the sparsity-trained model, from the same initialisation
    models, optimizers = {}, {}
    for name, s in (("original", 0.0), ("sparse", args.s)):
        model = fresh_model()
        optimizer = make_optimizer(model, args.lr)
        train(model, optimizer, train_loader, args.epochs, args.lr, s, device, progress, f"train {name} (s={s:g})")
        models[name], optimizers[name] = model, optimizer

    gammas = {name: all_gammas(model) for name, model in models.items()}
    small = {name: float((values < args.small).mean()) for name, values in gammas.items()}
    base_params, base_flops = costs(models["original"], splits.input_size)
    rows = []

    def record(name: str, model: nn.Module, **extra) -> None:
        loss, accuracy = evaluate(model, test_loader, device=device)
        params, flops = costs(model, splits.input_size)
        channels = "/".join(str(bn.num_features) for bn in batchnorms(model))
        rows.append(
            {
                "model": name,
                "test_accuracy": accuracy,
                "test_loss": loss,
                "channels": channels,
                "params": params,
                "params_ratio": params / base_params,
                "flops": flops,
                "flops_ratio": flops / base_flops,
                **extra,
            }
        )

    record("original", models["original"])
    record(f"sparse (s={args.s:g})", models["sparse"])

    # 2. + 3. prune globally by |γ| with the live optimizer, then fine-tune with it
    for ratio in ratios:
        model, optimizer = copy.deepcopy((models["sparse"], optimizers["sparse"]))
        pruner = Pruner(model, input_size=splits.input_size, device=device, optimizer=optimizer)
        prune_groups(
            pruner,
            fraction=ratio,
            scores=BNScaleAttributionMetric(model, None, None).run,
            global_ranking=True,
            min_units=args.min_units,
        )
        record(f"pruned {ratio:.0%}", model)
        train(
            model,
            optimizer,
            train_loader,
            args.finetune_epochs,
            args.lr * 0.2,
            0.0,
            device,
            progress,
            f"fine-tune {ratio:.0%}",
        )
        record(f"pruned {ratio:.0%} + fine-tune", model)

    out = results_folder(args.results, "slimming")
    stem = f"{splits.name}_seed{args.seed}"
    write_csv(
        out / f"{stem}.csv",
        rows,
        ["model", "test_accuracy", "test_loss", "channels", "params", "params_ratio", "flops", "flops_ratio"],
    )
    figure = None if args.no_figure else plot_gammas(gammas, out / f"{stem}_gammas.png", args.small, splits.name)
    elapsed = time.perf_counter() - started
    gamma_rows = [
        {
            "model": name,
            f"|γ| < {args.small:g}": small[name],
            "median |γ|": float(np.median(gammas[name])),
            "channels": len(gammas[name]),
        }
        for name in ("original", "sparse")
    ]
    payload = {
        "study": "slimming",
        "args": vars(args),
        "dataset": splits.describe(),
        "device": str(device),
        "rows": rows,
        "small_gamma_fraction": small,
        "median_gamma": {name: float(np.median(v)) for name, v in gammas.items()},
        "timing": {"total_seconds": elapsed},
        "files": {"table": str(out / f"{stem}.csv"), "figure": str(figure) if figure else None},
    }
    write_json(out / f"{stem}.json", payload)

    print(
        f"\n{splits.describe()}; SlimNet widths {args.widths}; {args.epochs} epochs SGD (s = {args.s:g} on |γ| for "
        f"the sparse model), prune globally by BN scale, {args.finetune_epochs} epochs fine-tune\n"
    )
    print("accuracy")
    print(format_table(rows, ACCURACY_COLUMNS))
    print("\nparameters")
    sizes = [r for r in rows if not r["model"].endswith("fine-tune")]  # fine-tuning keeps the size
    print(format_table([{**r, "params": f"{r['params']:,}"} for r in sizes], SIZE_COLUMNS))
    print("\nFLOPs (one example)")
    print(format_table([{**r, "flops": f"{r['flops']:,}"} for r in sizes], FLOP_COLUMNS))
    print(f"\nBatchNorm scales: fraction with |γ| < {args.small:g}")
    print(format_table(gamma_rows))
    print(f"\ntotal {elapsed:.1f} s\nresults: {out}" + (f"\nfigure: {figure}" if figure else ""))
    return payload


def plot_gammas(gammas: dict[str, np.ndarray], path: Path, small: float, dataset: str) -> Path:
    """Sorted |γ| of every BatchNorm channel, before and after sparsity training (log scale)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, colour in (("original", "#1f77b4"), ("sparse", "#d62728")):
        values = np.sort(gammas[name])
        ax.plot(
            np.arange(len(values)),
            np.maximum(values, 1e-6),
            color=colour,
            lw=1.6,
            label=f"{name} ({(values < small).mean():.0%} below {small:g})",
        )
    ax.axhline(small, color="#7f7f7f", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("channel (sorted by |γ|)")
    ax.set_ylabel("|γ| of its BatchNorm (clipped at 1e-6)")
    ax.set_title(f"{dataset}: BatchNorm scales before and after sparsity training")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
