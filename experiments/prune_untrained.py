"""Prune an untrained network: remove the units whose Shapley value is negative, no training at all.

The Shapley-pruning paper observed that in a randomly initialised fully connected net many units
*hurt* the loss, and removing those with a negative Shapley value alone raised MNIST accuracy from
7.2% to 50.9% while cutting the parameters from 5.7M to 2.42M. Here a fully connected net is
initialised (``--seed``), each hidden layer in turn is scored with Shapley values on training
examples (``find_best_evaluation_module=True``: after the ReLU) and its negative-valued units are
removed with the Pruner; scores of later layers are computed on the already-pruned model. Reports
parameters, test loss and accuracy before and after, per seed.

    python -m experiments.prune_untrained                              # digits, 3 seeds, < 1 min
    python -m experiments.prune_untrained --dataset mnist --data-root ~/data --hidden 2000,2000
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python experiments/prune_untrained.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from experiments.common import (base_parser, evaluate, format_table, mean_std, pyplot, resolve_device,
                                results_folder, seed_everything, write_csv, write_json, reproducible)
from experiments.data import load_dataset
from experiments.models import build_model

RUN_COLUMNS = ["seed", "params_before", "params_after", "loss_before", "loss_after", "accuracy_before",
               "accuracy_after", "widths_before", "widths_after", "seconds"]


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0], epochs=0)
    parser.add_argument("--hidden", default="512,512", help="hidden layer widths of the fully connected net")
    parser.add_argument("--n-seeds", type=int, default=3, help="random initialisations (seed, seed+1, ...)")
    parser.add_argument("--sv-samples", type=int, default=5, help="permutations per Shapley estimate")
    parser.add_argument("--score-examples", type=int, default=512, help="training examples used for scoring")
    return parser


def prune_negative_units(model, loader, input_size, device, seed: int, sv_samples: int, progress: bool):
    """Remove, layer by layer, the hidden units with a negative Shapley value; returns per-layer counts."""
    from torchpruner import Pruner, ShapleyAttributionMetric

    pruner = Pruner(model, input_size=input_size, device=device)
    removed = []
    for position in range(len(model.hidden)):
        layer = model.hidden[position]
        metric = ShapleyAttributionMetric(model, loader, F.cross_entropy, device, sv_samples=sv_samples,
                                          seed=seed + position, progress=progress)
        scores = metric.run(layer, find_best_evaluation_module=True)
        negative = np.flatnonzero(scores < 0)
        if len(negative) == len(scores):  # a layer cannot lose every unit: keep its best one
            negative = np.delete(negative, np.argmax(scores[negative]))
        pruner.prune_model(layer, negative.tolist())
        removed.append(int(len(negative)))
    return removed


def plot(runs: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    seeds = [str(run["seed"]) for run in runs]
    x = np.arange(len(runs))
    for ax, before, after, label in ((axes[0], "params_before", "params_after", "parameters"),
                                     (axes[1], "accuracy_before", "accuracy_after", "test accuracy")):
        ax.bar(x - 0.2, [run[before] for run in runs], width=0.4, label="random init", color="#7f7f7f")
        ax.bar(x + 0.2, [run[after] for run in runs], width=0.4, label="negative-Shapley units removed",
               color="#d62728")
        ax.set_xticks(x, [f"seed {s}" for s in seeds])
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    with reproducible(args.threads):
        return run(args)


def run(args) -> dict:
    started = time.perf_counter()
    device = resolve_device(args.device)
    progress = not args.no_progress
    hidden = tuple(int(w) for w in args.hidden.split(",") if w.strip())
    if not hidden or min(hidden) < 2 or args.n_seeds < 1:
        raise SystemExit("--hidden needs widths >= 2 and --n-seeds >= 1")
    splits = load_dataset(args.dataset, args.data_root, split_seed=args.split_seed)
    _, _, test_loader = splits.loaders(batch_size=args.batch_size, seed=args.seed)
    count = min(args.score_examples, len(splits.train))
    chosen = np.random.default_rng(args.seed).permutation(len(splits.train))[:count]
    score_loader = DataLoader(Subset(splits.train, sorted(chosen.tolist())), batch_size=256)
    print(f"{splits.describe()}; fully connected net {hidden}, untrained; Shapley on {count} training examples")

    runs = []
    for seed in tqdm(range(args.seed, args.seed + args.n_seeds), desc="seeds", disable=not progress):
        tick = time.perf_counter()
        seed_everything(seed)
        model = build_model("mlp", splits.input_size, splits.num_classes, hidden=hidden).to(device).eval()
        params_before = sum(p.numel() for p in model.parameters())
        loss_before, accuracy_before = evaluate(model, test_loader, device=device)
        prune_negative_units(model, score_loader, splits.input_size, device, seed, args.sv_samples, progress)
        loss_after, accuracy_after = evaluate(model, test_loader, device=device)
        runs.append({"seed": seed, "params_before": params_before,
                     "params_after": sum(p.numel() for p in model.parameters()),
                     "loss_before": loss_before, "loss_after": loss_after,
                     "accuracy_before": accuracy_before, "accuracy_after": accuracy_after,
                     "widths_before": "/".join(map(str, hidden)),
                     "widths_after": "/".join(str(layer.out_features) for layer in model.hidden),
                     "seconds": time.perf_counter() - tick})

    folder = results_folder(args.results, "prune_untrained") / f"{splits.name}_mlp_seed{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "runs.csv", runs, RUN_COLUMNS)
    figure = folder / "prune_untrained.png"
    plot(runs, figure, f"{splits.name}: untrained fully connected net, negative-Shapley units removed")
    summary = {key: mean_std([run[key] for run in runs]) for key in
               ("params_before", "params_after", "accuracy_before", "accuracy_after", "loss_before", "loss_after")}
    payload = {"study": "prune_untrained", "dataset": splits.name, "hidden": list(hidden), "runs": runs,
               "summary": {k: {"mean": m, "std": s} for k, (m, s) in summary.items()},
               "seconds": time.perf_counter() - started}
    write_json(folder / "results.json", payload)

    print()
    print(format_table(runs, RUN_COLUMNS[:-1]))
    (pb, _), (pa, _) = summary["params_before"], summary["params_after"]
    (ab, ab_s), (aa, aa_s) = summary["accuracy_before"], summary["accuracy_after"]
    print(f"\nmean over {len(runs)} seed(s): parameters {pb:,.0f} -> {pa:,.0f} ({pa / pb:.2f}x), "
          f"test accuracy {ab:.4f} ± {ab_s:.4f} -> {aa:.4f} ± {aa_s:.4f} (no training)")
    print(f"total {payload['seconds']:.1f} s\nresults: {folder}\nfigure: {figure}")
    return payload


if __name__ == "__main__":
    main()
