"""Shared pieces of the experiment scripts: arguments, evaluation, criteria by name, removal,
model costs (through ``torchpruner.utils``), tables and files."""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# torchpruner finds the cascading modules in the traced graph (cascading_modules=None). Set to False to
# hand it the explicit lists of experiments/models.py instead (a cross-check of the discovery).
AUTOMATIC_DISCOVERY = True

DEFAULT_RESULTS = "results"

# One thread by default: every machine has it, so a fresh clone reproduces the README's figures digit for
# digit, and tiny models gain nothing from more threads (on shared cores they lose: waiting threads spin).
DEFAULT_THREADS = 1


# --------------------------------------------------------------------------------------------
# arguments, seeds, devices

def base_parser(description: str, epochs: int = 30) -> argparse.ArgumentParser:
    """Arguments every study shares."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion-mnist", "cifar10"],
                        help="data set; only digits ships with the install, the others need --data-root")
    parser.add_argument("--data-root", default=None, help="folder with a local copy of mnist/fashion-mnist/cifar10")
    parser.add_argument("--arch", default=None, choices=["cnn", "vgg", "mlp"],
                        help="model (default: cnn, or vgg for cifar10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and of the random criteria")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="folder for checkpoints, tables and figures")
    parser.add_argument("--epochs", type=int, default=epochs, help="training epochs of the base model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--retrain", action="store_true", help="ignore a cached checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch intra-op threads; the figures are reproducible for a given torch version and "
                             "thread count (other thread counts sum floats in another order and train other models)")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--widths`` / ``--hidden``: the size of the model a study builds."""
    parser.add_argument("--widths", default=None,
                        help="conv widths of the cnn (e.g. 16,32), vgg config (M: a 2x2 max pool, e.g. 64,M,128,M,256,M), "
                             "or mlp hidden sizes")
    parser.add_argument("--hidden", type=int, default=None, help="hidden units of the cnn's/vgg's classifier")
    return parser


def model_options_from(args: argparse.Namespace, arch: str) -> dict:
    """Constructor options of ``arch`` from :func:`add_model_arguments`'s arguments."""
    options = {}
    if args.widths:
        key = {"cnn": "widths", "vgg": "config", "mlp": "hidden"}[arch]
        options[key] = tuple("M" if arch == "vgg" and w.strip().upper() == "M" else int(w)
                             for w in args.widths.split(","))
    if args.hidden is not None and arch != "mlp":
        options["hidden"] = args.hidden
    return options


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def reproducible(threads: int | None = DEFAULT_THREADS):
    """Deterministic torch for the duration of a study: ``threads`` intra-op threads and
    ``torch.use_deterministic_algorithms`` (restored afterwards).

    Together with the seeded models, loaders and criteria this makes a study print the same figures
    on every run with the same torch version and thread count. The thread count matters: more
    threads split the sums of a matrix product or a convolution differently, the float results
    differ in the last bits and training drifts to another model. An op without a deterministic
    implementation (CUDA only) warns instead of stopping the study.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    previous_threads = torch.get_num_threads()
    previous_mode = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, read when CUDA starts
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_mode, warn_only=previous_warn)
        torch.set_num_threads(previous_threads)


def run_reproducibly(run, args: argparse.Namespace):
    """``run(args)`` under :func:`reproducible` with the study's ``--threads`` (checked first)."""
    if args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    with reproducible(args.threads):
        return run(args)


def environment() -> dict:
    """What the figures of a study depend on besides its arguments."""
    import platform

    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled()}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def results_folder(root: str | Path, study: str) -> Path:
    folder = Path(root) / study
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------------------------
# evaluation, size and speed

@torch.no_grad()
def evaluate(model: nn.Module, loader, device="cpu") -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a loader, in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            total_loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            correct += (logits.argmax(dim=1) == targets).sum().item()
            count += len(targets)
    finally:
        model.train(was_training)
    return total_loss / count, correct / count


def model_costs(model: nn.Module, input_size, batch_size: int = 64, repeats: int = 20,
                threads: int | None = None) -> dict:
    """Parameters, FLOPs of one example and latency (ms) of a batch, via ``torchpruner.utils``.

    The latency is the fastest of ``repeats`` timed forwards: on shared CPUs the median picks up other
    people's load, the minimum is what the model itself costs.
    """
    from torchpruner.utils import count_flops, count_parameters, measure_latency

    latency = measure_latency(model, input_size=tuple(input_size), batch_size=batch_size, repeats=repeats,
                              threads=threads)
    return {"params": count_parameters(model), "flops": count_flops(model, input_size=tuple(input_size)),
            "latency_ms": 1000.0 * latency["min_s"]}


# --------------------------------------------------------------------------------------------
# criteria by name

# One colour per criterion, shared by every figure.
CRITERION_COLOURS = {"random": "#7f7f7f", "weight_norm": "#1f77b4", "apoz": "#ff7f0e", "sensitivity": "#2ca02c",
                     "taylor": "#9467bd", "taylor_signed": "#8c564b", "shapley": "#d62728",
                     "shapley_2std": "#e377c2", "fpgm": "#17becf", "thinet": "#bcbd22", "bn_scale": "#aec7e8",
                     "leave_one_out": "#ff9896", "conductance": "#c5b0d5", "integrated_gradients": "#98df8a"}


def mean_plus_2std(values: np.ndarray) -> np.ndarray:
    """The Shapley paper's best aggregation over examples: mean + 2 standard deviations."""
    values = np.asarray(values, dtype=np.float64)
    return values.mean(axis=0) + 2.0 * values.std(axis=0)


# captum's path methods: integration steps (captum's default) and examples per forward (bounds the memory:
# the steps multiply the batch)
CAPTUM_STEPS = 50
CAPTUM_BATCH = 4096

# name -> (torchpruner class name, constructor options, uses the seed, description)
CRITERIA = {
    "random": ("RandomAttributionMetric", {}, True, "uniform random scores"),
    "weight_norm": ("WeightNormAttributionMetric", {}, False, "L1 norm of each unit's weights"),
    "apoz": ("APoZAttributionMetric", {}, False, "1 - average percentage of zeros"),
    "sensitivity": ("SensitivityAttributionMetric", {}, False, "sum of |dLoss/dz|"),
    "taylor": ("TaylorAttributionMetric", {}, False, "|first-order Taylor| of the loss"),
    "taylor_signed": ("TaylorAttributionMetric", {"signed": True}, False, "signed first-order Taylor"),
    "shapley": ("ShapleyAttributionMetric", {}, True, "Shapley value, mean over examples"),
    "shapley_2std": ("ShapleyAttributionMetric", {"reduction": mean_plus_2std}, True,
                     "Shapley value, mean + 2 std over examples"),
    "fpgm": ("FPGMAttributionMetric", {}, False, "summed L2 distance to the layer's other filters"),
    "thinet": ("ThiNetAttributionMetric", {}, False, "greedy order of least change in the next layer"),
    "bn_scale": ("BNScaleAttributionMetric", {}, False, "|γ| of the BatchNorm after the layer (layers with one)"),
    "leave_one_out": ("LeaveOneOutAttributionMetric", {}, False, "loss increase when the unit alone is removed"),
    # captum's layer methods through torchpruner's adapter (signed: positive = the unit lowers the loss)
    "conductance": ("CaptumAttributionMetric", {"method": "LayerConductance", "n_steps": CAPTUM_STEPS,
                                                "internal_batch_size": CAPTUM_BATCH}, False,
                    "captum LayerConductance: the unit's share of the loss change along the path from a zero input"),
    "integrated_gradients": ("CaptumAttributionMetric", {"method": "LayerIntegratedGradients",
                                                         "n_steps": CAPTUM_STEPS, "internal_batch_size": CAPTUM_BATCH},
                             False, "captum LayerIntegratedGradients: the unit's integrated gradient from a zero "
                                    "activation (the Aumann-Shapley value of the units)"),
}
# Criteria that only score a layer followed by a BatchNorm.
NEEDS_BATCHNORM = ("bn_scale",)
DEFAULT_CRITERIA = ["random", "weight_norm", "fpgm", "bn_scale", "apoz", "thinet", "sensitivity", "taylor",
                    "taylor_signed", "shapley", "shapley_2std", "leave_one_out", "conductance", "integrated_gradients"]
SEEDED_PREFIXES = ("random", "shapley")


def parse_criteria(text: str) -> list[str]:
    """Comma-separated criterion names, each one of :data:`CRITERIA` or ``captum:<Method>``."""
    criteria = [name.strip() for name in text.split(",") if name.strip()]
    for name in criteria:
        if name not in CRITERIA and not name.startswith("captum:"):
            raise SystemExit(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA)} or captum:<Method>")
    return criteria


def criterion_is_seeded(name: str) -> bool:
    return name in CRITERIA and CRITERIA[name][2]


def criterion_scores_groups(name: str) -> bool:
    """Whether ``name`` can score a coupled group (captum's layer methods attribute one tensor)."""
    return not name.startswith("captum:") and CRITERIA.get(name, ("",))[0] != "CaptumAttributionMetric"


def criterion_applies(name: str, layer) -> bool:
    """Whether ``name`` can score ``layer`` (a :class:`experiments.models.PrunableLayer`): BN scale
    needs the BatchNorm that follows the layer, which is among the layer's cascading modules."""
    if name in NEEDS_BATCHNORM:
        return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in layer.cascading)
    return True


def make_metric(name: str, model: nn.Module, loader, device, seed: int = 0, sv_samples: int = 5,
                max_batches: int | None = None, reduction=None):
    """A torchpruner attribution metric for a criterion name (see :data:`CRITERIA`).

    ``captum:<Method>`` (e.g. ``captum:LayerConductance``) wraps any captum layer method through
    ``CaptumAttributionMetric``. ``reduction`` (over examples) overrides the criterion's own.
    """
    from torchpruner import attributions

    options: dict = {"progress": False}  # the scripts show their own progress bars
    if max_batches is not None:
        options["max_batches"] = max_batches
    if reduction is not None:
        options["reduction"] = reduction
    if name.startswith("captum:"):
        return attributions.CaptumAttributionMetric(model, loader, F.cross_entropy, device,
                                                    method=captum_method(name.split(":", 1)[1]), **options)
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA)} or captum:<Method>")
    class_name, extra, seeded, _ = CRITERIA[name]
    options = {**extra, **options}
    if class_name == "CaptumAttributionMetric":
        options["method"] = captum_method(options["method"])
    if seeded:
        options["seed"] = seed
    if class_name == "ShapleyAttributionMetric":
        options["sv_samples"] = sv_samples
    metric_class = getattr(attributions, class_name)
    return metric_class(model, loader, F.cross_entropy, device, **options)


def captum_method(name: str):
    """A captum layer attribution class by name (``LayerConductance``, ``LayerGradientXActivation``, ...)."""
    import captum.attr  # lazy: captum is only needed for these criteria

    method = getattr(captum.attr, name, None)
    if not isinstance(method, type) or not name.startswith("Layer"):
        layer_methods = sorted(n for n in dir(captum.attr) if n.startswith("Layer") and n != "LayerAttribution")
        raise ValueError(f"unknown captum layer method {name!r}; available: {', '.join(layer_methods)}")
    return method


def score_layer(name: str, model: nn.Module, module: nn.Module, loader, device, seed: int = 0,
                sv_samples: int = 5, max_batches: int | None = None) -> np.ndarray:
    """Scores of ``module``'s units at the evaluation point after its BatchNorm and activation."""
    metric = make_metric(name, model, loader, device, seed=seed, sv_samples=sv_samples, max_batches=max_batches)
    scores = metric.run(module, find_best_evaluation_module=True)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(scores)):
        raise FloatingPointError(f"criterion {name} gave non-finite scores for {type(module).__name__}")
    return scores


def removal_order(scores: np.ndarray) -> np.ndarray:
    """Unit indices from least to most important (lowest score first); ties keep index order."""
    return np.argsort(np.asarray(scores), kind="stable")


# --------------------------------------------------------------------------------------------
# removing units: through the Pruner, or by an equivalent mask at the evaluation point

def cascading_for(layer) -> list | None:
    """The cascading modules to hand to ``Pruner.prune_model`` for one of our prunable layers."""
    return None if AUTOMATIC_DISCOVERY else list(layer.cascading)


def make_pruner(model: nn.Module, input_size, device, optimizer=None):
    from torchpruner.pruner import Pruner

    return Pruner(model, input_size=tuple(input_size), device=device, optimizer=optimizer)


def prune_units(pruner, layer, indices: Iterable[int]) -> None:
    """Remove ``indices`` (positions in the layer's *current* units) with the torchpruner Pruner."""
    indices = sorted(int(i) for i in indices)
    if indices:
        pruner.prune_model(layer.module, indices, cascading_modules=cascading_for(layer))


class UnitMask:
    """A persistent mask on the output of a layer's activation: zeroing a unit there equals removing it.

    The mask multiplies along dim 1 (channels of a conv map, features of a Linear output). Use as a
    context manager; the hook is removed on exit.
    """

    def __init__(self, activation: nn.Module, num_units: int):
        self.activation = activation
        self.mask = torch.ones(num_units)
        self._handle = None

    def apply(self, output: torch.Tensor) -> torch.Tensor:
        """``output`` with the dropped units zeroed (what the hook returns)."""
        shape = [1] * output.dim()
        shape[1] = -1
        return output * self.mask.to(device=output.device, dtype=output.dtype).view(shape)

    def _hook(self, module, inputs, output):
        return self.apply(output)

    def drop(self, indices) -> None:
        self.mask[list(indices)] = 0.0

    def __enter__(self):
        self._handle = self.activation.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return False


# --------------------------------------------------------------------------------------------
# output: tables, files, figures

def format_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".4f",
                 headers: list[str] | None = None) -> str:
    """A compact fixed-width text table; ``headers`` (one per column) replace the column keys on top."""
    if not rows:
        return "(empty)"
    columns = columns or list(rows[0])
    headers = list(columns) if headers is None else list(headers)
    if len(headers) != len(columns):
        raise ValueError(f"format_table got {len(headers)} headers for {len(columns)} columns")

    def cell(value):
        if isinstance(value, float):
            return "nan" if math.isnan(value) else format(value, floatfmt)
        return str(value)

    cells = [[cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(header), *(len(r[i]) for r in cells)) for i, header in enumerate(headers)]
    lines = ["  ".join(header.ljust(w) for header, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(value.rjust(w) if _is_number(value) else value.ljust(w) for value, w in zip(r, widths))
              for r in cells]
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text.replace("±", "").split()[0])
        return True
    except (ValueError, IndexError):
        return False


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    path = Path(path)
    columns = columns or (list(rows[0]) if rows else [])
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: Path, payload) -> Path:
    path = Path(path)
    path.write_text(json.dumps(payload, indent=2, default=_json_default))
    return path


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, torch.device)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


@contextlib.contextmanager
def torch_threads(count: int | None):
    """Temporarily limit torch's intra-op threads (None: leave as is)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")

