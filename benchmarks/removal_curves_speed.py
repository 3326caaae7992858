"""The criteria study's removal curves, plain vs cheap, on the study's own trained models.

For each prunable layer of the model: one masked curve (every unit but one removed, in a fixed
random order) as the whole model with a mask hook over the DataLoader (plain) and as the suffix
after the layer's activation over batches collated once (cheap), and the study's two Pruner checks
per curve on a fresh copy (plain: a Pruner per copy, which traces it) and planned once on the
model and applied to the copy (cheap). Each peer is the best of ``--repeats`` rounds, the rounds
interleaving the peers; the script asserts the peers give the same numbers before printing.

    OMP_NUM_THREADS=1 python benchmarks/removal_curves_speed.py             # digits CNN of the study
    OMP_NUM_THREADS=1 python benchmarks/removal_curves_speed.py --arch vgg --widths 64,M,128,M,256,M
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from experiments import compare_criteria  # noqa: E402
from experiments.common import make_pruner, model_options_from, reproducible  # noqa: E402
from experiments.data import load_dataset  # noqa: E402
from experiments.models import load_or_train, prunable_layers  # noqa: E402


def _best(function, repeats, results):
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        results.append(function())
        times.append(time.perf_counter() - tick)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="cnn", choices=["cnn", "vgg"])
    parser.add_argument("--widths", default=None, help="as the study's --widths ('M' for a max pool in a vgg)")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--results", default="results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    with reproducible(args.threads):
        splits = load_dataset("digits")
        options = model_options_from(args, args.arch)
        model, _ = load_or_train(
            args.arch, splits, args.results, seed=0, epochs=args.epochs, model_options=options, progress=False
        )
        _, _, test_loader = splits.loaders(batch_size=64)
        pruner = make_pruner(model, splits.input_size, "cpu")
        rows = []
        for layer in prunable_layers(model):
            order = np.random.default_rng(0).permutation(layer.num_units)[: layer.num_units - 1]
            checks = compare_criteria._verify_points(len(order), 2)
            suffix = compare_criteria.suffix_after(model, layer.activation)
            plain, cheap = [], []

            def plain_curve():
                return compare_criteria.masked_curve(model, layer, order, test_loader, "cpu")

            def cheap_curve():
                batches = compare_criteria.cached_batches(test_loader, "cpu")
                return compare_criteria.masked_curve(model, layer, order, batches, "cpu", suffix=suffix)

            def plain_checks():
                return [
                    compare_criteria.prune_copy(model, layer.name, order[:k], test_loader, splits.input_size, "cpu")
                    for k in checks
                ]

            def cheap_checks():
                return [
                    compare_criteria.prune_copy(
                        model, layer.name, order[:k], test_loader, splits.input_size, "cpu", pruner=pruner
                    )
                    for k in checks
                ]

            times = {name: [] for name in ("plain_curve", "cheap_curve", "plain_checks", "cheap_checks")}
            peers = {
                "plain_curve": (plain_curve, plain),
                "cheap_curve": (cheap_curve, cheap),
                "plain_checks": (plain_checks, plain),
                "cheap_checks": (cheap_checks, cheap),
            }
            for _ in range(args.repeats):  # interleaved: a change of load hits every peer
                for name, (function, sink) in peers.items():
                    times[name].append(_best(function, 1, sink))
            if plain[0] != cheap[0] or plain[1] != cheap[1]:
                raise AssertionError(f"{layer.name}: the cheap removal gave other numbers than the plain one")
            best = {name: min(values) for name, values in times.items()}
            rows.append((layer.name, layer.num_units, best))
    print(
        f"removal curves on digits / {args.arch}, {args.threads} thread(s), best of {args.repeats} "
        "(shared machine: only the ratios within a row mean anything)\n"
    )
    print(
        "| layer | units | curve plain (s) | curve cheap (s) | speed-up | 2 checks plain (s) | 2 checks cheap (s) "
        "| speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, units, best in rows:
        print(
            f"| {name} | {units} | {best['plain_curve']:.3f} | {best['cheap_curve']:.3f} | "
            f"{best['plain_curve'] / best['cheap_curve']:.1f}× | {best['plain_checks']:.3f} | "
            f"{best['cheap_checks']:.3f} | {best['plain_checks'] / best['cheap_checks']:.1f}× |"
        )
    total = {name: sum(best[name] for _, _, best in rows) for name in rows[0][2]}
    print(
        f"| all | | {total['plain_curve']:.3f} | {total['cheap_curve']:.3f} | "
        f"{total['plain_curve'] / total['cheap_curve']:.1f}× | {total['plain_checks']:.3f} | "
        f"{total['cheap_checks']:.3f} | {total['plain_checks'] / total['cheap_checks']:.1f}× |"
    )


if __name__ == "__main__":
    main()
