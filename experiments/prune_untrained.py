"""Prune an untrained network: remove the units whose Shapley value is negative, no training at all.

The Shapley-pruning paper observed that in a randomly initialised fully connected net many units
*hurt* the loss, and removing those with a negative Shapley value alone raised MNIST accuracy from
7.2% to 50.9% while cutting the parameters from 5.7M to 2.42M. Here a fully connected net is
initialised (``--seed``), each hidden layer in turn is scored with Shapley values on training
examples (``find_best_evaluation_module=True``: after the ReLU) and its negative-valued units are
removed with the Pruner; scores of later layers are computed on the already-pruned model. Reports
parameters, test loss and accuracy before and after, per initialisation (``--n-seeds``, default 5),
and their means over initialisations with a 95% t-interval, the change (after minus before, paired
by initialisation) included; the figure shows the means with those intervals and every seed's value.

    python -m experiments.prune_untrained                              # digits, 5 initialisations
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

from experiments.common import (
    base_parser,
    environment,
    evaluate,
    format_table,
    pyplot,
    run_reproducibly,
    resolve_device,
    results_folder,
    seed_everything,
    write_csv,
    write_json,
)
from experiments.data import load_dataset
from experiments.models import build_model
from experiments.stats import mean_ci

RUN_COLUMNS = [
    "seed",
    "params_before",
    "params_after",
    "loss_before",
    "loss_after",
    "accuracy_before",
    "accuracy_after",
    "widths_before",
    "widths_after",
    "seconds",
]
SUMMARY_COLUMNS = [
    "quantity",
    "before",
    "before_low",
    "before_high",
    "after",
    "after_low",
    "after_high",
    "change",
    "change_low",
    "change_high",
    "seeds",
]
QUANTITIES = ("params", "loss", "accuracy")
LEVEL = 0.95


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0], epochs=0)
    parser.add_argument("--hidden", default="512,512", help="hidden layer widths of the fully connected net")
    parser.add_argument("--n-seeds", type=int, default=5, help="random initialisations (seed, seed+1, ...)")
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
        metric = ShapleyAttributionMetric(
            model, loader, F.cross_entropy, device, sv_samples=sv_samples, seed=seed + position, progress=progress
        )
        scores = metric.run(layer, find_best_evaluation_module=True)
        negative = np.flatnonzero(scores < 0)
        if len(negative) == len(scores):  # a layer cannot lose every unit: keep its best one
            negative = np.delete(negative, np.argmax(scores[negative]))
        pruner.prune_model(layer, negative.tolist())
        removed.append(int(len(negative)))
    return removed


def summarise(runs: list[dict]) -> list[dict]:
    """Per quantity: the mean over initialisations before and after with 95% t-intervals, and the mean
    change (after minus before, paired by initialisation) with its t-interval."""
    summary = []
    for quantity in QUANTITIES:
        before = np.array([run[quantity + "_before"] for run in runs], dtype=np.float64)
        after = np.array([run[quantity + "_after"] for run in runs], dtype=np.float64)
        row = {"quantity": quantity, "seeds": len(runs)}
        for key, values in (("before", before), ("after", after), ("change", after - before)):
            row[key], row[key + "_low"], row[key + "_high"] = mean_ci(values, LEVEL)
        summary.append(row)
    return summary


def format_tables(runs: list[dict], summary: list[dict]) -> str:
    """The printed result: one row per initialisation, then the means with their intervals (no timings,
    so two runs with the same torch version and threads print the same text)."""
    interval = f"95% t-interval over {len(runs)} initialisations" if len(runs) > 1 else "one seed: no interval"
    formats = {"params": ".0f", "loss": ".4f", "accuracy": ".4f"}

    def cell(value, fmt, signed=False):
        return "" if np.isnan(value) else format(value, ("+" if signed else "") + fmt)

    table = []
    for row in summary:
        fmt = formats[row["quantity"]]
        cells = {"quantity": row["quantity"], "seeds": row["seeds"]}
        for key in ("before", "after", "change"):
            signed = key == "change"
            cells[key] = cell(row[key], fmt, signed)
            cells[key + ":ci"] = (
                ""
                if np.isnan(row[key + "_low"])
                else f"[{cell(row[key + '_low'], fmt, signed)}, {cell(row[key + '_high'], fmt, signed)}]"
            )
        table.append(cells)
    columns = ["quantity", "before", "before:ci", "after", "after:ci", "change", "change:ci", "seeds"]
    headers = ["quantity", "random init", "95% CI", "pruned", "95% CI", "change", "95% CI", "seeds"]
    return "\n".join(
        [
            format_table(runs, RUN_COLUMNS[:-1]),
            "",
            f"mean over initialisations ({interval}); change: pruned minus random init, paired by "
            "initialisation; no training at all",
            "",
            format_table(table, columns, headers=headers),
        ]
    )


def plot(runs: list[dict], summary: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    by_quantity = {row["quantity"]: row for row in summary}
    for ax, quantity, label in ((axes[0], "params", "parameters"), (axes[1], "accuracy", "test accuracy")):
        row = by_quantity[quantity]
        for position, key, name, colour in (
            (0, "before", "random init", "#7f7f7f"),
            (1, "after", "negative-Shapley units removed", "#d62728"),
        ):
            mean, low, high = row[key], row[key + "_low"], row[key + "_high"]
            error = None if np.isnan(low) else [[mean - low], [high - mean]]
            ax.bar(position, mean, width=0.6, yerr=error, capsize=6, color=colour, alpha=0.8, label=name)
            values = [run[f"{quantity}_{key}"] for run in runs]
            jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
            ax.scatter(
                position + jitter,
                values,
                s=14,
                color="black",
                zorder=3,
                label="one initialisation" if position == 1 else None,
            )
        ax.set_xticks([0, 1], ["random init", "pruned"])
        ax.set_title(f"{label} (mean, 95% CI, {len(runs)} seeds)" if len(runs) > 1 else label)
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    return run_reproducibly(run, args)


def run(args) -> dict:
    started, cpu_started = time.perf_counter(), time.process_time()
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
        runs.append(
            {
                "seed": seed,
                "params_before": params_before,
                "params_after": sum(p.numel() for p in model.parameters()),
                "loss_before": loss_before,
                "loss_after": loss_after,
                "accuracy_before": accuracy_before,
                "accuracy_after": accuracy_after,
                "widths_before": "/".join(map(str, hidden)),
                "widths_after": "/".join(str(layer.out_features) for layer in model.hidden),
                "seconds": time.perf_counter() - tick,
            }
        )

    folder = results_folder(args.results, "prune_untrained") / f"{splits.name}_mlp_seed{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "runs.csv", runs, RUN_COLUMNS)
    summary = summarise(runs)
    write_csv(folder / "summary.csv", summary, SUMMARY_COLUMNS)
    figure = folder / "prune_untrained.png"
    plot(
        runs, summary, figure, f"{splits.name}: untrained fully connected net {hidden}, negative-Shapley units removed"
    )
    text = format_tables(runs, summary)
    payload = {
        "study": "prune_untrained",
        "dataset": splits.name,
        "hidden": list(hidden),
        "level": LEVEL,
        "environment": environment(),
        "runs": runs,
        "summary": summary,
        "table": text,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }
    write_json(folder / "results.json", payload)

    print()
    print(text)
    print(
        f"\ntotal {payload['seconds']:.1f} s wall, {payload['cpu_seconds']:.1f} s CPU\nresults: {folder}\n"
        f"figure: {figure}"
    )
    return payload


if __name__ == "__main__":
    main()
