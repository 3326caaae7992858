"""Layer-wise robustness of pruning criteria (the Shapley-pruning paper's main comparison).

For every prunable layer of a trained model and every criterion, the units are scored on the
validation split and removed one at a time, least important first, with no fine-tuning; the test
loss and accuracy are recorded after each removal. A criterion is better when the loss grows more
slowly. The number per criterion and layer is the mean test-loss increase per removed unit: for a
layer with n units, the average over k = 1..n-1 of loss(k removed) - loss(0 removed). Random and
Shapley are repeated over several seeds (``--n-seeds``) and averaged per layer.

``--train-seeds N`` trains N models (seeds ``--seed``, ``--seed`` + 1, ...) and runs the comparison
on each. The tables then give, per criterion, the mean over models of its mean over layers with a
95% Student-t interval over models, and the paired comparisons that tell real differences from
noise: for each criterion minus random and minus the best criterion, the difference per (model,
layer) pair, the mean difference with a 95% bootstrap interval over those pairs, and an exact
two-sided sign test. ``*`` marks p < 0.05 with an interval excluding zero, ``**`` the same after a
Bonferroni correction over the criteria of that column. A run with ``--train-seeds N`` computes
exactly what the N runs ``--seed s --train-seeds 1`` compute, model for model.

Reproducible by construction: training, loaders, criteria and the bootstrap are seeded, and the run
uses ``--threads`` torch threads with ``torch.use_deterministic_algorithms``, so the same torch
version and thread count print the same tables (other thread counts train other models).

Criteria: every one of :data:`experiments.common.CRITERIA` by default, captum's LayerConductance
and LayerIntegratedGradients (through torchpruner's captum adapter) included; ``--captum`` adds
other captum layer methods. The study prunes per layer; ``--groups`` scores each layer's coupled
group from ``Pruner.groups()`` with the group metrics instead and removes group units with
``Pruner.plan_groups`` (the models' groups are plain chains, so a group's units are its layer's;
captum's methods score no groups and are left out).

Removal: by default each curve is computed by zeroing the removed units at the layer's evaluation
point (after BatchNorm and ReLU), which is exactly what removing them does in eval mode; the model
up to that point runs once per curve and each point runs only the rest. For every curve a few
points are re-done by really removing the units with the torchpruner Pruner (planned once on the
trained model, applied to a fresh copy), and the largest difference is reported. ``--removal
prune`` uses the Pruner for every point.

    python -m experiments.compare_criteria                       # digits, small CNN, 3 models
    python -m experiments.compare_criteria --train-seeds 1 --seed 2
    python -m experiments.compare_criteria --config digits-vgg          # VGG-style 64-128-256 + fc 256
    python -m experiments.compare_criteria --config mnist1d-cnn1d       # MNIST-1D (pip install mnist1d)
    python -m experiments.compare_criteria --groups                     # score coupled groups
    python -m experiments.compare_criteria --train-seeds 1 --seed 1     # one model per process, side by side,
    python -m experiments.compare_criteria --combine results/compare_criteria/*_seed?/results.json  # then pooled
    python -m experiments.compare_criteria --captum LayerGradientShap
    python -m experiments.compare_criteria --dataset mnist --data-root ~/data
"""

from __future__ import annotations

import copy
import csv
import json
import sys
import time
from types import SimpleNamespace
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python experiments/compare_criteria.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from experiments.common import (
    CRITERIA,
    CRITERION_COLOURS,
    DEFAULT_CRITERIA,
    UnitMask,
    add_model_arguments,
    base_parser,
    cascading_for,
    criterion_applies,
    criterion_is_seeded,
    criterion_scores_groups,
    environment,
    evaluate,
    format_table,
    make_metric,
    make_pruner,
    mean_plus_2std,
    model_options_from,
    parse_criteria,
    prune_units,
    pyplot,
    removal_order,
    run_reproducibly,
    resolve_device,
    results_folder,
    write_csv,
    write_json,
)
from experiments.data import load_dataset
from experiments.models import default_arch, load_or_train, prunable_layers
from experiments.stats import bootstrap_ci, mean_ci, sign_test

COLOURS = CRITERION_COLOURS
CURVE_COLUMNS = ["model_seed", "layer", "criterion", "seed", "removed", "unit", "test_loss", "test_accuracy"]
SUMMARY_COLUMNS = [
    "criterion",
    "loss_increase",
    "loss_increase_low",
    "loss_increase_high",
    "loss_increase_std",
    "accuracy_drop",
    "accuracy_drop_low",
    "accuracy_drop_high",
    "models",
    "layers",
    "seeds",
    "score_seconds",
]
PAIRED_COLUMNS = [
    "criterion",
    "reference",
    "pairs",
    "mean_difference",
    "ci_low",
    "ci_high",
    "lower",
    "higher",
    "p_value",
    "significant",
]
LEVEL = 0.95  # confidence level of every interval
ALPHA = 0.05  # significance level of the sign tests
BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 0


# Documented configurations (--config): arguments they set unless given on the command line.
CONFIGS = {
    "digits-cnn": {},  # the default study
    # the paper's regime on shipped data: wide VGG-style layers (conv, BN, ReLU, max pool), 704 units
    "digits-vgg": {"dataset": "digits", "arch": "vgg", "widths": "64,M,128,M,256,M", "hidden": 256},
    # a second embedded data set, harder than digits: 1-D signals and Conv1d layers
    "mnist1d-cnn1d": {"dataset": "mnist1d", "arch": "cnn1d", "widths": "32,64", "hidden": 128},
}


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        default=None,
        choices=sorted(CONFIGS),
        help="a documented configuration: sets --dataset, --arch, --widths and --hidden unless given",
    )
    parser.add_argument(
        "--criteria", default=",".join(DEFAULT_CRITERIA), help=f"comma-separated criteria from: {', '.join(CRITERIA)}"
    )
    parser.add_argument(
        "--captum", default="", help="comma-separated captum layer methods to add, e.g. LayerConductance"
    )
    parser.add_argument("--layers", default="", help="comma-separated layer names (default: all prunable)")
    parser.add_argument(
        "--train-seeds",
        type=int,
        default=3,
        help="trained models (seeds --seed, --seed + 1, ...); the tables average over them",
    )
    parser.add_argument(
        "--n-seeds", type=int, default=3, help="seeds per model for the random criteria (random, shapley)"
    )
    parser.add_argument("--sv-samples", type=int, default=5, help="permutations per Shapley estimate")
    parser.add_argument("--score-batches", type=int, default=None, help="cap on validation batches for scoring")
    parser.add_argument(
        "--removal",
        choices=["mask", "prune"],
        default="mask",
        help="mask: zero units at the evaluation point (checked against the Pruner); "
        "prune: remove every unit with the Pruner",
    )
    parser.add_argument(
        "--verify-points", type=int, default=2, help="points per curve re-done with the Pruner in mask mode (0: none)"
    )
    parser.add_argument("--max-removed", type=int, default=None, help="stop each curve after this many units")
    parser.add_argument(
        "--groups",
        action="store_true",
        help="score each layer's coupled group from Pruner.groups() with the group metrics and remove "
        "units with Pruner.plan_groups (the models' groups are plain chains, so a group is its "
        "layer; captum's layer methods score no groups and are left out)",
    )
    add_model_arguments(parser)
    parser.add_argument("--figure", default=None, help="also write the PNG to this path")
    parser.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="RESULTS_JSON",
        help="instead of running: the averaged tables of earlier runs of other trained models (their "
        "results.json, e.g. one run per --seed), as one run over all their models prints them",
    )
    return parser


def parse_arguments(argv=None):
    """The study's arguments, with ``--config``'s values where the command line left the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in CONFIGS.get(args.config, {}).items():
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    if args.combine:
        return combine(args.combine, args.results, args.figure)
    if args.train_seeds < 1:
        raise SystemExit(f"--train-seeds must be at least 1, got {args.train_seeds}")
    if args.n_seeds < 1:
        raise SystemExit(f"--n-seeds must be at least 1, got {args.n_seeds}")
    return run_reproducibly(run, args)


def run(args) -> dict:
    started = time.perf_counter()
    device = resolve_device(args.device)
    progress = not args.no_progress
    criteria = parse_criteria(args.criteria)
    criteria += [f"captum:{m.strip()}" for m in args.captum.split(",") if m.strip()]

    splits = load_dataset(args.dataset, args.data_root, split_seed=args.split_seed)
    arch = args.arch or default_arch(splits.name)
    model_options = model_options_from(args, arch)
    model_seeds = [args.seed + offset for offset in range(args.train_seeds)]

    curves: list[dict] = []
    per_curve: list[dict] = []
    models: list[dict] = []
    verification: list[dict] = []
    score_seconds: dict[str, float] = {name: 0.0 for name in criteria}
    removal_seconds = train_seconds = 0.0
    for model_seed in model_seeds:
        model, info = load_or_train(
            arch,
            splits,
            args.results,
            seed=model_seed,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            device=device,
            model_options=model_options,
            progress=progress,
            retrain=args.retrain,
        )
        train_seconds += info["train_seconds"]
        model.eval()
        _, val_loader, test_loader = splits.loaders(batch_size=args.batch_size)
        test_loader = cached_batches(test_loader, device)
        base_loss, base_accuracy = evaluate(model, test_loader, device=device)
        models.append({"seed": model_seed, "test_loss": base_loss, "test_accuracy": base_accuracy, **info})
        layers = _selected_layers(model, args.layers)
        suffixes = {layer.name: suffix_after(model, layer.activation) for layer in layers}
        pruner = make_pruner(model, splits.input_size, device)  # plans every check on this model's one trace
        groups = layer_groups(pruner, layers) if args.groups else {}

        seeds = [model_seed + offset for offset in range(args.n_seeds)]
        jobs = [
            (layer, name, seed)
            for layer in layers
            for name in criteria
            if criterion_applies(name, layer) and (not args.groups or criterion_scores_groups(name))
            for seed in (seeds if criterion_is_seeded(name) else [model_seed])
        ]
        shapley_cache: dict = {}
        scored: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        for layer, name, seed in tqdm(jobs, desc=f"model {model_seed}: layers x criteria", disable=not progress):
            if (name, seed) not in scored:  # every layer this criterion scores, in one run_all
                tick = time.perf_counter()
                wanted = [other for other, n, s in jobs if (n, s) == (name, seed)]
                scored[name, seed] = _scores(name, model, wanted, val_loader, device, seed, args, shapley_cache, groups)
                score_seconds[name] += time.perf_counter() - tick
            scores = scored[name, seed][layer.name]
            order = removal_order(scores)
            tick = time.perf_counter()
            steps = layer.num_units - 1 if args.max_removed is None else min(args.max_removed, layer.num_units - 1)
            if args.removal == "prune":
                losses, accuracies = pruned_curve(
                    model, layer.name, order[:steps], test_loader, splits.input_size, device
                )
            else:
                losses, accuracies = masked_curve(
                    model, layer, order[:steps], test_loader, device, suffix=suffixes[layer.name]
                )
                for k in _verify_points(steps, args.verify_points):
                    pruned_loss, pruned_accuracy, remaining = prune_copy(
                        model,
                        layer.name,
                        order[:k],
                        test_loader,
                        splits.input_size,
                        device,
                        pruner=pruner,
                        group=groups.get(layer.name),
                    )
                    verification.append(
                        {
                            "model_seed": model_seed,
                            "layer": layer.name,
                            "criterion": name,
                            "seed": seed,
                            "removed": k,
                            "mask_loss": losses[k],
                            "pruned_loss": pruned_loss,
                            "abs_diff": abs(losses[k] - pruned_loss),
                            "units_left": remaining,
                            "expected_units_left": layer.num_units - k,
                        }
                    )
            removal_seconds += time.perf_counter() - tick
            for k, (loss, accuracy) in enumerate(zip(losses, accuracies)):
                curves.append(
                    {
                        "model_seed": model_seed,
                        "layer": layer.name,
                        "criterion": name,
                        "seed": seed,
                        "removed": k,
                        "unit": int(order[k - 1]) if k > 0 else -1,
                        "test_loss": loss,
                        "test_accuracy": accuracy,
                    }
                )
            per_curve.append(
                {
                    "model_seed": model_seed,
                    "layer": layer.name,
                    "criterion": name,
                    "seed": seed,
                    "units": layer.num_units,
                    "scores": scores.tolist(),
                    "order": order.tolist(),
                    "loss_increase": float(np.mean(np.asarray(losses[1:]) - losses[0])) if steps else 0.0,
                    "accuracy_drop": float(np.mean(accuracies[0] - np.asarray(accuracies[1:]))) if steps else 0.0,
                }
            )

    layer_names = [layer.name for layer in layers]
    summary = summarise(per_curve, criteria, score_seconds)
    best = best_criterion(summary)
    paired = paired_comparisons(per_curve, criteria, "random") if "random" in criteria else []
    paired += paired_comparisons(per_curve, criteria, best)
    elapsed = time.perf_counter() - started

    tag = f"seed{args.seed}" if len(model_seeds) == 1 else f"seeds{model_seeds[0]}-{model_seeds[-1]}"
    out = (
        results_folder(args.results, "compare_criteria")
        / f"{splits.name}_{arch}_{tag}{'_groups' if args.groups else ''}"
    )
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "curves.csv", curves, CURVE_COLUMNS)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    write_csv(out / "paired.csv", paired, PAIRED_COLUMNS)
    figure = plot_curves(
        curves,
        summary,
        layer_names,
        criteria,
        out / "compare_criteria.png",
        title=f"{splits.name} / {arch}, {len(model_seeds)} trained model"
        f"{'s' if len(model_seeds) > 1 else ''}: test loss while removing units "
        "(no fine-tuning)",
    )
    if args.figure:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        Path(args.figure).write_bytes(figure.read_bytes())
    max_diff = max((v["abs_diff"] for v in verification), default=float("nan"))
    tables = format_tables(summary, paired, best, models, layers, splits.describe(), arch, groups=args.groups)
    payload = {
        "study": "compare_criteria",
        "args": vars(args),
        "environment": environment(),
        "dataset": splits.describe(),
        "arch": arch,
        "models": models,
        "device": str(device),
        "layers": [{"name": layer.name, "units": layer.num_units} for layer in layers],
        "criteria": criteria,
        "model_seeds": model_seeds,
        "best": best,
        "summary": summary,
        "paired": paired,
        "curves": per_curve,
        "tables": tables,
        "verification": {"points": verification, "max_abs_loss_diff": max_diff},
        "timing": {
            "total_seconds": elapsed,
            "train_seconds": train_seconds,
            "score_seconds": score_seconds,
            "removal_seconds": removal_seconds,
        },
        "files": {
            "curves": str(out / "curves.csv"),
            "summary": str(out / "summary.csv"),
            "paired": str(out / "paired.csv"),
            "figure": str(figure),
            "results": str(out / "results.json"),
        },
    }
    write_json(out / "results.json", payload)

    print("\n" + tables)
    if verification:
        print(
            f"\nPruner check: {len(verification)} points re-done by real removal, max |loss difference| {max_diff:.2e}"
        )
    env = payload["environment"]
    print(
        f"torch {env['torch']}, {env['threads']} thread{'s' if env['threads'] > 1 else ''}, {device}; "
        f"total {elapsed:.1f} s (training {train_seconds:.1f} s, scoring {sum(score_seconds.values()):.1f} s, "
        f"removal curves {removal_seconds:.1f} s)"
    )
    print(f"results: {out}\nfigure: {figure}")
    return payload


# Arguments that change what a run computes for one trained model: combined runs must agree on them.
SAME_IN_COMBINED_RUNS = (
    "dataset",
    "data_root",
    "split_seed",
    "arch",
    "widths",
    "hidden",
    "epochs",
    "batch_size",
    "lr",
    "criteria",
    "captum",
    "layers",
    "n_seeds",
    "sv_samples",
    "score_batches",
    "removal",
    "max_removed",
    "groups",
    "threads",
)


def combine(paths: list[str], results: str, figure_path: str | None = None) -> dict:
    """The tables of one run over every trained model of the runs in ``paths`` (results.json files).

    Runs of different trained models compute per model exactly what one run over all of them
    computes, so their curves can be pooled; the runs must agree on everything else
    (:data:`SAME_IN_COMBINED_RUNS`) and on the torch version, and no model may appear twice.
    """
    payloads = [json.loads(Path(path).read_text()) for path in paths]
    first = payloads[0]
    for path, payload in zip(paths, payloads):
        if payload.get("study") != "compare_criteria":
            raise SystemExit(f"--combine: {path} is not a results.json of this study")
        differ = [key for key in SAME_IN_COMBINED_RUNS if payload["args"].get(key) != first["args"].get(key)]
        if payload["environment"]["torch"] != first["environment"]["torch"]:
            differ.append("torch version")
        if differ:
            raise SystemExit(f"--combine: {path} differs from {paths[0]} in {', '.join(differ)}")
    models = sorted((model for payload in payloads for model in payload["models"]), key=lambda m: m["seed"])
    seeds = [model["seed"] for model in models]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--combine: trained models {seeds} appear more than once")
    per_curve = sorted(
        (curve for payload in payloads for curve in payload["curves"]),
        key=lambda curve: seeds.index(curve["model_seed"]),
    )
    curves = sorted(
        (row for payload in payloads for row in _read_curves(payload["files"]["curves"])),
        key=lambda row: seeds.index(row["model_seed"]),
    )
    criteria = first["criteria"]
    score_seconds = {name: sum(p["timing"]["score_seconds"].get(name, 0.0) for p in payloads) for name in criteria}
    summary = summarise(per_curve, criteria, score_seconds)
    best = best_criterion(summary)
    paired = paired_comparisons(per_curve, criteria, "random") if "random" in criteria else []
    paired += paired_comparisons(per_curve, criteria, best)
    layers = [SimpleNamespace(name=layer["name"], num_units=layer["units"]) for layer in first["layers"]]
    arch, groups = first["arch"], bool(first["args"].get("groups"))
    tables = format_tables(summary, paired, best, models, layers, first["dataset"], arch, groups=groups)
    out = results_folder(results, "compare_criteria") / (
        f"{first['dataset'].split(':')[0]}_{arch}_seeds{'-'.join(str(s) for s in seeds)}{'_groups' if groups else ''}"
        "_combined"
    )
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "curves.csv", curves, CURVE_COLUMNS)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    write_csv(out / "paired.csv", paired, PAIRED_COLUMNS)
    figure = plot_curves(
        curves,
        summary,
        [layer.name for layer in layers],
        criteria,
        out / "compare_criteria.png",
        title=f"{first['dataset'].split(':')[0]} / {arch}, {len(models)} trained models: test loss "
        "while removing units (no fine-tuning)",
    )
    if figure_path:
        Path(figure_path).parent.mkdir(parents=True, exist_ok=True)
        Path(figure_path).write_bytes(figure.read_bytes())
    points = [point for payload in payloads for point in payload["verification"]["points"]]
    max_diff = max((point["abs_diff"] for point in points), default=float("nan"))
    payload = {
        "study": "compare_criteria",
        "combined": list(paths),
        "args": first["args"],
        "environment": first["environment"],
        "dataset": first["dataset"],
        "arch": arch,
        "models": models,
        "layers": first["layers"],
        "criteria": criteria,
        "model_seeds": seeds,
        "best": best,
        "summary": summary,
        "paired": paired,
        "curves": per_curve,
        "tables": tables,
        "verification": {"points": points, "max_abs_loss_diff": max_diff},
        "timing": {
            "runs_total_seconds": [p["timing"]["total_seconds"] for p in payloads],
            "score_seconds": score_seconds,
        },
        "files": {
            "curves": str(out / "curves.csv"),
            "summary": str(out / "summary.csv"),
            "paired": str(out / "paired.csv"),
            "figure": str(figure),
            "results": str(out / "results.json"),
        },
    }
    write_json(out / "results.json", payload)
    print("\n" + tables)
    if points:
        print(f"\nPruner check: {len(points)} points re-done by real removal, max |loss difference| {max_diff:.2e}")
    env = first["environment"]
    totals = ", ".join(f"{p['timing']['total_seconds']:.1f}" for p in payloads)
    print(
        f"torch {env['torch']}, {env['threads']} thread{'s' if env['threads'] > 1 else ''}; combined from "
        f"{len(paths)} runs of {totals} s"
    )
    print(f"results: {out}\nfigure: {figure}")
    return payload


def _read_curves(path: str) -> list[dict]:
    """Rows of a curves.csv with their numbers as numbers (as the run recorded them)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("model_seed", "seed", "removed", "unit"):
            row[key] = int(row[key])
        for key in ("test_loss", "test_accuracy"):
            row[key] = float(row[key])
    return rows


def _selected_layers(model, wanted_text: str):
    layers = prunable_layers(model)
    if not wanted_text:
        return layers
    wanted = [name.strip() for name in wanted_text.split(",") if name.strip()]
    unknown = set(wanted) - {layer.name for layer in layers}
    if unknown:
        raise SystemExit(f"unknown layers {sorted(unknown)}; prunable: {[layer.name for layer in layers]}")
    return [layer for layer in layers if layer.name in wanted]


def layer_groups(pruner, layers) -> dict:
    """{layer name: the coupled group from ``pruner.groups()`` whose one source is the layer}.

    The curves zero a unit at the layer's activation, which removes the group unit only when the
    group has no other source (no residual stream); a model with such groups is refused.
    """
    groups = pruner.groups()
    found = {}
    for layer in layers:
        mine = [group for group in groups if any(m is layer.module for m in group.source_modules)]
        if len(mine) != 1 or len(mine[0].source_modules) != 1 or mine[0].num_units != layer.num_units:
            raise SystemExit(
                f"--groups: the units of {layer.name} are shared with other layers "
                f"({', '.join(repr(g) for g in mine) or 'no prunable group'}); the removal curves "
                "zero units at one layer's activation, which only removes a group with one source"
            )
        found[layer.name] = mine[0]
    return found


def _scores(name, model, layers, loader, device, seed, args, shapley_cache, groups) -> dict[str, np.ndarray]:
    """``{layer name: scores}`` for one criterion of every layer in ``layers``, from one
    ``run_all`` (one pass over the data for the gradient and activation criteria): each layer's
    coupled group where ``groups`` has one, else the layer at the evaluation point after its
    BatchNorm and activation; both Shapley aggregations share one per-example Shapley run."""
    targets = [groups.get(layer.name, layer.module) for layer in layers]
    if name in ("shapley", "shapley_2std"):
        if seed not in shapley_cache:
            metric = make_metric(
                "shapley",
                model,
                loader,
                device,
                seed=seed,
                sv_samples=args.sv_samples,
                max_batches=args.score_batches,
                reduction="none",
            )
            per_example = metric.run_all(targets, find_best_evaluation_module=True).values()
            shapley_cache[seed] = {
                layer.name: np.asarray(values, dtype=np.float64) for layer, values in zip(layers, per_example)
            }
        aggregate = (lambda s: s.mean(axis=0)) if name == "shapley" else mean_plus_2std
        return {layer.name: aggregate(shapley_cache[seed][layer.name]) for layer in layers}
    metric = make_metric(
        name, model, loader, device, seed=seed, sv_samples=args.sv_samples, max_batches=args.score_batches
    )
    result = {}
    for layer, values in zip(layers, metric.run_all(targets, find_best_evaluation_module=True).values()):
        scores = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(scores)):
            raise FloatingPointError(f"criterion {name} gave non-finite scores for {layer.name}")
        result[layer.name] = scores
    return result


def _verify_points(steps: int, count: int) -> list[int]:
    if count <= 0 or steps <= 0:
        return []
    return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})


def masked_curve(model, layer, order, loader, device, suffix=None):
    """Test (loss, accuracy) after zeroing 0, 1, ..., len(order) units in ``order`` at the evaluation point.

    With ``suffix`` (:func:`suffix_after` of the layer's activation) the model runs up to the
    activation once per batch and each point of the curve runs only the rest: the same modules on
    the same tensors as the whole forward with :class:`UnitMask`'s hook, so the same numbers, bit
    for bit, at a fraction of the cost for the later layers.
    """
    if suffix is None:
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
    activations = activations_at(model, layer.activation, loader, device)
    mask = UnitMask(layer.activation, layer.num_units)
    losses, accuracies = [], []
    for step in range(len(order) + 1):
        if step:
            mask.drop([int(order[step - 1])])
        loss, accuracy = _evaluate_suffix(suffix, mask, activations)
        losses.append(loss)
        accuracies.append(accuracy)
    return losses, accuracies


def suffix_after(model: nn.Module, activation: nn.Module) -> fx.GraphModule | None:
    """The part of ``model`` after ``activation``, as a graph module taking the activation's output.

    None when torch.fx cannot trace the model, the activation is not called exactly once, or a
    later op reads anything computed before the activation other than its output (a skip
    connection): then the curve runs the whole model.
    """
    name = next((n for n, m in model.named_modules() if m is activation), None)
    if name is None:
        return None
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure means: evaluate the whole model
        return None
    nodes = list(graph.nodes)
    calls = [i for i, node in enumerate(nodes) if node.op == "call_module" and node.target == name]
    if len(calls) != 1:
        return None
    suffix = fx.Graph()
    env = {nodes[calls[0]]: suffix.placeholder("activation")}
    for node in nodes[calls[0] + 1 :]:
        if any(source not in env for source in node.all_input_nodes):
            return None
        env[node] = suffix.node_copy(node, lambda source: env[source])
    return fx.GraphModule(model, suffix)


@torch.no_grad()
def activations_at(model: nn.Module, activation: nn.Module, loader, device) -> list[tuple]:
    """(output of ``activation``, targets) for each batch of ``loader``, in eval mode (mode restored)."""
    captured = []
    handle = activation.register_forward_hook(lambda module, inputs, output: captured.append(output))
    was_training = model.training
    model.eval()
    batches = []
    try:
        for inputs, targets in loader:
            captured.clear()
            model(inputs.to(device))
            batches.append((captured[0].clone(), targets.to(device)))  # safe from later in-place ops
    finally:
        handle.remove()
        model.train(was_training)
    return batches


@torch.no_grad()
def _evaluate_suffix(suffix: fx.GraphModule, mask: UnitMask, activations: list[tuple]) -> tuple[float, float]:
    """:func:`experiments.common.evaluate` from cached activations: the same sums in the same order."""
    total_loss, correct, count = 0.0, 0, 0
    for activation, targets in activations:
        logits = suffix(mask.apply(activation))
        total_loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
        count += len(targets)
    return total_loss / count, correct / count


def cached_batches(loader, device) -> list[tuple]:
    """The loader's batches, collated once: every point of every curve evaluates the same test set."""
    return [(inputs.to(device), targets.to(device)) for inputs, targets in loader]


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


def prune_copy(model, layer_name, units, loader, input_size, device, pruner=None, group=None):
    """Remove ``units`` (original ids) from a fresh copy with the Pruner; (loss, accuracy, units left).

    With ``pruner`` (a Pruner of ``model`` itself) the removal is planned once on ``model``, whose
    traced graph the Pruner keeps between calls, and the plan is applied to the copy (plans name
    modules, so a plan fits every model of the same architecture): the same plan that
    ``prune_model`` on the copy would make, without tracing every copy anew. With ``group`` (one
    of that Pruner's groups) the plan removes the group units, ``pruner.plan_groups``.
    """
    twin = copy.deepcopy(model).eval()
    units = sorted(int(u) for u in units)
    if pruner is None:
        layer = _layer_named(twin, layer_name)
        prune_units(make_pruner(twin, input_size, device), layer, units)
    else:
        original = _layer_named(model, layer_name)
        if group is None:
            plan = pruner.plan(original.module, units, cascading_modules=cascading_for(original))
        else:
            plan = pruner.plan_groups({group: units})
        plan.apply(twin)
        layer = _layer_named(twin, layer_name)
    loss, accuracy = evaluate(twin, loader, device=device)
    return loss, accuracy, layer.num_units


# --------------------------------------------------------------------------------------------
# statistics over trained models and (model, layer) pairs


def layer_values(per_curve: list[dict], criterion: str, key: str = "loss_increase") -> dict:
    """{(model seed, layer): ``key`` averaged over the criterion's seeds} for one criterion."""
    grouped: dict = {}
    for curve in per_curve:
        if curve["criterion"] == criterion:
            grouped.setdefault((curve["model_seed"], curve["layer"]), []).append(curve[key])
    return {pair: float(np.mean(values)) for pair, values in grouped.items()}


def model_means(values: dict) -> list[float]:
    """Per model (in seed order), the mean over its layers of ``{(model seed, layer): value}``."""
    seeds = sorted({seed for seed, _ in values})
    return [float(np.mean([v for (seed, _), v in values.items() if seed == s])) for s in seeds]


def summarise(per_curve: list[dict], criteria: list[str], score_seconds: dict) -> list[dict]:
    """Per criterion: the mean over trained models of its mean over layers, with a 95% t-interval
    over models (nan for one model); sorted from the lowest loss increase."""
    rows = []
    for name in criteria:
        loss = layer_values(per_curve, name, "loss_increase")
        if not loss:
            continue
        accuracy = layer_values(per_curve, name, "accuracy_drop")
        loss_by_model = model_means(loss)
        loss_mean, loss_low, loss_high = mean_ci(loss_by_model, LEVEL)
        accuracy_mean, accuracy_low, accuracy_high = mean_ci(model_means(accuracy), LEVEL)
        seeds = {c["seed"] for c in per_curve if c["criterion"] == name and c["model_seed"] == min(loss)[0]}
        rows.append(
            {
                "criterion": name,
                "loss_increase": loss_mean,
                "loss_increase_low": loss_low,
                "loss_increase_high": loss_high,
                "loss_increase_std": float(np.std(loss_by_model, ddof=1)) if len(loss_by_model) > 1 else 0.0,
                "accuracy_drop": accuracy_mean,
                "accuracy_drop_low": accuracy_low,
                "accuracy_drop_high": accuracy_high,
                "models": len(loss_by_model),
                "layers": len({layer for _, layer in loss}),
                "seeds": len(seeds),
                "score_seconds": score_seconds.get(name, 0.0),
            }
        )
    rows.sort(key=lambda row: row["loss_increase"])
    return rows


def best_criterion(summary: list[dict]) -> str:
    """The criterion with the lowest loss increase among those that score every layer."""
    every_layer = max(row["layers"] for row in summary)
    return next(row["criterion"] for row in summary if row["layers"] == every_layer)


def paired_comparisons(per_curve: list[dict], criteria: list[str], reference: str) -> list[dict]:
    """Each criterion minus ``reference`` on the (model, layer) pairs both score: the mean
    difference in loss increase, its bootstrap interval and the exact sign test.

    ``significant`` is ``"*"`` when p < 0.05 and the interval excludes zero, ``"**"`` when
    moreover p < 0.05 / (criteria compared), else ``""``.
    """
    base = layer_values(per_curve, reference)
    others = [name for name in criteria if name != reference and layer_values(per_curve, name)]
    rows = []
    for name in others:
        values = layer_values(per_curve, name)
        pairs = sorted(set(values) & set(base))
        differences = np.array([values[pair] - base[pair] for pair in pairs])
        low, high = bootstrap_ci(differences, LEVEL, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
        test = sign_test(differences)
        significant = ""
        if test.p_value < ALPHA and not low <= 0.0 <= high:
            significant = "**" if test.p_value < ALPHA / len(others) else "*"
        rows.append(
            {
                "criterion": name,
                "reference": reference,
                "pairs": len(pairs),
                "mean_difference": float(differences.mean()),
                "ci_low": low,
                "ci_high": high,
                "lower": test.negative,
                "higher": test.positive,
                "p_value": test.p_value,
                "significant": significant,
            }
        )
    return rows


def format_tables(
    summary: list[dict],
    paired: list[dict],
    best: str,
    models: list[dict],
    layers,
    dataset: str,
    arch: str,
    groups: bool = False,
) -> str:
    """The printed result: models, the averaged table and the paired comparisons (no timings, so two
    runs with the same torch version and threads print the same text)."""
    lines = [
        f"{dataset}; {arch}, {len(models)} trained model{'s' if len(models) > 1 else ''}"
        f"{', each layer scored as its coupled group' if groups else ''}:"
    ]
    lines += [f"  seed {m['seed']}: test loss {m['test_loss']:.4f}, accuracy {m['test_accuracy']:.4f}" for m in models]
    layer_text = ", ".join(f"{layer.name}: {layer.num_units}" for layer in layers)
    interval = "95% t-interval over models" if len(models) > 1 else "one model: no interval"
    lines += [
        "",
        f"mean test-loss increase per removed unit over the layers ({layer_text} units), mean over "
        f"models ({interval}); lower is better",
        "",
    ]
    every_layer = max(row["layers"] for row in summary)

    def interval_text(low, high):
        return "" if np.isnan(low) else f"[{low:.4f}, {high:.4f}]"

    table = [
        {
            "criterion": row["criterion"] + ("" if row["layers"] == every_layer else f" ({row['layers']} layers)"),
            "loss_increase": f"{row['loss_increase']:.4f}",
            "ci": interval_text(row["loss_increase_low"], row["loss_increase_high"]),
            "accuracy_drop": f"{row['accuracy_drop']:.4f}",
            "accuracy_ci": interval_text(row["accuracy_drop_low"], row["accuracy_drop_high"]),
        }
        for row in summary
    ]
    lines.append(
        format_table(
            table,
            ["criterion", "loss_increase", "ci", "accuracy_drop", "accuracy_ci"],
            headers=["criterion", "loss_increase", "95% CI", "accuracy_drop", "95% CI"],
        )
    )
    references = [name for name in ("random", best) if any(row["reference"] == name for row in paired)]
    if not references:
        return "\n".join(lines)
    lines += [
        "",
        "paired differences in loss increase per (model, layer): mean, 95% bootstrap CI, pairs where "
        "the criterion is lower, exact two-sided sign test;",
        "* p < 0.05 and CI excluding 0, ** also after Bonferroni over the column's criteria",
        "",
    ]
    by_pair = {(row["criterion"], row["reference"]): row for row in paired}
    table, columns, headers = [], ["criterion"], ["criterion"]
    for reference in references:
        columns += [f"{reference}:diff", f"{reference}:ci", f"{reference}:lower", f"{reference}:p"]
        headers += [f"minus {reference}", "95% CI", "lower", "p"]
    for row in summary:
        cells = {"criterion": row["criterion"]}
        for reference in references:
            pair = by_pair.get((row["criterion"], reference))
            if pair is None:
                cells.update(
                    {f"{reference}:diff": "", f"{reference}:ci": "", f"{reference}:lower": "", f"{reference}:p": ""}
                )
                continue
            cells.update(
                {
                    f"{reference}:diff": f"{pair['mean_difference']:+.4f} {pair['significant']:<2}",
                    f"{reference}:ci": f"[{pair['ci_low']:+.4f}, {pair['ci_high']:+.4f}]",
                    f"{reference}:lower": f"{pair['lower']}/{pair['pairs']}",
                    f"{reference}:p": f"{pair['p_value']:.4f}",
                }
            )
        table.append(cells)
    lines.append(format_table(table, columns, headers=headers))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# figure


def plot_curves(curves, summary, layer_names, criteria, path: Path, title: str = "") -> Path:
    """A panel per layer (test loss vs units removed on a log axis, a line per criterion: the
    geometric mean over models of the per-model mean over seeds, shaded with the 95% t-interval of
    the log loss over models — or the seeds' min..max for one model) and a summary panel (loss
    increase per criterion with its 95% interval over models, random as a reference line)."""
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
            model_seeds = sorted({c["model_seed"] for c in points})
            per_model = []
            for model_seed in model_seeds:
                mine = [c for c in points if c["model_seed"] == model_seed]
                seeds = sorted({c["seed"] for c in mine})
                per_model.append(np.array([[c["test_loss"] for c in mine if c["seed"] == s] for s in seeds]))
            x = np.arange(per_model[0].shape[1])
            if len(per_model) > 1:  # log axis: geometric mean over models, t-interval of the log loss
                logs = np.log(np.array([runs.mean(axis=0) for runs in per_model]))
                bands = np.array([mean_ci(column, LEVEL) for column in logs.T])
                centre, low, high = np.exp(bands[:, 0]), np.exp(bands[:, 1]), np.exp(bands[:, 2])
            else:
                table = per_model[0]
                centre, low, high = table.mean(axis=0), table.min(axis=0), table.max(axis=0)
            ax.plot(x, centre, color=colour[name], label=name, lw=1.4, ls="--" if name == "random" else "-")
            if len(per_model) > 1 or len(per_model[0]) > 1:
                ax.fill_between(x, low, high, color=colour[name], alpha=0.12, lw=0)
        ax.set_title(layer_name)
        ax.set_xlabel("units removed")
        ax.set_ylabel("test loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    ax = axes[len(layer_names)]
    every_layer = max(row["layers"] for row in summary)
    names = [row["criterion"] for row in summary]
    means = np.array([row["loss_increase"] for row in summary])
    lows = np.array([row["loss_increase_low"] for row in summary])
    highs = np.array([row["loss_increase_high"] for row in summary])
    errors = None if np.isnan(lows).all() else np.nan_to_num(np.vstack([means - lows, highs - means]))
    ax.bar(range(len(names)), means, yerr=errors, capsize=3, color=[colour[n] for n in names])
    ax.set_xticks(
        range(len(names)),
        [n if row["layers"] == every_layer else f"{n}*" for n, row in zip(names, summary)],
        rotation=60,
        ha="right",
        fontsize=8,
    )
    random_row = next((row for row in summary if row["criterion"] == "random"), None)
    if random_row is not None:
        ax.axhline(random_row["loss_increase"], color=colour["random"], ls="--", lw=1, label="random")
    ax.set_ylabel("loss increase per removed unit")
    ax.set_title(
        "summary, 95% CI (lower is better)"
        + ("; *: fewer layers" if min(row["layers"] for row in summary) < every_layer else ""),
        fontsize=9,
    )
    ax.grid(alpha=0.3, axis="y")
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
