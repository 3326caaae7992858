"""Layer-wise robustness of pruning criteria (the Shapley-pruning paper's main comparison).

For every prunable layer of a trained model and every criterion, the units are scored on the
validation split and removed one at a time, least important first, with no fine-tuning; the test
loss and accuracy are recorded after each removal. A criterion is better when the loss grows more
slowly. The summary number per criterion is the mean test-loss increase per removed unit:
for a layer with n units, the average over k = 1..n-1 of loss(k removed) - loss(0 removed), then the
average over layers (lower is better). Random and Shapley are repeated over several seeds.

Removal: by default each curve is computed by zeroing the removed units at the layer's evaluation
point (after BatchNorm and ReLU), which is exactly what removing them does in eval mode; for every
curve a few points are re-done by really removing the units with the torchpruner Pruner on a fresh
copy of the model, and the largest difference is reported. ``--removal prune`` uses the Pruner for
every point.

    python -m experiments.compare_criteria                       # digits, small CNN, < 3 min on 2 cores
    python -m experiments.compare_criteria --captum LayerConductance
    python -m experiments.compare_criteria --dataset mnist --data-root ~/data
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python experiments/compare_criteria.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm.auto import tqdm

from experiments.common import (CRITERIA, CRITERION_COLOURS, DEFAULT_CRITERIA, add_model_arguments, base_parser,
                                criterion_is_seeded, evaluate, model_options_from, parse_criteria, format_table, make_metric, make_pruner, mean_plus_2std, mean_std, prune_units,
                                pyplot, removal_order, resolve_device, results_folder, score_layer,
                                UnitMask, write_csv, write_json)
from experiments.data import load_dataset, make_loader
from experiments.models import default_arch, load_or_train, prunable_layers

COLOURS = CRITERION_COLOURS
CURVE_COLUMNS = ["layer", "criterion", "seed", "removed", "unit", "test_loss", "test_accuracy"]
SUMMARY_COLUMNS = ["criterion", "loss_increase", "loss_increase_std", "accuracy_drop", "accuracy_drop_std",
                   "seeds", "score_seconds"]


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA),
                        help=f"comma-separated criteria from: {', '.join(CRITERIA)}")
    parser.add_argument("--captum", default="",
                        help="comma-separated captum layer methods to add, e.g. LayerConductance")
    parser.add_argument("--layers", default="", help="comma-separated layer names (default: all prunable)")
    parser.add_argument("--n-seeds", type=int, default=3, help="seeds for the random criteria (random, shapley)")
    parser.add_argument("--sv-samples", type=int, default=5, help="permutations per Shapley estimate")
    parser.add_argument("--score-batches", type=int, default=None, help="cap on validation batches for scoring")
    parser.add_argument("--removal", choices=["mask", "prune"], default="mask",
                        help="mask: zero units at the evaluation point (checked against the Pruner); "
                             "prune: remove every unit with the Pruner")
    parser.add_argument("--verify-points", type=int, default=2,
                        help="points per curve re-done with the Pruner in mask mode (0: none)")
    parser.add_argument("--max-removed", type=int, default=None, help="stop each curve after this many units")
    add_model_arguments(parser)
    parser.add_argument("--figure", default=None, help="also write the PNG to this path")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    device = resolve_device(args.device)
    progress = not args.no_progress
    criteria = parse_criteria(args.criteria)
    criteria += [f"captum:{m.strip()}" for m in args.captum.split(",") if m.strip()]

    splits = load_dataset(args.dataset, args.data_root, split_seed=args.split_seed)
    arch = args.arch or default_arch(splits.name)
    model_options = model_options_from(args, arch)
    model, info = load_or_train(arch, splits, args.results, seed=args.seed, epochs=args.epochs, lr=args.lr,
                                batch_size=args.batch_size, device=device, model_options=model_options,
                                progress=progress, retrain=args.retrain)
    model.eval()
    _, val_loader, test_loader = splits.loaders(batch_size=args.batch_size)
    base_loss, base_accuracy = evaluate(model, test_loader, device=device)

    layers = prunable_layers(model)
    if args.layers:
        wanted = [name.strip() for name in args.layers.split(",") if name.strip()]
        unknown = set(wanted) - {layer.name for layer in layers}
        if unknown:
            raise SystemExit(f"unknown layers {sorted(unknown)}; prunable: {[layer.name for layer in layers]}")
        layers = [layer for layer in layers if layer.name in wanted]

    seeds = [args.seed + offset for offset in range(max(1, args.n_seeds))]
    jobs = [(layer, name, seed) for layer in layers for name in criteria
            for seed in (seeds if _seeded(name) else [args.seed])]

    curves: list[dict] = []
    per_curve: list[dict] = []
    score_seconds: dict[str, float] = {name: 0.0 for name in criteria}
    verification: list[dict] = []
    shapley_cache: dict = {}
    removal_seconds = 0.0
    for layer, name, seed in tqdm(jobs, desc="layers x criteria", disable=not progress):
        tick = time.perf_counter()
        scores = _scores(name, model, layer, val_loader, device, seed, args, shapley_cache)
        score_seconds[name] += time.perf_counter() - tick
        order = removal_order(scores)
        tick = time.perf_counter()
        steps = layer.num_units - 1 if args.max_removed is None else min(args.max_removed, layer.num_units - 1)
        if args.removal == "prune":
            losses, accuracies = pruned_curve(model, layer.name, order[:steps], test_loader, splits.input_size,
                                              device)
        else:
            losses, accuracies = masked_curve(model, layer, order[:steps], test_loader, device)
            for k in _verify_points(steps, args.verify_points):
                pruned_loss, pruned_accuracy, remaining = prune_copy(model, layer.name, order[:k], test_loader,
                                                                     splits.input_size, device)
                verification.append({"layer": layer.name, "criterion": name, "seed": seed, "removed": k,
                                     "mask_loss": losses[k], "pruned_loss": pruned_loss,
                                     "abs_diff": abs(losses[k] - pruned_loss),
                                     "units_left": remaining, "expected_units_left": layer.num_units - k})
        removal_seconds += time.perf_counter() - tick
        for k, (loss, accuracy) in enumerate(zip(losses, accuracies)):
            curves.append({"layer": layer.name, "criterion": name, "seed": seed, "removed": k,
                           "unit": int(order[k - 1]) if k > 0 else -1, "test_loss": loss,
                           "test_accuracy": accuracy})
        per_curve.append({"layer": layer.name, "criterion": name, "seed": seed, "units": layer.num_units,
                          "scores": scores.tolist(), "order": order.tolist(),
                          "loss_increase": float(np.mean(np.asarray(losses[1:]) - losses[0])) if steps else 0.0,
                          "accuracy_drop": float(np.mean(accuracies[0] - np.asarray(accuracies[1:]))) if steps
                          else 0.0})

    summary = summarise(per_curve, criteria, score_seconds)
    elapsed = time.perf_counter() - started
    out = results_folder(args.results, "compare_criteria") / f"{splits.name}_{arch}_seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "curves.csv", curves, CURVE_COLUMNS)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    figure = plot_curves(curves, summary, [layer.name for layer in layers], criteria, out / "compare_criteria.png",
                         title=f"{splits.name} / {arch}: test loss while removing units (no fine-tuning)")
    if args.figure:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        Path(args.figure).write_bytes(figure.read_bytes())
    max_diff = max((v["abs_diff"] for v in verification), default=float("nan"))
    payload = {
        "study": "compare_criteria", "args": vars(args), "dataset": splits.describe(), "arch": arch,
        "model": info, "device": str(device), "threads": torch.get_num_threads(),
        "base": {"test_loss": base_loss, "test_accuracy": base_accuracy},
        "layers": [{"name": layer.name, "units": layer.num_units} for layer in layers],
        "criteria": criteria, "seeds": seeds, "summary": summary, "curves": per_curve,
        "verification": {"points": verification, "max_abs_loss_diff": max_diff},
        "timing": {"total_seconds": elapsed, "train_seconds": info["train_seconds"],
                   "score_seconds": score_seconds, "removal_seconds": removal_seconds},
        "files": {"curves": str(out / "curves.csv"), "summary": str(out / "summary.csv"), "figure": str(figure)},
    }
    write_json(out / "results.json", payload)

    print(f"\n{splits.describe()}; {arch}: test loss {base_loss:.4f}, accuracy {base_accuracy:.4f}"
          f" ({'cached' if info['cached'] else 'trained'} checkpoint)")
    print("mean test-loss increase per removed unit, averaged over layers "
          f"({', '.join(f'{layer.name}: {layer.num_units}' for layer in layers)} units); lower is better\n")
    print(format_table([{**row, "loss_increase": f"{row['loss_increase']:.4f} ± {row['loss_increase_std']:.4f}"
                         if row["seeds"] > 1 else f"{row['loss_increase']:.4f}",
                         "accuracy_drop": f"{row['accuracy_drop']:.4f}"} for row in summary],
                       ["criterion", "loss_increase", "accuracy_drop", "seeds", "score_seconds"], floatfmt=".2f"))
    if verification:
        print(f"\nPruner check: {len(verification)} points re-done by real removal, "
              f"max |loss difference| {max_diff:.2e}")
    print(f"total {elapsed:.1f} s (training {info['train_seconds']:.1f} s, scoring "
          f"{sum(score_seconds.values()):.1f} s, removal curves {removal_seconds:.1f} s)")
    print(f"results: {out}\nfigure: {figure}")
    return payload


def _seeded(name: str) -> bool:
    return criterion_is_seeded(name)


def _scores(name, model, layer, loader, device, seed, args, shapley_cache) -> np.ndarray:
    """Scores for one criterion; both Shapley aggregations share one per-example Shapley run."""
    if name in ("shapley", "shapley_2std"):
        key = (layer.name, seed)
        if key not in shapley_cache:
            metric = make_metric("shapley", model, loader, device, seed=seed, sv_samples=args.sv_samples,
                                 max_batches=args.score_batches, reduction="none")
            per_example = metric.run(layer.module, find_best_evaluation_module=True)
            shapley_cache[key] = np.asarray(per_example, dtype=np.float64)
        per_example = shapley_cache[key]
        return per_example.mean(axis=0) if name == "shapley" else mean_plus_2std(per_example)
    return score_layer(name, model, layer.module, loader, device, seed=seed, sv_samples=args.sv_samples,
                       max_batches=args.score_batches)


def _verify_points(steps: int, count: int) -> list[int]:
    if count <= 0 or steps <= 0:
        return []
    return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})


def masked_curve(model, layer, order, loader, device):
    """Test (loss, accuracy) after zeroing 0, 1, ..., len(order) units in ``order`` at the evaluation point."""
    losses, accuracies = [], []
    with UnitMask(layer.activation, layer.num_units) as mask:
        loss, accuracy = evaluate(model, loader, device=device)
        losses.append(loss)
        accuracies.append(accuracy)
        for unit in order:
            mask.drop([int(unit)])
            loss, accuracy = evaluate(model, loader, device=device)
            losses.append(loss)
            accuracies.append(accuracy)
    return losses, accuracies


def _layer_named(model, name):
    return next(layer for layer in prunable_layers(model) if layer.name == name)


def pruned_curve(model, layer_name, order, loader, input_size, device):
    """Like :func:`masked_curve` but removing each unit for real with the Pruner, on a fresh copy."""
    twin = copy.deepcopy(model).eval()
    layer = _layer_named(twin, layer_name)
    pruner = make_pruner(twin, input_size, device)
    remaining = list(range(layer.num_units))  # original ids of the units still present, in order
    loss, accuracy = evaluate(twin, loader, device=device)
    losses, accuracies = [loss], [accuracy]
    for unit in order:
        position = remaining.index(int(unit))
        prune_units(pruner, layer, [position])
        remaining.pop(position)
        loss, accuracy = evaluate(twin, loader, device=device)
        losses.append(loss)
        accuracies.append(accuracy)
    return losses, accuracies


def prune_copy(model, layer_name, units, loader, input_size, device):
    """Remove ``units`` (original ids) from a fresh copy with the Pruner; (loss, accuracy, units left)."""
    twin = copy.deepcopy(model).eval()
    layer = _layer_named(twin, layer_name)
    prune_units(make_pruner(twin, input_size, device), layer, [int(u) for u in units])
    loss, accuracy = evaluate(twin, loader, device=device)
    return loss, accuracy, layer.num_units


def summarise(per_curve: list[dict], criteria: list[str], score_seconds: dict) -> list[dict]:
    """Per criterion: mean over layers of the per-curve numbers, then mean ± std over seeds."""
    rows = []
    for name in criteria:
        mine = [c for c in per_curve if c["criterion"] == name]
        seeds = sorted({c["seed"] for c in mine})
        by_seed_loss = [np.mean([c["loss_increase"] for c in mine if c["seed"] == s]) for s in seeds]
        by_seed_accuracy = [np.mean([c["accuracy_drop"] for c in mine if c["seed"] == s]) for s in seeds]
        loss_mean, loss_std = mean_std(by_seed_loss)
        accuracy_mean, accuracy_std = mean_std(by_seed_accuracy)
        rows.append({"criterion": name, "loss_increase": loss_mean, "loss_increase_std": loss_std,
                     "accuracy_drop": accuracy_mean, "accuracy_drop_std": accuracy_std, "seeds": len(seeds),
                     "score_seconds": score_seconds.get(name, 0.0)})
    rows.sort(key=lambda row: row["loss_increase"])
    return rows


def plot_curves(curves, summary, layer_names, criteria, path: Path, title: str = "") -> Path:
    """A panel per layer (test loss vs units removed, a line per criterion, seeds averaged with a band)
    and a last panel with the summary bars."""
    plt = pyplot()
    panels = len(layer_names) + 1
    columns = min(panels, 4)
    rows = (panels + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    axes = axes.ravel()
    palette = plt.get_cmap("tab10")
    colour = {name: COLOURS.get(name, palette(i % 10)) for i, name in enumerate(criteria)}
    for ax, layer_name in zip(axes, layer_names):
        for name in criteria:
            points = [c for c in curves if c["layer"] == layer_name and c["criterion"] == name]
            if not points:
                continue
            seeds = sorted({c["seed"] for c in points})
            table = np.array([[c["test_loss"] for c in points if c["seed"] == s] for s in seeds])
            x = np.arange(table.shape[1])
            ax.plot(x, table.mean(axis=0), color=colour[name], label=name, lw=1.4,
                    ls="--" if name == "random" else "-")
            if len(seeds) > 1:
                ax.fill_between(x, table.min(axis=0), table.max(axis=0), color=colour[name], alpha=0.15, lw=0)
        ax.set_title(layer_name)
        ax.set_xlabel("units removed")
        ax.set_ylabel("test loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    ax = axes[len(layer_names)]
    names = [row["criterion"] for row in summary]
    ax.barh(range(len(names)), [row["loss_increase"] for row in summary],
            xerr=[row["loss_increase_std"] for row in summary], color=[colour[n] for n in names])
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("mean loss increase per removed unit")
    ax.set_title("summary (lower is better)")
    ax.grid(alpha=0.3, axis="x")
    for ax in axes[panels:]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
