"""Low-data pruning: score units from very few examples, prune, then (optionally) fine-tune briefly.

The Shapley-pruning paper's second study: when only a handful of labelled examples are available,
which criterion still ranks units well? A trained model is scored on ``--per-class`` examples of
each class (drawn from the training split), every coupled group is cut to each keep ratio with
those scores in one plan (``prune_groups``), and test accuracy is measured right after the prune
and after a short fine-tune on the same few examples. Seeded criteria (random, Shapley) are
repeated over ``--n-seeds`` seeds.

    python -m experiments.low_data                                  # digits, 10 per class, < 1 min
    python -m experiments.low_data --per-class 5 --keep 0.25,0.5 --criteria weight_norm,shapley
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python experiments/low_data.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from experiments.common import (CRITERIA, CRITERION_COLOURS, add_model_arguments, base_parser, criterion_is_seeded,
                                evaluate, format_table, make_metric, model_options_from, parse_criteria, mean_std, pyplot, resolve_device, results_folder, seed_everything, write_csv,
                                write_json, reproducible)
from experiments.data import few_per_class, load_dataset
from experiments.models import default_arch, load_or_train, train_one_epoch

DEFAULT_CRITERIA = ["random", "weight_norm", "apoz", "sensitivity", "taylor", "shapley", "shapley_2std"]
RUN_COLUMNS = ["criterion", "seed", "keep", "params", "accuracy", "accuracy_finetuned", "score_seconds"]
SUMMARY_COLUMNS = ["criterion", "keep", "accuracy", "accuracy_finetuned", "seeds"]


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0], epochs=30)
    parser.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA),
                        help=f"comma-separated criteria from {', '.join(CRITERIA)} or captum:<Method>")
    parser.add_argument("--per-class", type=int, default=10, help="examples per class used for scoring")
    parser.add_argument("--keep", default="0.25,0.5,0.75", help="comma-separated fractions of units kept")
    parser.add_argument("--finetune-epochs", type=int, default=10,
                        help="epochs of fine-tuning on the same few examples (0: none)")
    parser.add_argument("--n-seeds", type=int, default=3, help="seeds for the random criteria (random, shapley)")
    parser.add_argument("--sv-samples", type=int, default=5, help="permutations per Shapley estimate")
    return add_model_arguments(parser)


def group_scores(name: str, model: nn.Module, loader, device, seed: int, sv_samples: int, input_size) -> dict:
    """One score per unit of every coupled group of the trained model, keyed by group index."""
    from torchpruner import Pruner

    metric = make_metric(name, model, loader, device, seed=seed, sv_samples=sv_samples)
    return {group.index: np.asarray(metric.run(group), dtype=np.float64)
            for group in Pruner(model, input_size=input_size, device=device).groups()}


def prune_to(model: nn.Module, scores: dict, keep: float, input_size, device) -> nn.Module:
    """A copy of ``model`` with every group cut to ``keep`` of its units (lowest scores first)."""
    from torchpruner import Pruner, prune_groups

    pruned = copy.deepcopy(model)
    pruner = Pruner(pruned, input_size=input_size, device=device)

    def lookup(group):
        values = scores[group.index]
        if len(values) != group.num_units:
            raise RuntimeError(f"group {group.index} has {group.num_units} units, scored {len(values)}")
        return values

    prune_groups(pruner, fraction=1.0 - keep, scores=lookup)
    return pruned


def fine_tune(model: nn.Module, loader, epochs: int, lr: float, device) -> nn.Module:
    tuned = copy.deepcopy(model)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=lr)
    for _ in range(epochs):
        train_one_epoch(tuned, loader, optimizer, nn.CrossEntropyLoss(), device)
    return tuned


def plot(summary: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, column, label in ((axes[0], "accuracy", "right after pruning"),
                              (axes[1], "accuracy_finetuned", "after a short fine-tune")):
        for criterion in dict.fromkeys(row["criterion"] for row in summary):
            rows = [row for row in summary if row["criterion"] == criterion]
            keeps = [row["keep"] for row in rows]
            ax.errorbar(keeps, [row[column] for row in rows], yerr=[row[column + "_std"] for row in rows],
                        marker="o", capsize=3, label=criterion, color=CRITERION_COLOURS.get(criterion),
                        linestyle="--" if criterion == "random" else "-")
        ax.set_title(label)
        ax.set_xlabel("fraction of units kept")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(fontsize=8, loc="lower right")
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
    criteria = parse_criteria(args.criteria)
    keeps = [float(k) for k in args.keep.split(",")]
    if not all(0.0 < k <= 1.0 for k in keeps) or args.per_class < 1:
        raise SystemExit("--keep values must be in (0, 1] and --per-class >= 1")

    splits = load_dataset(args.dataset, args.data_root, split_seed=args.split_seed)
    arch = args.arch or default_arch(args.dataset)
    model, info = load_or_train(arch, splits, args.results, seed=args.seed, epochs=args.epochs, lr=args.lr,
                                batch_size=args.batch_size, device=device, model_options=model_options_from(args, arch),
                                progress=progress, retrain=args.retrain)
    _, _, test_loader = splits.loaders(batch_size=args.batch_size, seed=args.seed)
    few = few_per_class(splits.train, args.per_class, seed=args.seed)
    few_loader = DataLoader(few, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    score_loader = DataLoader(few, batch_size=256)
    print(f"{splits.describe()}; {arch}: test accuracy {info['test_accuracy']:.4f}; scoring and fine-tuning on "
          f"{len(few)} examples ({args.per_class} per class)")

    runs = []
    jobs = [(name, args.seed + offset) for name in criteria
            for offset in range(args.n_seeds if criterion_is_seeded(name) else 1)]
    for name, seed in tqdm(jobs, desc="criteria", disable=not progress):
        seed_everything(seed)
        tick = time.perf_counter()
        scores = group_scores(name, model, score_loader, device, seed, args.sv_samples, splits.input_size)
        score_seconds = time.perf_counter() - tick
        for keep in keeps:
            pruned = prune_to(model, scores, keep, splits.input_size, device)
            _, accuracy = evaluate(pruned, test_loader, device=device)
            accuracy_finetuned = float("nan")
            if args.finetune_epochs > 0:
                seed_everything(seed)
                tuned = fine_tune(pruned, few_loader, args.finetune_epochs, args.lr, device)
                _, accuracy_finetuned = evaluate(tuned, test_loader, device=device)
            runs.append({"criterion": name, "seed": seed, "keep": keep,
                         "params": sum(p.numel() for p in pruned.parameters()), "accuracy": accuracy,
                         "accuracy_finetuned": accuracy_finetuned, "score_seconds": score_seconds})

    summary = []
    for name in criteria:
        for keep in keeps:
            rows = [r for r in runs if r["criterion"] == name and r["keep"] == keep]
            accuracy, accuracy_std = mean_std([r["accuracy"] for r in rows])
            tuned, tuned_std = mean_std([r["accuracy_finetuned"] for r in rows])
            summary.append({"criterion": name, "keep": keep, "accuracy": accuracy, "accuracy_std": accuracy_std,
                            "accuracy_finetuned": tuned, "accuracy_finetuned_std": tuned_std,
                            "seeds": len(rows)})

    folder = results_folder(args.results, "low_data") / f"{splits.name}_{arch}_{args.per_class}pc_seed{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "runs.csv", runs, RUN_COLUMNS)
    write_csv(folder / "summary.csv", summary)
    figure = folder / "low_data.png"
    plot(summary, figure, f"{splits.name} / {arch}: pruning from {args.per_class} examples per class")
    payload = {"study": "low_data", "dataset": splits.name, "arch": arch, "per_class": args.per_class,
               "keep": keeps, "finetune_epochs": args.finetune_epochs, "base_test_accuracy": info["test_accuracy"],
               "summary": summary, "runs": runs, "seconds": time.perf_counter() - started}
    write_json(folder / "results.json", payload)

    table = []
    for row in summary:
        spread = lambda value, std: f"{value:.4f}" + (f" ± {std:.4f}" if row["seeds"] > 1 else "")  # noqa: E731
        table.append({"criterion": row["criterion"], "keep": row["keep"],
                      "accuracy": spread(row["accuracy"], row["accuracy_std"]),
                      "accuracy_finetuned": spread(row["accuracy_finetuned"], row["accuracy_finetuned_std"]),
                      "seeds": row["seeds"]})
    print()
    print(f"test accuracy after pruning every group to a keep ratio, scores from {len(few)} examples "
          f"(unpruned: {info['test_accuracy']:.4f}); fine-tune: {args.finetune_epochs} epochs on the same examples")
    print()
    print(format_table(table, SUMMARY_COLUMNS))
    print(f"\ntotal {payload['seconds']:.1f} s\nresults: {folder}\nfigure: {figure}")
    return payload


if __name__ == "__main__":
    main()
