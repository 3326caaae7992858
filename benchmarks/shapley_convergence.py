"""Are 5 samples enough? Convergence of permutation-sampled Shapley scores on the digits CNN.

Model and training as in ``attribution_speed.py`` (conv 32 → ReLU → conv 64 → ReLU → max-pool →
linear 128 → ReLU → linear 10 on scikit-learn's 8×8 digits, trained 3 epochs); each hidden layer
is scored after its ReLU on the first ``--examples`` of the benchmark's 512 scoring examples
(default 128, one batch), with ``ShapleyAttributionMetric`` (the fast algorithm).

For each layer:

* a converged reference: ``--reference`` orderings (default 500, antithetic) from a seed no run
  below uses, with its own reported standard error;
* for n in ``--samples`` (default 1 2 5 10 20 50 100) orderings, plain and antithetic
  (``antithetic=True`` rounds n up to even, so its n = 1 is its n = 2 and is left out), and
  ``--seeds`` seeds (default 4): ``run(point, sv_samples=n, seed=s, return_stderr=True)``.

Columns, each averaged over the seeds:

* ``spearman``: rank correlation of the scores with the reference (``min``: the worst seed);
* ``bottom-25%``: the share of the units a prune by 25% would remove (the quarter with the lowest
  scores) that the reference would remove too;
* ``stderr/range``: the mean reported standard error, relative to the range of the reference;
* ``err/range``: the root-mean-square difference from the reference, relative to its range;
* ``stderr/spread``: the reported standard error against the empirical spread of the scores over
  the seeds, ``sqrt(mean stderr²) / sqrt(mean variance over seeds)`` pooled over the units; about
  1 when the reported standard error is right (with s seeds the ratio itself scatters by about
  ``1/sqrt(2 (s − 1) units)``).

The table is printed and the figure (rank correlation and stderr/range versus n, plain and
antithetic, per layer) saved to ``experiments/figures/shapley_convergence.png``.

    python benchmarks/shapley_convergence.py                 # 1 thread: the scores do not depend on it
    python benchmarks/shapley_convergence.py --layers "linear 128" --seeds 8
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from attribution_speed import digits, digits_cnn, loader, train
from scipy.stats import spearmanr
from torch import nn

from torchpruner.attributions import ShapleyAttributionMetric

#: the hidden layers of the digits CNN, each scored at the ReLU after it
LAYERS = {"conv 32": 1, "conv 64": 3, "linear 128": 7}
SAMPLES = (1, 2, 5, 10, 20, 50, 100)
REFERENCE_SEED = 10_000  # the runs under study use seeds 0 .. seeds − 1
FIGURE = Path(__file__).resolve().parent.parent / "experiments" / "figures" / "shapley_convergence.png"


@dataclass
class Row:
    layer: str
    antithetic: bool
    samples: int  # orderings per run (as the metric counts them)
    spearman: float
    spearman_min: float
    bottom_overlap: float
    stderr_over_range: float
    error_over_range: float
    stderr_over_spread: float


def bottom_overlap(scores: np.ndarray, reference: np.ndarray, fraction: float = 0.25) -> float:
    """Share of the ``fraction`` of units with the lowest ``scores`` that are also among the
    ``fraction`` with the lowest ``reference`` scores (ties broken by unit index, as a stable sort)."""
    k = max(1, round(fraction * len(scores)))
    chosen = set(np.argsort(scores, kind="stable")[:k].tolist())
    expected = set(np.argsort(reference, kind="stable")[:k].tolist())
    return len(chosen & expected) / k


def rank_correlation(scores: np.ndarray, reference: np.ndarray) -> float:
    if np.ptp(scores) == 0 or np.ptp(reference) == 0:
        return float("nan")
    return float(spearmanr(scores, reference).statistic)


def score(
    model: nn.Module, data, point: nn.Module, samples: int, seed: int, antithetic: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores, reported standard errors and the number of orderings of one Shapley run."""
    metric = ShapleyAttributionMetric(
        model, data, F.cross_entropy, "cpu", sv_samples=samples, seed=seed, antithetic=antithetic
    )
    scores, stderr = metric.run(point, return_stderr=True)
    return np.asarray(scores, dtype=np.float64), np.asarray(stderr, dtype=np.float64), metric.last_samples


def convergence(
    model: nn.Module,
    data,
    point: nn.Module,
    layer: str,
    reference: np.ndarray,
    samples: tuple[int, ...] = SAMPLES,
    seeds: int = 4,
    modes: tuple[bool, ...] = (False, True),
) -> list[Row]:
    """One :class:`Row` per (mode, n): ``seeds`` runs of ``n`` orderings compared with ``reference``
    (the scores of a converged run, or exact Shapley values)."""
    if seeds < 2:
        raise ValueError(f"seeds must be at least 2 to measure the spread over seeds, got {seeds}")
    spread = float(np.ptp(reference))
    if spread == 0:
        raise ValueError("the reference scores are all equal: no ranking to converge to")
    rows = []
    for antithetic in modes:
        done: set[int] = set()
        for n in samples:
            orderings = 2 * math.ceil(n / 2) if antithetic else n
            if orderings in done:  # antithetic n = 1 runs the same pair as n = 2
                continue
            done.add(orderings)
            runs = [score(model, data, point, n, seed, antithetic) for seed in range(seeds)]
            if runs[0][2] != orderings:
                raise RuntimeError(f"the metric sampled {runs[0][2]} orderings, expected {orderings}")
            estimates = np.stack([r[0] for r in runs])  # [seeds, units]
            stderrs = np.stack([r[1] for r in runs])
            correlations = [rank_correlation(e, reference) for e in estimates]
            empirical = estimates.var(axis=0, ddof=1).mean()
            reported = float(np.mean(stderrs**2))
            rows.append(
                Row(
                    layer=layer,
                    antithetic=antithetic,
                    samples=orderings,
                    spearman=float(np.mean(correlations)),
                    spearman_min=float(np.min(correlations)),
                    bottom_overlap=float(np.mean([bottom_overlap(e, reference) for e in estimates])),
                    stderr_over_range=float(np.mean(stderrs)) / spread,
                    error_over_range=math.sqrt(float(np.mean((estimates - reference) ** 2))) / spread,
                    stderr_over_spread=math.sqrt(reported / empirical) if empirical > 0 else float("nan"),
                )
            )
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| layer | orderings | mode | spearman | min | bottom-25% | stderr/range | err/range | stderr/spread |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r.layer} | {r.samples} | {'antithetic' if r.antithetic else 'plain'} "
            f"| {r.spearman:.3f} | {r.spearman_min:.3f} | {r.bottom_overlap:.2f} "
            f"| {r.stderr_over_range:.4f} | {r.error_over_range:.4f} | {r.stderr_over_spread:.2f} |"
        )
    return "\n".join(lines)


def figure(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r.layer for r in rows))
    fig, axes = plt.subplots(2, len(layers), figsize=(4 * len(layers), 6.5), squeeze=False, sharex=True)
    for j, layer in enumerate(layers):
        for antithetic, style, color in ((False, "o-", "C0"), (True, "s--", "C1")):
            part = [r for r in rows if r.layer == layer and r.antithetic == antithetic]
            n = [r.samples for r in part]
            label = "antithetic" if antithetic else "plain"
            axes[0, j].plot(n, [r.spearman for r in part], style, color=color, label=label)
            axes[1, j].plot(
                n, [r.stderr_over_range for r in part], style, color=color, label=f"{label}: reported stderr"
            )
            axes[1, j].plot(
                n,
                [r.error_over_range for r in part],
                style,
                color=color,
                alpha=0.35,
                label=f"{label}: RMS error vs reference",
            )
        axes[0, j].set_title(layer)
        axes[0, j].axvline(5, color="grey", lw=0.8, ls=":")
        axes[1, j].axvline(5, color="grey", lw=0.8, ls=":")
        axes[0, j].set_ylabel("Spearman with the reference")
        axes[1, j].set_ylabel("relative to the score range")
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel("orderings (sv_samples)")
        axes[1, j].set_xscale("log")
    axes[0, 0].legend()
    axes[1, 0].legend(fontsize=7)
    fig.suptitle("Shapley scores of the digits CNN's hidden layers vs the number of sampled orderings")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--reference", type=int, default=500, help="orderings of the reference (antithetic)")
    parser.add_argument("--samples", type=int, nargs="+", default=list(SAMPLES))
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--figure", type=Path, default=FIGURE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_train, y_train, x, y = digits()
    model = digits_cnn()
    train(model, x_train, y_train)
    data = loader(x[: args.examples], y[: args.examples])
    print(
        f"digits CNN, {args.examples} examples in batches of 128, reference {args.reference} orderings "
        f"(antithetic, seed {REFERENCE_SEED}), {args.seeds} seeds per row, CPU, {args.threads} thread(s), "
        f"torch {torch.__version__}"
    )
    rows: list[Row] = []
    for layer in args.layers:
        point = model[LAYERS[layer]]
        start = time.perf_counter()
        reference, reference_stderr, _ = score(model, data, point, args.reference, REFERENCE_SEED, True)
        spent = time.perf_counter() - start
        spread = float(np.ptp(reference))
        print(
            f"{layer}: {len(reference)} units, reference in {spent:.1f} s, its stderr/range: mean "
            f"{reference_stderr.mean() / spread:.4f}, max {reference_stderr.max() / spread:.4f}",
            flush=True,
        )
        start = time.perf_counter()
        part = convergence(model, data, point, layer, reference, tuple(args.samples), args.seeds)
        print(f"{layer}: study in {time.perf_counter() - start:.1f} s\n{table(part)}", flush=True)
        rows += part
        figure(rows, args.figure)  # after every layer, so that a stopped run leaves what it has
    print(f"\n{table(rows)}")
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
