"""Shapley scoring speed on the digits CNN: fast vs reference vs the 2020 algorithm vs captum.

Model: conv 32 → ReLU → conv 64 → ReLU → max-pool → linear 128 → ReLU → linear 10 on
scikit-learn's 8×8 digits (trained for a few epochs first), 512 examples in batches of 128,
``sv_samples=5``, each layer scored after its ReLU. Peers, in the same process:

* ``fast``: ``ShapleyAttributionMetric(..., algorithm="fast")`` (the default);
* ``reference``: ``algorithm="reference"`` (every coalition runs the whole model on the batch);
* ``2020``: the 2020 library's algorithm, written here: one full pass over the data per coalition
  (a forward hook zeroes the units outside the coalition), ``sv_samples · (units + 1)`` passes;
* ``captum``: captum's ``ShapleyValueSampling`` on the suffix alone (the activations at the
  evaluation point are the input, one feature group per channel, baseline 0,
  ``perturbations_per_eval=16``), per batch.

``fast``, ``limit`` and ``captum`` are each the best of ``--repeats`` rounds (every round runs each
of them once, so a change of the machine's load hits them alike); ``reference`` and ``2020`` run
once.

``limit``: the cost limit of the fast algorithm: the same number of coalition evaluations
(``sv_samples · units`` per example) at the cost of the incremental step alone (the part of the
model after the first linear layer that follows the evaluation point, run on stacked batches of
the size the fast algorithm uses, the loss computed as the library computes it), without the
prefix pass or the contributions. ``limit`` runs
the model's layers on its own (contiguous) layout; ``limit CL`` the same in channels-last layout,
which is how the fast algorithm walks a 2-d convolution's output (the same for layers whose
first linear layer is a ``Linear``). ``prefix``: one pass of the layers up to the evaluation point
over the data (the activations any algorithm needs once); ``adds``: the walk's own share of each
incremental step (adding one unit's contribution to the state, ``samples · units`` times per batch,
as the walk does), which the issue counts in the step's cost and ``limit`` leaves out;
``% of step limit`` is ``(limit CL + adds + prefix) / fast``.

``peak MiB``: peak resident memory of one fast run above the process's resident memory just
before it, in a fresh process per layer after a tiny warm-up run (Linux: the peak is reset with ``/proc/self/clear_refs``
and read as ``VmHWM``; tracemalloc does not see torch's CPU allocations, and a fresh process keeps
memory freed by earlier runs, which the allocator would reuse unseen, out of the figure).

    python benchmarks/attribution_speed.py              # 2 threads
    python benchmarks/attribution_speed.py --threads 2 --skip-slow
    python benchmarks/attribution_speed.py --skip-slow --layers "conv 32" --contiguous-walk
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchpruner.attributions import ShapleyAttributionMetric, per_example_loss
from torchpruner.attributions import suffix
from torchpruner.attributions.methods.shapley import SIDE_BY_SIDE_ELEMENTS
from torchpruner.attributions.suffix import DEFAULT_MAX_BATCH_ELEMENTS


def digits(n: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    return x[n:], y[n:], x[:n], y[:n]


def digits_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 3) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            optimizer.step()
    model.eval()


def loader(x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def shapley_2020(model: nn.Module, point: nn.Module, data, samples: int, seed: int = 0) -> np.ndarray:
    """One full pass over the data per coalition; loss averaged over the data."""
    with torch.no_grad():
        units = model[: list(model).index(point) + 1](data[0][0][:1]).shape[1]
    keep = torch.ones(units)

    def hook(_module, _inputs, output):
        return output * keep.reshape(1, -1, *([1] * (output.dim() - 2)))

    def value() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for xb, yb in data:
                total -= float(F.cross_entropy(model(xb), yb, reduction="sum"))
                count += len(yb)
        return total / count

    handle = point.register_forward_hook(hook)
    scores = np.zeros(units)
    g = torch.Generator().manual_seed(seed)
    try:
        for _ in range(samples):
            keep.zero_()
            before = value()
            for unit in torch.randperm(units, generator=g).tolist():
                keep[unit] = 1
                after = value()
                scores[unit] += after - before
                before = after
    finally:
        handle.remove()
    return scores / samples


def shapley_captum(model: nn.Sequential, index: int, data, samples: int) -> np.ndarray:
    from captum.attr import ShapleyValueSampling

    head, tail = model[: index + 1], model[index + 1 :]
    total, count = None, 0
    for xb, yb in data:
        with torch.no_grad():
            z = head(xb)
        target = yb

        def forward(zz: torch.Tensor) -> torch.Tensor:
            repeats = zz.shape[0] // len(target)
            return -F.cross_entropy(tail(zz), target.repeat(repeats), reduction="none")

        mask = torch.arange(z.shape[1]).reshape(1, -1, *([1] * (z.dim() - 2))).expand_as(z[:1]).contiguous()
        attributions = ShapleyValueSampling(forward).attribute(
            z, baselines=0.0, feature_mask=mask, n_samples=samples, perturbations_per_eval=16
        )
        per_unit = attributions.reshape(z.shape[0], z.shape[1], -1)[:, :, 0].sum(0)
        total = per_unit if total is None else total + per_unit
        count += len(yb)
    return (total / count).numpy()


def _first_linear_after(model: nn.Sequential, index: int) -> int:
    """The index of the first linear layer after ``index``: the layer the walk goes through."""
    return next(i for i in range(index + 1, len(model)) if isinstance(model[i], (nn.Linear, nn.Conv2d)))


def cost_limit(model: nn.Sequential, index: int, data, samples: int, budget: int, channels_last: bool = False) -> float:
    """Seconds for ``samples · units`` coalition evaluations per example at the cost of the
    incremental step: the layers after the first linear layer following ``index`` (on stacked
    batches in channels-last layout with ``channels_last=True``, for 4-d activations)."""
    linear = _first_linear_after(model, index)
    head, rest = model[: linear + 1], model[linear + 1 :]
    seconds = 0.0
    for xb, yb in data:
        with torch.no_grad():
            y_lin = head(xb)
        units = model[: index + 1](xb[:1]).shape[1]
        per_example = max(int(np.prod(y_lin.shape[1:])), 1)
        per_call = max(1, budget // (len(xb) * per_example))
        rows = samples * units
        calls, last = divmod(rows, per_call)
        stacked = y_lin.repeat(per_call, *([1] * (y_lin.dim() - 1)))
        if channels_last and stacked.dim() == 4:
            stacked = stacked.contiguous(memory_format=torch.channels_last)
        target = yb.repeat(per_call)
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(calls):
                per_example_loss(F.cross_entropy, rest(stacked), target)
            if last:
                per_example_loss(F.cross_entropy, rest(stacked[: last * len(xb)]), target[: last * len(xb)])
            seconds += time.perf_counter() - start
    return seconds


def step_add_seconds(model: nn.Sequential, index: int, data, samples: int, budget: int) -> float:
    """Seconds for the walk's own part of the incremental step, the issue's "one unit's share of
    the op": adding a unit's contribution to the state of the first linear layer after ``index``,
    ``samples · units`` times per batch, as the walk adds them: from the state before into the next
    slot of a buffer of the coalitions of one call, reading the unit's row of a contributions tensor
    (states of at most ``SIDE_BY_SIDE_ELEMENTS`` elements: one add per step for every ordering)."""
    linear = _first_linear_after(model, index)
    head = model[: linear + 1]
    seconds = 0.0
    for xb, _ in data:
        with torch.no_grad():
            state = head(xb)
        units = model[: index + 1](xb[:1]).shape[1]
        if state.numel() <= SIDE_BY_SIDE_ELEMENTS:
            state = state.unsqueeze(0).repeat(samples, *([1] * state.dim()))
            adds = units
        else:
            adds = samples * units
        contributions = torch.randn(units, *state.shape)
        slots = torch.empty(max(1, min(adds, budget // state.numel())), *state.shape)
        order = torch.randint(units, (adds,)).tolist()
        start = time.perf_counter()
        previous = state
        for step, unit in enumerate(order):
            previous = torch.add(previous, contributions[unit], out=slots[step % len(slots)])
        seconds += time.perf_counter() - start
    return seconds


def prefix_seconds(model: nn.Sequential, index: int, data) -> float:
    """Seconds for one pass of the layers up to ``index`` (the evaluation point) over ``data``."""
    prefix = model[: index + 1]
    seconds = 0.0
    for xb, _ in data:
        with torch.no_grad():
            start = time.perf_counter()
            prefix(xb)
            seconds += time.perf_counter() - start
    return seconds


def _peak_worker(
    state: dict, index: int, x: torch.Tensor, y: torch.Tensor, samples: int, threads: int, channels_last: bool, queue
) -> None:
    torch.set_num_threads(threads)
    suffix.CHANNELS_LAST = channels_last
    model = digits_cnn()
    model.load_state_dict(state)
    model.eval()
    # a tiny run first: the library code and kernels it pages in are not working memory
    ShapleyAttributionMetric(model, loader(x[:2], y[:2]), F.cross_entropy, "cpu", sv_samples=1, seed=0).run(
        model[index]
    )
    metric = ShapleyAttributionMetric(model, loader(x, y), F.cross_entropy, "cpu", sv_samples=samples, seed=0)
    before = _reset_peak_kib()
    metric.run(model[index])
    queue.put((_peak_kib() - before) / 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _reset_peak_kib() -> int:
    """Reset the peak resident memory to the current one (Linux ``clear_refs``) and return the
    current one (KiB); without ``/proc``, the peak so far (``ru_maxrss``)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib() -> int:
    try:
        return _status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory_mib(
    model: nn.Sequential, index: int, x: torch.Tensor, y: torch.Tensor, samples: int, threads: int
) -> float:
    """Peak resident memory (MiB) of one fast Shapley run of layer ``index``, above what the
    process held before it, measured in a fresh (spawned) process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_peak_worker, args=(model.state_dict(), index, x, y, samples, threads, suffix.CHANNELS_LAST, queue)
    )
    process.start()
    peak = queue.get()
    process.join()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of fast, limit and captum (best is shown)")
    parser.add_argument("--skip-slow", action="store_true", help="leave out the reference and 2020 peers")
    parser.add_argument("--layers", nargs="*", default=None, help="only these rows (e.g. 'conv 32')")
    parser.add_argument(
        "--contiguous-walk",
        action="store_true",
        help="walk a 2-d convolution's output in the contiguous layout (for comparison)",
    )
    args = parser.parse_args()
    suffix.CHANNELS_LAST = not args.contiguous_walk
    torch.set_num_threads(args.threads)
    x_train, y_train, x, y = digits()
    model = digits_cnn()
    train(model, x_train, y_train)
    data = loader(x, y)
    layers = {"conv 32": 1, "conv 64": 3, "linear 128": 7}  # the ReLU after each layer
    if args.layers:
        layers = {name: layers[name] for name in args.layers}
    print(
        f"digits CNN, {len(x)} examples in batches of 128, sv_samples={args.samples}, CPU, "
        f"{args.threads} threads, torch {torch.__version__}, max_batch_elements={DEFAULT_MAX_BATCH_ELEMENTS}; "
        f"best of {args.repeats} rounds for fast, limit, captum; shared machine, timings are noisy, "
        "ratios are within this run"
    )
    header = (
        "| layer | units | fast (s) | limit (s) | limit CL (s) | % of limit | % of limit CL | prefix (s) "
        "| adds (s) | % of step limit | reference (s) "
        "| 2020 (s) | captum (s) | fast vs 2020 | reference vs 2020 | captum vs 2020 | fast vs captum "
        "| peak MiB | path |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, index in layers.items():
        point = model[index]
        best = dict.fromkeys(("fast", "limit", "limit CL", "prefix", "adds", "captum"), math.inf)
        for _ in range(args.repeats):
            metric = ShapleyAttributionMetric(model, data, F.cross_entropy, "cpu", sv_samples=args.samples, seed=0)
            fast_s, fast = timed(lambda: metric.run(point))
            best["fast"] = min(best["fast"], fast_s)
            for key, channels_last in (("limit", False), ("limit CL", True)):
                seconds = cost_limit(model, index, data, args.samples, DEFAULT_MAX_BATCH_ELEMENTS, channels_last)
                best[key] = min(best[key], seconds)
            best["prefix"] = min(best["prefix"], prefix_seconds(model, index, data))
            best["adds"] = min(
                best["adds"], step_add_seconds(model, index, data, args.samples, DEFAULT_MAX_BATCH_ELEMENTS)
            )
            captum_s, _ = timed(lambda: shapley_captum(model, index, data, args.samples))
            best["captum"] = min(best["captum"], captum_s)
        path = metric.last_path
        units = len(fast)
        if args.skip_slow:
            ref_s = old_s = float("nan")
        else:
            reference = ShapleyAttributionMetric(
                model, data, F.cross_entropy, "cpu", sv_samples=args.samples, seed=0, algorithm="reference"
            )
            ref_s, ref_scores = timed(lambda: reference.run(point))
            old_s, _ = timed(lambda: shapley_2020(model, point, data, args.samples))
            assert np.allclose(fast, ref_scores, rtol=1e-3, atol=1e-4 * np.abs(ref_scores).max()), name
        peak = peak_memory_mib(model, index, x, y, args.samples, args.threads)
        fast_s, captum_s = best["fast"], best["captum"]
        print(
            f"| {name} | {units} | {fast_s:.2f} | {best['limit']:.2f} | {best['limit CL']:.2f} "
            f"| {100 * best['limit'] / fast_s:.0f}% | {100 * best['limit CL'] / fast_s:.0f}% | {best['prefix']:.3f} "
            f"| {best['adds']:.3f} | {100 * (best['limit CL'] + best['adds'] + best['prefix']) / fast_s:.0f}% | {ref_s:.2f} "
            f"| {old_s:.2f} | {captum_s:.2f} | {old_s / fast_s:.1f}× | {old_s / ref_s:.1f}× "
            f"| {old_s / captum_s:.1f}× | {captum_s / fast_s:.1f}× | {peak:.0f} | {path} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
