"""Shapley scoring speed on a VGG-style net on digits: fast vs reference vs the 2020 algorithm vs captum.

Model: a VGG-style stack on scikit-learn's 8×8 digits at their own resolution (three 2×2
max-pools take 8×8 to 1×1, so no upsampling is needed): two conv 3×3 → BatchNorm → ReLU blocks of
width 64, max-pool, two of 128, max-pool, two of 256, max-pool, flatten, linear 256 → ReLU →
linear 10; trained 3 epochs (Adam, as ``attribution_speed.py``), then scored in eval mode (the
BatchNorms use their running statistics) on 128 examples in one batch, ``sv_samples=5``, each
layer after its ReLU. Peers, in the same process, as in ``attribution_speed.py`` (whose 2020
algorithm, captum peer and cost limit this script reuses):

* ``fast``: ``ShapleyAttributionMetric(..., algorithm="fast")`` (the default);
* ``reference``: ``algorithm="reference"`` (every coalition runs the whole model on the batch);
* ``2020``: one full pass over the data per coalition, ``sv_samples · (units + 1)`` passes;
* ``captum``: captum's ``ShapleyValueSampling`` on the suffix alone, ``n_samples=sv_samples``;
* ``limit``: the cost limit of the fast algorithm (the coalition evaluations at the cost of the
  incremental step alone).

The reference and 2020 peers cost ``units + 1`` whole-model passes per ordering. By default they
are **timed on the first ``--slow-samples`` orderings (default 1) and the time scaled to
``sv_samples``** (their cost is linear in the orderings; the columns say ``×5/1`` when scaled);
``--full`` times them on all ``sv_samples``; ``--skip-slow`` leaves them out. The fast and the
reference algorithm are checked to agree on the same orderings. Last, the time to Shapley-score
every layer: the fast rows summed, and ``run_all()`` (every prunable group of the model); and
the row "every layer: run per layer vs run_all": the same layers scored by ``run`` one after the
other and by one ``run_all(layers)`` (the batch drawn once, the model's prefix run once per batch
for all of them), back to back in this run, best of ``--repeats`` (``--every-layer-only``: this
row alone).

    python benchmarks/attribution_speed_vgg.py              # 2 threads
    python benchmarks/attribution_speed_vgg.py --full
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from attribution_speed import cost_limit, digits, loader, shapley_2020, shapley_captum, timed, train
from torch import nn

from torchpruner.attributions import ShapleyAttributionMetric
from torchpruner.attributions.suffix import DEFAULT_MAX_BATCH_ELEMENTS

CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, "M")


def digits_vgg() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    channels = 1
    for width in CONFIG:
        if width == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, int(width), 3, padding=1), nn.BatchNorm2d(int(width)), nn.ReLU()]
        channels = int(width)
    layers += [nn.Flatten(), nn.Linear(channels, 256), nn.ReLU(), nn.Linear(256, 10)]
    return nn.Sequential(*layers)


def scored_layers(model: nn.Sequential) -> dict[str, int]:
    """``{"conv1 64": index of its ReLU, ...}``: every conv and hidden linear layer, after its ReLU."""
    out: dict[str, int] = {}
    convs = linears = 0
    for i, module in enumerate(model):
        if isinstance(module, nn.ReLU):
            layer = next(model[j] for j in range(i - 1, -1, -1) if isinstance(model[j], (nn.Conv2d, nn.Linear)))
            if isinstance(layer, nn.Conv2d):
                convs += 1
                out[f"conv{convs} {layer.out_channels}"] = i
            else:
                linears += 1
                out[f"linear{linears} {layer.out_features}"] = i
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument(
        "--slow-samples",
        type=int,
        default=1,
        help="orderings the reference and 2020 peers are timed on (scaled to --samples)",
    )
    parser.add_argument("--full", action="store_true", help="time the reference and 2020 peers on all orderings")
    parser.add_argument("--skip-slow", action="store_true", help="leave out the reference and 2020 peers")
    parser.add_argument("--layers", nargs="+", default=None, help="a subset of the layer names")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the run-per-layer vs run_all row")
    parser.add_argument("--every-layer-only", action="store_true", help="only the run-per-layer vs run_all row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    slow = args.samples if args.full else min(args.slow_samples, args.samples)
    scale = args.samples / slow
    x_train, y_train, x, y = digits()
    model = digits_vgg()
    train(model, x_train, y_train)
    data = loader(x[: args.examples], y[: args.examples])
    with torch.no_grad():
        accuracy = float((model(x[: args.examples]).argmax(1) == y[: args.examples]).float().mean())
    layers = scored_layers(model)
    if args.layers:
        unknown = set(args.layers) - set(layers)
        if unknown:
            parser.error(f"unknown layers {sorted(unknown)}; choose from {list(layers)}")
        layers = {name: layers[name] for name in args.layers}
    mark = "" if scale == 1 or args.skip_slow else f" ×{args.samples}/{slow}"
    print(
        f"VGG-style net on 8×8 digits ({'-'.join(map(str, CONFIG))}, BatchNorm, linear 256; accuracy "
        f"{accuracy:.3f} on the scored examples), {args.examples} examples in batches of 128, "
        f"sv_samples={args.samples}, CPU, {args.threads} threads, torch {torch.__version__}; shared "
        "machine, timings are noisy, ratios are within this run"
        + (
            ""
            if scale == 1 or args.skip_slow
            else f"; reference and 2020 timed on {slow} of {args.samples} orderings and scaled ×{scale:g}"
        )
    )
    if args.every_layer_only:
        every_layer(model, data, layers, args.samples, args.repeats)
        return
    header = (
        f"| layer | units | fast (s) | limit (s) | % of limit | reference (s{mark}) | 2020 (s{mark}) "
        "| captum (s) | fast vs 2020 | reference vs 2020 | captum vs 2020 | fast vs captum | path |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|", flush=True)
    fast_total = old_total = 0.0
    for name, index in layers.items():
        point = model[index]
        metric = ShapleyAttributionMetric(model, data, F.cross_entropy, "cpu", sv_samples=args.samples, seed=0)
        fast_s, fast = timed(lambda: metric.run(point))
        path = metric.last_path
        fast_total += fast_s
        limit = cost_limit(model, index, data, args.samples, DEFAULT_MAX_BATCH_ELEMENTS)
        captum_s, _ = timed(lambda: shapley_captum(model, index, data, args.samples))
        if args.skip_slow:
            ref_s = old_s = float("nan")
        else:
            reference = ShapleyAttributionMetric(
                model, data, F.cross_entropy, "cpu", sv_samples=slow, seed=0, algorithm="reference"
            )
            ref_s, ref_scores = timed(lambda: reference.run(point))
            old_s, _ = timed(lambda: shapley_2020(model, point, data, slow))
            ref_s, old_s = ref_s * scale, old_s * scale
            old_total += old_s
            same = (
                fast
                if slow == args.samples
                else ShapleyAttributionMetric(model, data, F.cross_entropy, "cpu", sv_samples=slow, seed=0).run(point)
            )
            assert np.allclose(same, ref_scores, rtol=1e-3, atol=1e-4 * np.abs(ref_scores).max()), name
        print(
            f"| {name} | {len(fast)} | {fast_s:.2f} | {limit:.2f} | {100 * limit / fast_s:.0f}% | {ref_s:.2f} "
            f"| {old_s:.2f} | {captum_s:.2f} | {old_s / fast_s:.0f}× | {old_s / ref_s:.1f}× "
            f"| {old_s / captum_s:.1f}× | {captum_s / fast_s:.1f}× | {path} |",
            flush=True,
        )
    every = ShapleyAttributionMetric(model, data, F.cross_entropy, "cpu", sv_samples=args.samples, seed=0)
    all_s, groups = timed(lambda: every.run_all())
    print(
        f"\nShapley-scoring every layer ({len(layers)} layers): fast {fast_total:.2f} s (the rows above, "
        f"summed); run_all() over the model's {len(groups)} prunable groups {all_s:.2f} s"
        + (
            ""
            if args.skip_slow
            else f"; the 2020 algorithm {old_total:.1f} s{mark} ({old_total / fast_total:.0f}× the fast rows)"
        )
    )
    every_layer(model, data, layers, args.samples, args.repeats)


def every_layer(model: nn.Sequential, data, layers: dict[str, int], samples: int, repeats: int) -> None:
    """The row "every layer: run per layer vs run_all", both measured here, best of ``repeats``."""
    metric = ShapleyAttributionMetric(model, data, F.cross_entropy, "cpu", sv_samples=samples, seed=0)
    points = [model[index] for index in layers.values()]
    metric.run_all(points[:1])  # the trace (cached) is not timed
    per_layer_s = together_s = float("inf")
    for _ in range(repeats):
        seconds, per_layer = timed(lambda: [metric.run(point) for point in points])
        per_layer_s = min(per_layer_s, seconds)
        seconds, together = timed(lambda: metric.run_all(points))
        together_s = min(together_s, seconds)
    for scores, same in zip(per_layer, together.values()):
        assert np.allclose(same, scores, rtol=1e-5, atol=1e-6 * np.abs(scores).max())
    print(
        f"\nevery layer ({len(points)} layers, sv_samples={samples}, best of {repeats}): run per layer "
        f"{per_layer_s:.2f} s, run_all {together_s:.2f} s ({per_layer_s / together_s:.2f}×)",
        flush=True,
    )


if __name__ == "__main__":
    main()
