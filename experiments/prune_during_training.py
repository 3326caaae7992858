"""Prune while training: score every coupled group with a criterion every k epochs and remove a fraction
of its units with the live optimizer (no reload, no rebuild).

Three runs from the same seed, each for the same number of epochs:

- ``pruned``: trained from scratch; at epochs k, 2k, ... (``--events`` times) every group of
  ``pruner.groups()`` is scored with ``--criterion`` on the validation split (``attr.run(group)``)
  and its lowest ``--fraction`` is removed (``prune_groups``); training goes on with the same model
  object and the same Adam optimizer, whose state is sliced in place.
- ``scratch``: the final pruned architecture with its parameters re-initialised, trained from scratch.
- ``unpruned``: the full model, trained the same way.

Per epoch: training loss, validation and test loss/accuracy, parameters, FLOPs of one example and the
measured latency of a batch (``torchpruner.utils``). Writes ``history.csv``, ``summary.csv``,
``results.json`` and a PNG.

    python -m experiments.prune_during_training                        # digits, Taylor, < 1 min
    python -m experiments.prune_during_training --criterion shapley --every 4 --events 3
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python experiments/prune_during_training.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from tqdm.auto import tqdm

from experiments.common import (
    CRITERIA,
    add_model_arguments,
    base_parser,
    model_options_from,
    parse_criteria,
    evaluate,
    format_table,
    make_metric,
    model_costs,
    pyplot,
    resolve_device,
    results_folder,
    seed_everything,
    write_csv,
    write_json,
    run_reproducibly,
)
from experiments.data import load_dataset
from experiments.models import build_model, default_arch, train_one_epoch

HISTORY_COLUMNS = [
    "variant",
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "test_loss",
    "test_accuracy",
    "params",
    "flops",
    "latency_ms",
    "widths",
    "pruned_units",
    "score_seconds",
]
SUMMARY_COLUMNS = ["variant", "test_accuracy", "test_loss", "params", "flops", "latency_ms", "widths", "train_seconds"]
VARIANTS = ("pruned", "scratch", "unpruned")
COLOURS = {"pruned": "#d62728", "scratch": "#1f77b4", "unpruned": "#7f7f7f"}


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0], epochs=30)
    parser.add_argument(
        "--criterion",
        default="taylor",
        help=f"scores of the group units: one of {', '.join(CRITERIA)} or captum:<Method>",
    )
    parser.add_argument("--every", type=int, default=5, help="prune after every k-th epoch")
    parser.add_argument("--events", type=int, default=4, help="number of pruning events")
    parser.add_argument(
        "--fraction", type=float, default=0.3, help="fraction of each group's current units removed at an event"
    )
    parser.add_argument("--sv-samples", type=int, default=5, help="permutations per Shapley estimate")
    parser.add_argument("--score-batches", type=int, default=None, help="cap on validation batches for scoring")
    add_model_arguments(parser)
    parser.add_argument("--latency-batch", type=int, default=64, help="batch size of the latency measurement")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which runs to do (pruned is always run)")
    return parser


def group_widths(pruner) -> str:
    return "/".join(str(group.num_units) for group in pruner.groups())


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` (same widths, same Dropout p) with freshly initialised parameters."""
    fresh = copy.deepcopy(model)
    seed_everything(seed)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()  # BatchNorm also resets its running statistics
    return fresh


def train_variant(variant: str, model: nn.Module, splits, args, device, progress: bool, prune: bool = False):
    """Train ``model`` for ``args.epochs``; with ``prune``, score and cut every group on the schedule."""
    from torchpruner.schedule import prune_groups
    from torchpruner.pruner import Pruner

    train_loader, val_loader, test_loader = splits.loaders(batch_size=args.batch_size, seed=args.seed)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    pruner = Pruner(model, input_size=splits.input_size, device=device, optimizer=optimizer)
    criterion = nn.CrossEntropyLoss()
    prune_epochs = {args.every * (k + 1) for k in range(args.events)} if prune else set()
    rows, train_seconds = [], 0.0
    costs = model_costs(model, splits.input_size, batch_size=args.latency_batch)
    test_loss, test_accuracy = evaluate(model, test_loader, device=device)
    val_loss, val_accuracy = evaluate(model, val_loader, device=device)
    rows.append(
        {
            "variant": variant,
            "epoch": 0,
            "train_loss": float("nan"),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            **costs,
            "widths": group_widths(pruner),
            "pruned_units": 0,
            "score_seconds": 0.0,
        }
    )
    for epoch in tqdm(range(1, args.epochs + 1), desc=variant, disable=not progress, leave=False):
        tick = time.perf_counter()
        train_loss = train_one_epoch(model, train_loader, optimizer, criterion, device)
        pruned_units, score_seconds = 0, 0.0
        if epoch in prune_epochs:
            before = sum(group.num_units for group in pruner.groups())
            metric = make_metric(
                args.criterion,
                model,
                val_loader,
                device,
                seed=args.seed + epoch,
                sv_samples=args.sv_samples,
                max_batches=args.score_batches,
            )
            score_tick = time.perf_counter()
            prune_groups(pruner, fraction=args.fraction, scores=metric.run)  # same model, same optimizer
            score_seconds = time.perf_counter() - score_tick
            pruned_units = before - sum(group.num_units for group in pruner.groups())
        train_seconds += time.perf_counter() - tick
        costs = model_costs(model, splits.input_size, batch_size=args.latency_batch)
        val_loss, val_accuracy = evaluate(model, val_loader, device=device)
        test_loss, test_accuracy = evaluate(model, test_loader, device=device)
        rows.append(
            {
                "variant": variant,
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
                **costs,
                "widths": group_widths(pruner),
                "pruned_units": pruned_units,
                "score_seconds": score_seconds,
            }
        )
    return rows, train_seconds


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    return run_reproducibly(run, args)


def run(args) -> dict:
    started = time.perf_counter()
    device = resolve_device(args.device)
    progress = not args.no_progress
    if len(parse_criteria(args.criterion)) != 1:
        raise SystemExit(f"--criterion takes one criterion, got {args.criterion!r}")
    if args.every < 1 or args.events < 0 or not 0.0 <= args.fraction < 1.0:
        raise SystemExit("need --every >= 1, --events >= 0 and 0 <= --fraction < 1")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.every * args.events > args.epochs:
        print(f"note: only {args.epochs // args.every} of {args.events} pruning events fit in {args.epochs} epochs")

    splits = load_dataset(args.dataset, args.data_root, split_seed=args.split_seed)
    arch = args.arch or default_arch(splits.name)
    options = model_options_from(args, arch)

    seed_everything(args.seed)
    model = build_model(arch, splits.input_size, splits.num_classes, **options)
    initial = copy.deepcopy(model)  # the unpruned run starts from the same weights
    history, summary = [], []
    runs = {}
    rows, seconds = train_variant("pruned", model, splits, args, device, progress, prune=True)
    runs["pruned"] = (model, rows, seconds)
    if "scratch" in variants:
        small = reinitialise(model, args.seed)
        seed_everything(args.seed)
        rows, seconds = train_variant("scratch", small, splits, args, device, progress)
        runs["scratch"] = (small, rows, seconds)
    if "unpruned" in variants:
        seed_everything(args.seed)
        rows, seconds = train_variant("unpruned", initial, splits, args, device, progress)
        runs["unpruned"] = (initial, rows, seconds)
    for variant, (_, rows, seconds) in runs.items():
        history += rows
        last = rows[-1]
        summary.append(
            {
                "variant": variant,
                **{key: last[key] for key in ("test_accuracy", "test_loss", "params", "flops", "latency_ms", "widths")},
                "train_seconds": seconds,
            }
        )

    from torchpruner.pruner.checkpoint import pruning_manifest

    out = (
        results_folder(args.results, "prune_during_training")
        / f"{splits.name}_{arch}_{args.criterion.replace(':', '-')}_seed{args.seed}"
    )
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "history.csv", history, HISTORY_COLUMNS)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    figure = plot_history(
        history,
        out / "prune_during_training.png",
        args,
        title=f"{splits.name} / {arch}: pruning with {args.criterion} during training",
    )
    elapsed = time.perf_counter() - started
    payload = {
        "study": "prune_during_training",
        "args": vars(args),
        "dataset": splits.describe(),
        "arch": arch,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "prune_epochs": sorted(r["epoch"] for r in runs["pruned"][1] if r["pruned_units"]),
        "summary": summary,
        "history": history,
        "manifest": pruning_manifest(runs["pruned"][0]),
        "timing": {"total_seconds": elapsed},
        "files": {"history": str(out / "history.csv"), "summary": str(out / "summary.csv"), "figure": str(figure)},
    }
    write_json(out / "results.json", payload)

    print(
        f"\n{splits.describe()}; {arch}; criterion {args.criterion}; prune {args.fraction:.0%} of every group "
        f"after epochs {', '.join(map(str, payload['prune_epochs'])) or '(none)'}; {args.epochs} epochs each\n"
    )
    print(
        format_table(
            [
                {
                    **row,
                    "params": f"{row['params']:,}",
                    "flops": f"{row['flops']:,}",
                    "latency_ms": f"{row['latency_ms']:.3f}",
                    "train_seconds": f"{row['train_seconds']:.1f}",
                }
                for row in summary
            ],
            SUMMARY_COLUMNS,
        )
    )
    print(
        f"\nlatency: fastest of 20 forwards of a batch of {args.latency_batch} on {device}, "
        f"{torch.get_num_threads()} threads; FLOPs of one example; widths = units per group"
    )
    print(f"total {elapsed:.1f} s\nresults: {out}\nfigure: {figure}")
    return payload


def plot_history(history, path: Path, args, title: str = "") -> Path:
    """Four panels over epochs: test accuracy, test loss, parameters and latency; pruning events dashed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = [
        ("test_accuracy", "test accuracy", False),
        ("test_loss", "test loss", True),
        ("params", "parameters", True),
        ("latency_ms", "latency of a batch (ms, best of 20)", False),
    ]
    variants = [v for v in VARIANTS if any(row["variant"] == v for row in history)]
    events = sorted({row["epoch"] for row in history if row["variant"] == "pruned" and row["pruned_units"]})
    for ax, (key, label, log) in zip(axes, panels):
        for variant in variants:
            rows = [row for row in history if row["variant"] == variant]
            ax.plot(
                [row["epoch"] for row in rows],
                [row[key] for row in rows],
                color=COLOURS[variant],
                label=variant,
                lw=1.5,
                marker="." if len(rows) < 40 else None,
            )
        for epoch in events:
            ax.axvline(epoch, color=COLOURS["pruned"], ls=":", lw=0.8, alpha=0.7)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    if title:
        fig.suptitle(f"{title} (dotted: pruning events)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
