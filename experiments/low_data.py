"""Low-data pruning: score units from very few examples, prune, then (optionally) fine-tune briefly.

The Shapley-pruning paper's second study: when only a handful of labelled examples are available,
which criterion still ranks units well? A trained model is scored on ``--per-class`` examples of
each class (drawn from the training split), every coupled group is cut to each keep ratio with
those scores in one plan (``prune_groups``), and test accuracy is measured right after the prune
and after a short fine-tune on the same few examples. The study is repeated over ``--n-seeds``
seeds (default 5): seed ``s`` draws its own few-per-class subset, seeds the random criteria
(random, Shapley) and the fine-tune, so every criterion gets one run per seed. The table gives the
mean over seeds with a 95% t-interval, and each criterion minus random paired by seed (same subset)
with the t-interval of the paired differences; the figure shades the intervals.

    python -m experiments.low_data                                  # digits, 10 per class, 5 seeds
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

from experiments.common import (
    CRITERIA,
    CRITERION_COLOURS,
    add_model_arguments,
    base_parser,
    environment,
    evaluate,
    format_table,
    make_metric,
    model_options_from,
    parse_criteria,
    pyplot,
    run_reproducibly,
    resolve_device,
    results_folder,
    seed_everything,
    write_csv,
    write_json,
)
from experiments.data import few_per_class, load_dataset
from experiments.models import default_arch, load_or_train, train_one_epoch
from experiments.stats import mean_ci

DEFAULT_CRITERIA = ["random", "weight_norm", "apoz", "sensitivity", "taylor", "shapley", "shapley_2std"]
RUN_COLUMNS = ["criterion", "seed", "keep", "params", "accuracy", "accuracy_finetuned", "score_seconds"]
SUMMARY_COLUMNS = [
    "criterion",
    "keep",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "accuracy_minus_random",
    "accuracy_minus_random_low",
    "accuracy_minus_random_high",
    "accuracy_finetuned",
    "accuracy_finetuned_low",
    "accuracy_finetuned_high",
    "accuracy_finetuned_minus_random",
    "accuracy_finetuned_minus_random_low",
    "accuracy_finetuned_minus_random_high",
    "seeds",
]
LEVEL = 0.95
REFERENCE = "random"


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0], epochs=30)
    parser.add_argument(
        "--criteria",
        default=",".join(DEFAULT_CRITERIA),
        help=f"comma-separated criteria from {', '.join(CRITERIA)} or captum:<Method>",
    )
    parser.add_argument("--per-class", type=int, default=10, help="examples per class used for scoring")
    parser.add_argument("--keep", default="0.25,0.5,0.75", help="comma-separated fractions of units kept")
    parser.add_argument(
        "--finetune-epochs", type=int, default=10, help="epochs of fine-tuning on the same few examples (0: none)"
    )
    parser.add_argument(
        "--n-seeds",
        type=int,
        default=5,
        help="seeds seed, seed+1, ...: each draws its own few-per-class subset and seeds the random "
        "criteria (random, shapley) and the fine-tune",
    )
    parser.add_argument("--sv-samples", type=int, default=5, help="permutations per Shapley estimate")
    return add_model_arguments(parser)


def group_scores(name: str, model: nn.Module, loader, device, seed: int, sv_samples: int, input_size) -> dict:
    """One score per unit of every coupled group of the trained model, keyed by group index."""
    from torchpruner import Pruner

    metric = make_metric(name, model, loader, device, seed=seed, sv_samples=sv_samples)
    groups = Pruner(model, input_size=input_size, device=device).groups()
    scored = metric.run_all(groups)  # one pass over the data for every group (Taylor, APoZ, ...)
    return {group.index: np.asarray(values, dtype=np.float64) for group, values in zip(groups, scored.values())}


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


def interval_text(low: float, high: float, signed: bool = False) -> str:
    """``[low, high]`` for a table cell; empty when there is no interval (one seed)."""
    if np.isnan(low):
        return ""
    return f"[{signed_text(low)}, {signed_text(high)}]" if signed else f"[{low:.4f}, {high:.4f}]"


def signed_text(value: float) -> str:
    """``+0.0123``; a value that rounds to zero prints as ``+0.0000`` whatever its sign."""
    return f"{round(value, 4) + 0.0:+.4f}"


def summarise(runs: list[dict], criteria: list[str], keeps: list[float]) -> list[dict]:
    """Per criterion and keep ratio: the mean over seeds with its t-interval, and (when random ran) the
    mean of the criterion-minus-random differences paired by seed, with their t-interval."""
    by_key = {(r["criterion"], r["keep"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    summary = []
    for name in criteria:
        for keep in keeps:
            row = {"criterion": name, "keep": keep, "seeds": len(seeds)}
            for column in ("accuracy", "accuracy_finetuned"):
                values = [by_key[(name, keep, seed)][column] for seed in seeds]
                row[column], row[column + "_low"], row[column + "_high"] = _ci(values)
                difference = (float("nan"),) * 3
                if REFERENCE in criteria and name != REFERENCE:
                    difference = _ci(
                        [by_key[(name, keep, seed)][column] - by_key[(REFERENCE, keep, seed)][column] for seed in seeds]
                    )
                key = column + "_minus_random"
                row[key], row[key + "_low"], row[key + "_high"] = difference
            summary.append(row)
    return summary


def _ci(values: list[float]) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():  # no fine-tune: the column is nan throughout
        return (float("nan"),) * 3
    return mean_ci(values, LEVEL)


def format_tables(
    summary: list[dict], examples: int, per_class: int, base_accuracy: float, finetune_epochs: int
) -> str:
    """The printed result (no timings, so two runs with the same torch version and threads print the same text)."""
    seeds = summary[0]["seeds"]
    interval = f"95% t-interval over {seeds} seeds" if seeds > 1 else "one seed: no interval"
    lines = [
        f"test accuracy after pruning every group to a keep ratio, scores from {examples} examples "
        f"({per_class} per class, a new subset per seed; unpruned: {base_accuracy:.4f}); fine-tune: "
        f"{finetune_epochs} epochs on the same examples; mean over seeds ({interval});",
        "minus random: the criterion's accuracy minus random's on the same subset and seed, mean and 95% "
        "t-interval of those paired differences, * when the interval excludes 0",
        "",
    ]
    table = []
    for row in summary:
        cells = {"criterion": row["criterion"], "keep": f"{row['keep']:.2f}", "seeds": row["seeds"]}
        for column in ("accuracy", "accuracy_finetuned"):
            cells[column] = f"{row[column]:.4f}"
            cells[column + ":ci"] = interval_text(row[column + "_low"], row[column + "_high"])
            diff, low, high = (row[column + "_minus_random" + s] for s in ("", "_low", "_high"))
            mark = "*" if not np.isnan(low) and (low > 0 or high < 0) else " "
            cells[column + ":diff"] = "" if np.isnan(diff) else f"{signed_text(diff)} {mark}"
            cells[column + ":diff_ci"] = interval_text(low, high, signed=True)
        table.append(cells)
    columns = ["criterion", "keep"]
    headers = ["criterion", "keep"]
    for column, title in (("accuracy", "pruned"), ("accuracy_finetuned", "fine-tuned")):
        columns += [column, column + ":ci", column + ":diff", column + ":diff_ci"]
        headers += [title, "95% CI", "minus random", "95% CI"]
    lines.append(format_table(table, columns + ["seeds"], headers=headers + ["seeds"]))
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, column, label in (
        (axes[0], "accuracy", "right after pruning"),
        (axes[1], "accuracy_finetuned", "after a short fine-tune"),
    ):
        for criterion in dict.fromkeys(row["criterion"] for row in summary):
            rows = [row for row in summary if row["criterion"] == criterion]
            keeps = [row["keep"] for row in rows]
            colour = CRITERION_COLOURS.get(criterion)
            lines = ax.plot(
                keeps,
                [row[column] for row in rows],
                marker="o",
                label=criterion,
                color=colour,
                linestyle="--" if criterion == "random" else "-",
            )
            low = np.array([row[column + "_low"] for row in rows])
            if not np.isnan(low).all():
                ax.fill_between(
                    keeps, low, [row[column + "_high"] for row in rows], color=lines[0].get_color(), alpha=0.12, lw=0
                )
        ax.set_title(label)
        ax.set_xlabel("fraction of units kept")
        ax.grid(alpha=0.3)
    seeds = summary[0]["seeds"]
    axes[0].set_ylabel("test accuracy" + (f" (mean, 95% CI over {seeds} seeds)" if seeds > 1 else ""))
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
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
    criteria = parse_criteria(args.criteria)
    keeps = [float(k) for k in args.keep.split(",")]
    if not all(0.0 < k <= 1.0 for k in keeps) or args.per_class < 1:
        raise SystemExit("--keep values must be in (0, 1] and --per-class >= 1")
    if args.n_seeds < 1:
        raise SystemExit(f"--n-seeds must be at least 1, got {args.n_seeds}")

    splits = load_dataset(args.dataset, args.data_root, split_seed=args.split_seed)
    arch = args.arch or default_arch(args.dataset)
    model, info = load_or_train(
        arch,
        splits,
        args.results,
        seed=args.seed,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        device=device,
        model_options=model_options_from(args, arch),
        progress=progress,
        retrain=args.retrain,
    )
    _, _, test_loader = splits.loaders(batch_size=args.batch_size, seed=args.seed)
    seeds = list(range(args.seed, args.seed + args.n_seeds))
    subsets = {seed: few_per_class(splits.train, args.per_class, seed=seed) for seed in seeds}
    examples = len(subsets[seeds[0]])
    print(
        f"{splits.describe()}; {arch}: test accuracy {info['test_accuracy']:.4f}; scoring and fine-tuning on "
        f"{examples} examples ({args.per_class} per class), {len(seeds)} seed(s), a new subset per seed"
    )

    runs = []
    jobs = [(name, seed) for seed in seeds for name in criteria]
    for name, seed in tqdm(jobs, desc="criteria x seeds", disable=not progress):
        few = subsets[seed]
        few_loader = DataLoader(few, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
        score_loader = DataLoader(few, batch_size=256)
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
            runs.append(
                {
                    "criterion": name,
                    "seed": seed,
                    "keep": keep,
                    "params": sum(p.numel() for p in pruned.parameters()),
                    "accuracy": accuracy,
                    "accuracy_finetuned": accuracy_finetuned,
                    "score_seconds": score_seconds,
                }
            )

    summary = summarise(runs, criteria, keeps)
    folder = results_folder(args.results, "low_data") / f"{splits.name}_{arch}_{args.per_class}pc_seed{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "runs.csv", runs, RUN_COLUMNS)
    write_csv(folder / "summary.csv", summary, SUMMARY_COLUMNS)
    figure = folder / "low_data.png"
    plot(summary, figure, f"{splits.name} / {arch}: pruning from {args.per_class} examples per class")
    text = format_tables(summary, examples, args.per_class, info["test_accuracy"], args.finetune_epochs)
    payload = {
        "study": "low_data",
        "dataset": splits.name,
        "arch": arch,
        "per_class": args.per_class,
        "keep": keeps,
        "seeds": seeds,
        "finetune_epochs": args.finetune_epochs,
        "base_test_accuracy": info["test_accuracy"],
        "level": LEVEL,
        "environment": environment(),
        "summary": summary,
        "runs": runs,
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
