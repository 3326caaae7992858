"""The metric base class and the one data loop shared by every attribution metric.

A metric says what it computes for one batch against the one
:class:`~torchpruner.attributions.runner.Runner`: a per-example, per-unit tensor of shape
``[N, units]`` (``score_batch``), or, for metrics that need no data, one score per unit
(``score_without_data``). A layer (``run(module)``) is a runner with one point, its evaluation
point; a coupled group (``run(group)``) a runner with the group's points
(:mod:`torchpruner.attributions.groups`). ``run_all(targets)`` scores many layers and groups;
metrics whose ``score_batch`` reads only activations and their gradients (``shares_pass``) serve
every target from one pass per batch (:class:`~torchpruner.attributions.runner.SharedPass`);
metrics that keep their state per runner (``shares_batches``: Shapley, leave-one-out) score
every target on each batch as it is drawn, in turn
(:class:`~torchpruner.attributions.runner.TakingTurns`), sharing what they can
(``start_batch``); the others run once per target. Everything else lives here: locating the evaluation
point in the traced graph, intercepting the points, the progress bar, reducing over examples,
and leaving the model exactly as it was found.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm import auto as tqdm_auto

from torchpruner._ops import BATCHNORM_MODULES
from torchpruner._state import to_device
from torchpruner.graph import CallSite, ModelGraph, get_graph, preserved_state
from torchpruner.graph.dependency import Group, get_dependency_graph
from torchpruner.graph.evaluation import evaluation_module

from .data import (
    INPUT_KEYS,
    TARGET_KEYS,
    Batch,
    BatchFn,
    default_batch_fn,
    first_tensor,
    make_batch,
    per_example_loss,
    scoring_iterator,
    sum_positions,
    unit_mask_shape,
    units_view,
    wide,
)
from .collectives import Shards, scoring_model
from .groups import check_group, group_label, group_runner, warn_if_coupled
from .reductions import MeanPlusStd, Moments
from .runner import MaskPoint, Runner, SharedPass, TakingTurns

logger = logging.getLogger(__name__)

Reduction = str | Callable[[np.ndarray], np.ndarray]
Target = nn.Module | CallSite | Group

__all__ = [  # data.py and runner.py names stay importable from here, as before the split
    "AttributionMetric",
    "Batch",
    "BatchFn",
    "BatchStatisticsWarning",
    "INPUT_KEYS",
    "MaskPoint",
    "Reduction",
    "Runner",
    "Scored",
    "TARGET_KEYS",
    "default_batch_fn",
    "first_tensor",
    "left_as_found",
    "make_batch",
    "per_example_loss",
    "reduce_scores",
    "sum_positions",
    "to_device",
    "unit_mask_shape",
    "units_view",
    "wide",
]


# --------------------------------------------------------------------------------------------
# Leaving the model as found
# --------------------------------------------------------------------------------------------
def _loader_generators(data_generator: Any) -> list[torch.Generator]:
    """The private ``torch.Generator`` objects a DataLoader (or its samplers) draws from."""
    found: list[torch.Generator] = []
    sampler = getattr(data_generator, "sampler", None)
    batch_sampler = getattr(data_generator, "batch_sampler", None)
    for owner in (data_generator, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None) if owner is not None else None
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


@contextlib.contextmanager
def left_as_found(model: nn.Module, data_generator: Any = None) -> Iterator[None]:
    """Eval mode (every module's own training flag restored on exit) and the global torch,
    CUDA, numpy and python RNG states restored on exit, as well as the private generators of
    ``data_generator`` (``DataLoader(..., generator=g)``, ``RandomSampler(..., generator=g)``).

    Iterating a shuffled DataLoader draws from the global torch generator (or from its own), and
    scoring inside a training loop must not change the training run. BatchNorm statistics cannot
    move in eval mode.
    """
    generators = [(g, g.get_state()) for g in _loader_generators(data_generator)]
    # inference_mode(False): gradient metrics must work even when called under inference_mode
    try:
        with preserved_state(model, eval_mode=True), torch.inference_mode(False):
            yield
    finally:
        for generator, state in generators:
            generator.set_state(state)


class BatchStatisticsWarning(UserWarning):
    """Scoring a model whose BatchNorm normalises with the statistics of the batch
    (``track_running_stats=False``): its scores depend on how the examples are batched.
    Silence it with ``warnings.filterwarnings("ignore", category=BatchStatisticsWarning)``."""


def batch_statistics_modules(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers of ``model`` that keep no running statistics, so that
    they normalise with the batch's own statistics even in eval mode."""
    return [
        name or type(model).__name__
        for name, module in model.named_modules()
        if isinstance(module, BATCHNORM_MODULES) and module.running_mean is None and module.running_var is None
    ]


def warn_if_batch_statistics(model: nn.Module, metric: str, stacklevel: int) -> None:
    """One :class:`BatchStatisticsWarning` naming every such BatchNorm layer (none: silent)."""
    names = batch_statistics_modules(model)
    if names:
        listed = ", ".join(f"'{name}'" for name in names)
        warnings.warn(
            f"{metric} scores depend on how the examples are batched: BatchNorm layer(s) {listed} keep "
            "no running statistics (track_running_stats=False), so even in eval mode they normalise "
            "each example with the statistics of its batch; score with the batch size and "
            "composition you train with, or give the layers running statistics",
            BatchStatisticsWarning,
            stacklevel=stacklevel + 1,
        )


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
def progress_enabled(progress: bool | None) -> bool:
    """``progress`` wins when given; otherwise a bar only on a terminal and unless
    ``TORCHPRUNER_PROGRESS=0``."""
    if progress is not None:
        return bool(progress)
    if os.environ.get("TORCHPRUNER_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Reduction over examples
# --------------------------------------------------------------------------------------------
def check_reduction(reduction: Reduction) -> None:
    if callable(reduction) or reduction in ("mean", "sum", "none"):
        return
    raise ValueError(f"reduction must be 'mean', 'sum', 'none' or a callable, got {reduction!r}")


def reduce_scores(per_example: np.ndarray, reduction: Reduction) -> np.ndarray:
    """Reduce an ``[examples, units]`` array to one score per unit (or keep it for ``"none"``)."""
    check_reduction(reduction)
    if reduction == "none":
        return per_example
    if reduction == "mean":
        mean: np.ndarray = per_example.mean(axis=0)
        return mean
    if reduction == "sum":
        total: np.ndarray = per_example.sum(axis=0)
        return total
    assert callable(reduction)  # check_reduction accepts no other string
    scores = np.asarray(reduction(per_example))
    if scores.shape != per_example.shape[1:]:
        raise ValueError(
            f"the reduction callable returned shape {scores.shape}; expected "
            f"{per_example.shape[1:]} (one score per unit)"
        )
    return scores


class _ScoreAccumulator:
    """Streams ``[N, C]`` batch scores; keeps every row only when the reduction needs them
    (``"mean"``/``"sum"`` keep a sum, :class:`MeanPlusStd` the moments)."""

    def __init__(self, reduction: Reduction) -> None:
        check_reduction(reduction)
        self.reduction = reduction
        self.rows: list[np.ndarray] = []
        self.total: np.ndarray | None = None
        self.moments: Moments | None = None
        self.count = 0

    def add(self, scores: torch.Tensor) -> None:
        array = scores.detach().to("cpu", torch.float64).numpy()
        self.count += array.shape[0]
        if self.reduction in ("mean", "sum"):
            batch_sum = array.sum(axis=0)
            self.total = batch_sum if self.total is None else self.total + batch_sum
        elif isinstance(self.reduction, MeanPlusStd):
            moments = Moments.of(array)
            self.moments = moments if self.moments is None else self.moments.merge(moments)
        else:
            self.rows.append(array)

    def partial(self) -> dict[str, Any]:
        """What a shard contributes to the union of the shards (no reduction callable: picklable)."""
        return {"count": self.count, "total": self.total, "moments": self.moments, "rows": self.rows}

    def merge(self, partial: dict[str, Any]) -> None:
        """Add another shard's :meth:`partial` (sums add, moments merge, rows are appended)."""
        self.count += partial["count"]
        if partial["total"] is not None:
            self.total = partial["total"] if self.total is None else self.total + partial["total"]
        if partial["moments"] is not None:
            self.moments = partial["moments"] if self.moments is None else self.moments.merge(partial["moments"])
        self.rows += partial["rows"]

    def result(self) -> np.ndarray:
        if self.reduction in ("mean", "sum"):
            if self.total is None:
                raise ValueError("no scores were accumulated")
            return self.total / self.count if self.reduction == "mean" else self.total
        if isinstance(self.reduction, MeanPlusStd):
            if self.moments is None:
                raise ValueError("no scores were accumulated")
            return self.reduction.from_moments(self.moments)
        return reduce_scores(np.concatenate(self.rows, axis=0), self.reduction)


# --------------------------------------------------------------------------------------------
# The metric base class
# --------------------------------------------------------------------------------------------
def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name or type(model).__name__
    return None


def _check_scored_module(model: nn.Module, module: Any) -> None:
    """``module`` is a submodule or a call site of ``model`` (not a group): TypeError/ValueError."""
    if isinstance(module, Group):
        raise TypeError(
            "a coupled group is scored at its read and entry points, not at one evaluation point; "
            "pass a module of the model (or a CallSite)"
        )
    if isinstance(module, CallSite):
        return
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module or a CallSite, got {type(module).__name__}")
    if _module_name(model, module) is None:
        raise ValueError(
            f"{type(module).__name__} module is not part of the model {type(model).__name__} "
            "(scoring needs a submodule of the model)"
        )


class Scored:
    """What a metric without a data pass scores (the argument of ``score_without_data``).

    Attributes:
        module: the layer of ``run(module)`` (None for a call site of a function or a group).
        group: the coupled group of ``run(group)``, else None.
    """

    def __init__(self, module: nn.Module | None, group: Group | None, count_units: Callable[[], int]) -> None:
        self.module = module
        self.group = group
        self._count_units = count_units
        self._num_units: int | None = None

    @property
    def num_units(self) -> int:
        """The number of units; for a layer this traces the model on the first batch."""
        if self._num_units is None:
            self._num_units = self._count_units()
        return self._num_units


class AttributionMetric:
    """Base class of every attribution metric: one score per unit, higher = keep.

    A metric sets ``name`` and ``default_options`` and implements ``score_batch`` (a pass over the
    data) or ``score_without_data``; ``prepare`` is called once per run before the first batch.

    Scores are per example and independent of the batch size because scoring runs in eval mode,
    where BatchNorm uses its running statistics. A BatchNorm with ``track_running_stats=False``
    has none and normalises with the statistics of each batch even in eval mode: then the scores
    of a metric with a data pass depend on the batch size and composition, and each ``run``
    warns with a :class:`BatchStatisticsWarning` naming those layers.

    Args:
        model: the model to score (left exactly as found: mode, hooks, ``.grad``, BatchNorm
            statistics and the global RNG state are restored).
        data_generator: an iterable of batches (a ``DataLoader``); see :func:`default_batch_fn`
            for the accepted batch layouts. The training loop's own DataLoader works, also in the
            middle of its epoch: a DataLoader with ``persistent_workers=True`` whose shared
            iterator exists is scored through a private iterator (new workers each run), so the
            loop's iteration is not reset. A separate scoring DataLoader (e.g. a fixed subset,
            ``num_workers=0``) is faster and is the recommended pattern.
        criterion: ``criterion(output, target, reduction="none")`` as in
            ``torch.nn.functional``, or a loss module instance (``nn.CrossEntropyLoss()``).
        device: where batches are moved (the model is not moved). ``None``: the device of the
            model's first parameter.
        reduction: how per-example scores become one score per unit: ``"mean"`` (default),
            ``"sum"``, ``"none"`` (an ``[examples, units]`` array) or a callable taking that
            array and returning one value per unit (e.g. ``lambda s: s.mean(0) + 2 * s.std(0)``).
            :class:`~torchpruner.attributions.reductions.MeanPlusStd` (``MeanPlusStd(2.0)``) is
            that mean + k·std as a reduction that keeps only the moments of the scores.
        max_batches: stop after this many batches (``None``: the whole generator).
        batch_fn: ``batch_fn(batch) -> (inputs, target)``; ``inputs`` a tensor, a tuple of
            positional inputs or a dict of keyword inputs.
        progress: show a tqdm bar over batches. ``None``: only on a terminal and unless the
            environment variable ``TORCHPRUNER_PROGRESS=0``.
        process_group: score across the ranks of a ``torch.distributed`` job: each rank scores
            its own batches (its shard of the data) and every rank gets the scores of the union
            of the shards (rows of ``"none"`` in rank order); ``seed`` is rank 0's on every rank.
            Every rank must call ``run`` with the same arguments. A ``DistributedDataParallel``
            model needs no ``process_group=`` (its own is used): its ``module`` is scored, the
            wrapper is never called. See :mod:`torchpruner.attributions.collectives`.
        **method_options: options of the metric (``signed=`` for Taylor, ``sv_samples=`` and
            ``seed=`` for Shapley); ``run(..., **kwargs)`` overrides them per call.
    """

    #: Short name used in progress bars and messages.
    name: ClassVar[str] = "Attribution"
    #: Options this metric understands, with their defaults.
    default_options: ClassVar[dict[str, Any]] = {}
    #: ``score_batch`` uses only ``runner.activations`` / ``runner.activations_and_gradients``,
    #: so ``run_all`` can serve every target from one pass per batch. Holds for the class that
    #: defines ``score_batch`` only: a subclass that overrides ``score_batch`` must set it again.
    shares_pass: ClassVar[bool] = False
    #: ``prepare`` and ``score_batch`` keep what they learn per runner (not one run's state on the
    #: metric), and the model is run only through the runner: ``run_all`` then draws each batch
    #: once and scores every target on it in turn, after ``start_batch`` (where the metric may
    #: compute what the targets share, such as fast Shapley's prefix). Like ``shares_pass``, it
    #: holds for the class that defines ``score_batch`` only.
    shares_batches: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        data_generator: Iterable[Any],
        criterion: Callable[..., Any],
        device: torch.device | str | None = None,
        reduction: Reduction = "mean",
        max_batches: int | None = None,
        batch_fn: BatchFn | None = None,
        progress: bool | None = None,
        *,
        process_group: Any = None,
        **method_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_reduction(reduction)
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
        self.model = model
        self.data_generator = data_generator
        self.criterion = criterion
        self.device = torch.device(device) if device is not None else None
        self.reduction = reduction
        self.max_batches = max_batches
        self.batch_fn = batch_fn
        self.progress = progress
        self.process_group = process_group
        self.method_options = self._check_options(method_options)
        self._shards: Shards | None = None

    # ---------------------------------------------------------------- options
    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            valid = ", ".join(sorted(self.default_options)) or "none"
            raise TypeError(f"{type(self).__name__} got unknown option(s) {unknown}; valid options: {valid}")
        return dict(options)

    def options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Defaults, then constructor options, then ``run`` keyword arguments."""
        return {**self.default_options, **self.method_options, **self._check_options(overrides)}

    # ---------------------------------------------------------------- public API
    def run(
        self,
        module: nn.Module | CallSite | Group,
        find_best_evaluation_module: bool = False,
        *,
        call_index: int = 0,
        **kwargs: Any,
    ) -> np.ndarray:
        """Score the units of ``module``.

        Args:
            module: a module of the model (its output is the evaluation point), a
                ``CallSite`` of the model's traced graph, or a coupled group from
                ``pruner.groups()``: one score per group unit, for removing the unit from every
                layer of the group at once (see :mod:`torchpruner.attributions.groups`).
                A module whose units are shared with other layers (a residual stream) is scored
                locally, with a :class:`~torchpruner.attributions.groups.CoupledGroupWarning`.
            find_best_evaluation_module: evaluate after the BatchNorm / activation / Dropout
                that follow ``module`` in the data flow (stops at a merge such as add or cat).
                Ignored for a group: it is always scored where zeroing equals pruning.
            call_index: which call of a module that runs several times per forward (not for groups).
            **kwargs: metric options overriding the constructor's (``signed``, ``sv_samples``,
                ``seed``, ...).

        Returns:
            ``np.ndarray`` of shape ``[units]`` (``[examples, units]`` for ``reduction="none"``).
        """
        options = self.options(kwargs)
        model, shards = scoring_model(self.model, self.process_group)
        if shards is not None:  # first: the seed, before anything rank-specific has run
            options = shards.shared_options(options)
        with self._across(shards):
            if isinstance(module, Group):
                return self._run_group(model, module, options)
            site_module = getattr(module, "module", None) if isinstance(module, CallSite) else module
            if not isinstance(module, CallSite):
                if not isinstance(module, nn.Module):
                    raise TypeError(f"module must be an nn.Module or a CallSite, got {type(module).__name__}")
                if _module_name(model, module) is None:
                    raise ValueError(
                        f"{type(module).__name__} module is not part of the model "
                        f"{type(model).__name__} (scoring needs a submodule of the model)"
                    )

            with left_as_found(model, self.data_generator):
                if self._without_data():
                    # the trace only when the metric asks for the unit count (Random, not WeightNorm)
                    def count_units() -> int:
                        with contextlib.closing(self._batches(model)) as batches:
                            first = self._first_batch(batches)
                        site, _ = self._evaluation_point(
                            model, module, first, find_best_evaluation_module, call_index, stacklevel=7
                        )
                        return MaskPoint.of_site(site).size

                    return self._finish(self.score_without_data(Scored(site_module, None, count_units), options))
                warn_if_batch_statistics(model, self.name, stacklevel=2)
                with contextlib.closing(self._batches(model)) as batches:
                    first = self._first_batch(batches)
                    site, graph = self._evaluation_point(model, module, first, find_best_evaluation_module, call_index)
                    point = MaskPoint.of_site(site)
                    runner = Runner([point], [point], point.size, self.criterion, site.label)
                    return self._score(graph, runner, itertools.chain([first], batches), options)

    def run_all(
        self,
        targets: Iterable[Target] | None = None,
        find_best_evaluation_module: bool = False,
        **kwargs: Any,
    ) -> dict[str, np.ndarray]:
        """Score several layers and groups: ``{key: scores}``, each as ``run(target)`` returns it.

        Metrics that read only activations and their gradients (Taylor, Sensitivity, APoZ) score
        every target in **one pass over the data**: one forward (and one backward) per batch with
        the points of all targets intercepted at once, so the cost is about that of one training
        step per batch, whatever the number of targets. The masked-evaluation metrics (Shapley,
        leave-one-out) also draw each batch once and score every target on it in turn; their fast
        algorithm computes the part of the model before the targets once per batch for all of
        them (one forward of the model's prefix per batch, not one per target). Every other
        metric (captum methods that cannot attribute several layers at once, and the data-free
        ones) calls ``run`` once per target, in order; the result is the same either way.

        Args:
            targets: modules of the model (keyed by their name), call sites (keyed by their
                label) and coupled groups from ``pruner.groups()`` (keyed by their label, e.g.
                ``"group 2 (conv2)"``). ``None``: every prunable coupled group of the model (the
                groups ``pruner.groups()`` lists, in data-flow order; needs a model torch.fx can
                trace).
            find_best_evaluation_module: as in ``run``, for the modules among ``targets``.
            **kwargs: metric options, as in ``run``.

        In a distributed run (``process_group=`` or a DDP model), every rank must call
        ``run_all`` with the same targets: a shared pass (or a shared batch stream) exchanges all
        targets' partial results in one collective; the per-target fallback exchanges once per
        target, in the order of ``targets``. A ``seed`` is rank 0's for each target, as ``run``
        settles it (without a seed, rank 0 draws one per target).

        Returns:
            ``dict`` from key to the ``np.ndarray`` ``run(target)`` returns, in the order of
            ``targets``.
        """
        options = self.options(kwargs)
        given = None if targets is None else self._check_targets(targets)
        if given is not None and not given:
            return {}
        shares_pass = self._shares_pass(options)
        batchwise = not shares_pass and self._declares("shares_batches")
        if not (shares_pass or batchwise) or self._without_data():  # one run per target, in order
            if given is None:
                _, shards = scoring_model(self.model, self.process_group)
                with self._across(shards):
                    given = list(self._default_targets())
                    if shards is not None:  # every rank found its targets, or every rank raises
                        shards.exchange(None)
            keys = self._target_keys(given)
            return {key: self.run(target, find_best_evaluation_module, **kwargs) for key, target in zip(keys, given)}
        model, shards = scoring_model(self.model, self.process_group)
        asked = options
        if shards is not None:  # first: the seed, before anything rank-specific has run
            options = shards.shared_options(options)
        with self._across(shards), left_as_found(model, self.data_generator):
            warn_if_batch_statistics(model, self.name, stacklevel=2)
            with contextlib.closing(self._batches(model)) as batches:
                first = self._first_batch(batches)
                graph = get_graph(model, first.args, first.kwargs or None)
                chosen: list[Target] = given if given is not None else list(self._groups_of(graph))
                runners = self._shared_runners(model, graph, chosen, first, find_best_evaluation_module)
                if batchwise:
                    options_of = self._options_of_targets(list(runners), asked, options, shards)
                    return self._score_batchwise(model, graph, runners, itertools.chain([first], batches), options_of)
                return self._score_shared(graph, runners, itertools.chain([first], batches), options)

    def find_evaluation_module(
        self,
        module: nn.Module | CallSite,
        find_best_evaluation_module: bool = False,
        *,
        call_index: int = 0,
    ) -> nn.Module | CallSite:
        """Where ``run(module, find_best_evaluation_module)`` computes the scores (the 2020 API).

        A metric with a data pass traces the model on the first batch of the data generator and
        returns the module whose output is the evaluation point; when that point is not the first
        call of a module (a functional ``F.relu``, the second call of a reused ``nn.ReLU``) it
        returns the :class:`~torchpruner.graph.CallSite` instead. Either, passed to ``run``, is
        scored at exactly that point. Metrics without a data pass (weight norm, random) score the
        layer itself, so they return ``module`` unchanged, as in 2020. The model is left as found.

        Raises:
            TypeError: ``module`` is not a module or call site (a coupled group is scored at its
                read and entry points, see :mod:`torchpruner.attributions.groups`).
            ValueError: ``module`` is not in the model, never called, a container, or its
                evaluation point has no units; the first batch does not fit the model.
        """
        model, _ = scoring_model(self.model)
        _check_scored_module(model, module)
        if self._without_data():
            return module
        with left_as_found(model, self.data_generator):
            with contextlib.closing(self._batches(model)) as batches:
                first = self._first_batch(batches)
            site, _ = self._evaluation_point(model, module, first, find_best_evaluation_module, call_index)
        return evaluation_module(site)

    # ---------------------------------------------------------------- for subclasses
    def score_batch(self, runner: Runner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        """Per-example, per-unit scores ``[N, units]`` for one batch (metrics with a data pass);
        ``runner`` has one point for a layer and the group's points for a group."""
        raise NotImplementedError

    def score_without_data(self, scored: Scored, options: dict[str, Any]) -> torch.Tensor:
        """One score per unit ``[units]``. A metric that implements this makes no pass over the
        data (and asks for a trace only through ``scored.num_units``)."""
        raise NotImplementedError

    def prepare(self, runner: Runner, options: dict[str, Any]) -> None:
        """Called once per run before the first batch (draw permutations, warn, set
        ``runner.description``)."""

    def score_shared_batch(self, shared: SharedPass, batch: Batch, options: dict[str, Any]) -> list[torch.Tensor]:
        """``run_all`` of a metric that shares its pass: every runner's ``[N, units]`` scores of
        ``batch``, in the order of ``shared.runners`` (each runner's ``score_batch``, served by
        the shared pass; a metric that can score them all at once overrides this)."""
        return [self.score_batch(runner, batch, options) for runner in shared.runners]

    def start_batch(self, runners: list[tuple[Runner, dict[str, Any]]], batch: Batch) -> None:
        """``run_all`` of a ``shares_batches`` metric: called with every ``(runner, options)``
        before the targets are scored on ``batch`` in turn (compute what they share here)."""

    def end_batch(self) -> None:
        """Called after every target was scored on a batch (also on error): release what
        ``start_batch`` kept, so that no batch's tensors outlive it."""

    # ---------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _across(self, shards: Shards | None) -> Iterator[None]:
        """Score across ``shards`` inside the block (see
        :mod:`~torchpruner.attributions.collectives`); a plain block without."""
        if shards is None:
            yield
            return
        self._shards = shards
        try:
            with shards.failures_shared(f"{self.name} scoring"):
                yield
        finally:
            self._shards = None

    @staticmethod
    def _options_of_targets(
        keys: list[str], given: dict[str, Any], options: dict[str, Any], shards: Shards | None
    ) -> dict[str, dict[str, Any]]:
        """Each target's options in ``run_all``: as given (a seed given serves every target, as in
        ``run``; None draws a fresh seed per target). In a distributed run without a seed, rank 0
        drew one for the run (``options``): each target's own seed is drawn from it, so that the
        targets get seeds of their own and every rank the same ones."""
        if shards is None or given.get("seed", 0) is not None:
            return {key: options for key in keys}
        spawn = torch.Generator().manual_seed(int(options["seed"]))
        return {key: {**options, "seed": int(torch.randint(2**62, (), generator=spawn))} for key in keys}

    def _shares_pass(self, options: dict[str, Any]) -> bool:
        """``run_all`` serves every target from one pass per batch (:meth:`_score_shared`)."""
        return self._declares("shares_pass")

    def _declares(self, flag: str) -> bool:
        """``flag`` as set by the class that defines ``score_batch`` (a subclass that overrides
        ``score_batch`` must set it again)."""
        for cls in type(self).__mro__:
            if "score_batch" in cls.__dict__:
                return bool(cls.__dict__.get(flag, False))
        return False

    def _check_targets(self, targets: Iterable[Target]) -> list[Target]:
        if isinstance(targets, (nn.Module, CallSite, Group)):
            raise TypeError("targets must be a list of modules, call sites or groups (run(target) scores one)")
        try:
            given = list(targets)
        except TypeError:
            raise TypeError(
                f"targets must be a list of modules, call sites or groups, got {type(targets).__name__}"
            ) from None
        for target in given:
            if not isinstance(target, (nn.Module, CallSite, Group)):
                raise TypeError(f"targets must hold modules, call sites or groups, got a {type(target).__name__}")
        return given

    def _target_keys(self, targets: list[Target]) -> list[str]:
        """The key of each target in ``run_all``'s result (ValueError when two keys agree)."""
        model, _ = scoring_model(self.model)
        keys = []
        for target in targets:
            if isinstance(target, Group):
                keys.append(group_label(target))
            elif isinstance(target, CallSite):
                keys.append(target.label)
            else:
                _check_scored_module(model, target)
                keys.append(_module_name(model, target) or type(target).__name__)
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"targets lists {repeated} more than once; each target is scored once")
        return keys

    def _groups_of(self, graph: ModelGraph) -> list[Group]:
        """Every prunable coupled group of the traced model (as ``pruner.groups()``)."""
        try:
            groups = get_dependency_graph(graph).groups()
        except Exception as error:
            raise ValueError(
                f"run_all() without targets scores the coupled groups of the model, which could not be "
                f"computed for {type(graph.model).__name__} ({error}); pass targets= (a list of its layers)"
            ) from error
        if not groups:
            raise ValueError(
                f"the model {type(graph.model).__name__} has no prunable coupled group; "
                "pass targets= (a list of its layers)"
            )
        return groups

    def _default_targets(self) -> list[Group]:
        """The prunable groups, from a trace on the first batch (the model is left as found)."""
        model, _ = scoring_model(self.model)
        with left_as_found(model, self.data_generator), contextlib.closing(self._batches(model)) as batches:
            first = self._first_batch(batches)
            return self._groups_of(get_graph(model, first.args, first.kwargs or None))

    def _shared_runners(
        self, model: nn.Module, graph: ModelGraph, targets: list[Target], first: Batch, find_best: bool
    ) -> dict[str, Runner]:
        """``{key: runner}`` of ``run_all``'s targets, each runner as ``run`` builds it."""
        runners: dict[str, Runner] = {}
        for key, target in zip(self._target_keys(targets), targets):
            if isinstance(target, Group):
                check_group(model, target)
                runners[key] = group_runner(graph, target, self.criterion)
            else:
                site, _ = self._evaluation_point(model, target, first, find_best, 0, stacklevel=5, graph=graph)
                point = MaskPoint.of_site(site)
                runners[key] = Runner([point], [point], point.size, self.criterion, site.label)
        return runners

    def _without_data(self) -> bool:
        return type(self).score_without_data is not AttributionMetric.score_without_data

    def _device(self, model: nn.Module) -> torch.device | None:
        if self.device is not None:
            return self.device
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        return first.device if first is not None else None

    def _batches(self, model: nn.Module) -> Generator[Batch, None, None]:
        """The data generator's batches (at most ``max_batches``) as :class:`Batch` on the device.

        A generator: close it (``contextlib.closing``) so that a private DataLoader iterator
        (see :func:`~torchpruner.attributions.data.scoring_iterator`) stops its workers."""
        device = self._device(model)
        with scoring_iterator(self.data_generator) as iterator:
            if self.max_batches is not None:
                iterator = itertools.islice(iterator, self.max_batches)
            for raw in iterator:
                yield make_batch(raw, self.batch_fn, device)

    def _first_batch(self, batches: Iterator[Batch]) -> Batch:
        first = next(batches, None)
        if first is None:
            raise ValueError(
                f"the data generator yielded no batches; {type(self).__name__} needs at least "
                "one batch (to trace the model)"
            )
        return first

    def _total_batches(self) -> int | None:
        try:
            total = len(self.data_generator)  # type: ignore[arg-type]
        except TypeError:
            total = None
        if self.max_batches is not None:
            total = self.max_batches if total is None else min(total, self.max_batches)
        return total

    def _evaluation_point(
        self,
        model: nn.Module,
        module: nn.Module | CallSite,
        batch: Batch,
        find_best: bool,
        call_index: int,
        stacklevel: int = 4,
        graph: ModelGraph | None = None,
    ) -> tuple[CallSite, ModelGraph]:
        if graph is None:
            graph = get_graph(model, batch.args, batch.kwargs or None)
        if isinstance(module, CallSite):
            site = module
            if site not in graph.sites:
                raise ValueError(f"call site {getattr(site, 'name', site)} is not in the traced graph of the model")
        else:
            try:
                site = graph.evaluation_point(module, find_best=find_best, call_index=call_index)
            except ValueError as error:
                if any(True for _ in module.children()):
                    raise ValueError(
                        f"module '{graph.module_name(module)}' ({type(module).__name__}) is a "
                        "container: it has no units of its own; score one of its layers"
                    ) from error
                raise
        if site.unit_axis is None or not site.num_units:
            label = graph.module_name(module) if isinstance(module, nn.Module) else site.name
            raise ValueError(
                f"the evaluation point {site.name} of {label} has no units (output shape "
                f"{tuple(site.shape) if site.shape is not None else None}); score a layer whose "
                "output is a tensor with a unit axis (Linear, Conv, BatchNorm, activation)"
            )
        logger.debug(
            "%s: evaluation point %s (unit axis %d, %d units)", self.name, site.name, site.unit_axis, site.num_units
        )
        if isinstance(module, nn.Module):
            warn_if_coupled(graph, module, call_index, stacklevel=stacklevel)
        return site, graph

    def _run_group(self, model: nn.Module, group: Group, options: dict[str, Any]) -> np.ndarray:
        """``run(group)``: one score per group unit (see :mod:`torchpruner.attributions.groups`)."""
        check_group(model, group)
        with left_as_found(model, self.data_generator):
            if self._without_data():
                return self._finish(self.score_without_data(Scored(None, group, lambda: group.num_units), options))
            warn_if_batch_statistics(model, self.name, stacklevel=3)
            with contextlib.closing(self._batches(model)) as batches:
                first = next(batches, None)
                if first is None:
                    raise ValueError(f"the data generator yielded no batches; {type(self).__name__} needs data")
                graph = get_graph(model, first.args, first.kwargs or None)
                runner = group_runner(graph, group, self.criterion)
                logger.debug(
                    "%s: %s read at %s, entering at %s",
                    self.name,
                    runner.label,
                    [p.site.name for p in runner.read_points],
                    [p.site.name for p in runner.entry_points],
                )
                return self._score(graph, runner, itertools.chain([first], batches), options)

    def _score(
        self, graph: ModelGraph, runner: Runner, batches: Iterable[Batch], options: dict[str, Any]
    ) -> np.ndarray:
        """The one data loop: intercept the runner's points for the whole run, score every batch
        (``[N, units]``), reduce over examples."""
        runner.description = f"{self.name} {runner.label}"
        runner.graph = graph
        self.prepare(runner, options)
        accumulator = _ScoreAccumulator(self.reduction)
        bar = tqdm_auto.tqdm(  # looked up per run, so a patched tqdm.auto.tqdm is used
            total=self._total_batches(),
            desc=runner.description,
            unit="batch",
            disable=not progress_enabled(self.progress),
            leave=False,
        )
        if not bar.disable:
            runner._set_progress = bar.set_description_str
        try:
            with graph.intercept(runner.functions()) as forward:
                runner.forward = forward
                for batch in batches:
                    scores = self.score_batch(runner, batch, options)
                    if scores.shape != (batch.size, runner.num_units):
                        raise RuntimeError(
                            f"{type(self).__name__} scored a batch with shape {tuple(scores.shape)}, "
                            f"expected {(batch.size, runner.num_units)}"
                        )
                    accumulator.add(scores)
                    bar.update(1)
        finally:
            bar.close()
        if accumulator.count == 0:
            raise ValueError(f"the data generator yielded no examples; {type(self).__name__} needs data")
        if self._shards is not None:  # the union of every rank's shard, merged in rank order
            partials = self._shards.exchange(accumulator.partial())
            accumulator = _ScoreAccumulator(self.reduction)
            for partial in partials:
                accumulator.merge(partial)
        return accumulator.result()

    def _score_shared(
        self, graph: ModelGraph, runners: dict[str, Runner], batches: Iterable[Batch], options: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """The data loop of ``run_all``: one :class:`SharedPass` per batch serves every runner."""
        self._prepare_runners(graph, runners, dict.fromkeys(runners, options))
        shared = SharedPass(list(runners.values()), self.criterion)
        accumulators = {key: _ScoreAccumulator(self.reduction) for key in runners}
        bar = self._targets_bar(len(runners))
        try:
            with graph.intercept(shared.functions()) as forward:
                shared.forward = forward
                for batch in batches:
                    for (key, runner), scores in zip(runners.items(), self.score_shared_batch(shared, batch, options)):
                        if scores.shape != (batch.size, runner.num_units):
                            raise RuntimeError(
                                f"{type(self).__name__} scored a batch of {runner.label} with shape "
                                f"{tuple(scores.shape)}, expected {(batch.size, runner.num_units)}"
                            )
                        accumulators[key].add(scores)
                    bar.update(1)
        finally:
            bar.close()
            for runner in runners.values():
                runner.shared = None
        return self._results(accumulators)

    def _prepare_runners(
        self, graph: ModelGraph, runners: dict[str, Runner], options_of: dict[str, dict[str, Any]]
    ) -> None:
        """Each of ``run_all``'s runners labelled, on ``graph`` and prepared with its options."""
        for key, runner in runners.items():
            runner.description = f"{self.name} {runner.label}"
            runner.graph = graph
            self.prepare(runner, options_of[key])

    def _targets_bar(self, count: int) -> Any:
        """The progress bar of a ``run_all`` pass over the batches for ``count`` targets."""
        return tqdm_auto.tqdm(
            total=self._total_batches(),
            desc=f"{self.name} {count} targets",
            unit="batch",
            disable=not progress_enabled(self.progress),
            leave=False,
        )

    def _results(self, accumulators: dict[str, _ScoreAccumulator]) -> dict[str, np.ndarray]:
        """Every target's scores, over the union of the shards in a distributed run (one exchange
        for every target, merged in rank order)."""
        if any(accumulator.count == 0 for accumulator in accumulators.values()):
            raise ValueError(f"the data generator yielded no examples; {type(self).__name__} needs data")
        if self._shards is not None:
            keys = list(accumulators)
            partials = self._shards.exchange([accumulators[key].partial() for key in keys])
            accumulators = {key: _ScoreAccumulator(self.reduction) for key in keys}
            for rank_partials in partials:
                for key, partial in zip(keys, rank_partials):
                    accumulators[key].merge(partial)
        return {key: accumulator.result() for key, accumulator in accumulators.items()}

    def _score_batchwise(
        self,
        model: nn.Module,
        graph: ModelGraph,
        runners: dict[str, Runner],
        batches: Iterable[Batch],
        options_of: dict[str, dict[str, Any]],
    ) -> dict[str, np.ndarray]:
        """The data loop of ``run_all`` for a ``shares_batches`` metric: each batch drawn once,
        ``start_batch``, then every runner scored on it in turn (:class:`TakingTurns`), with the
        options ``options_of[key]`` (``model``: for metrics that make more passes, see Shapley)."""
        self._prepare_runners(graph, runners, options_of)
        turns = TakingTurns(graph, list(runners.values()))
        pairs = [(runner, options_of[key]) for key, runner in runners.items()]
        accumulators = {key: _ScoreAccumulator(self.reduction) for key in runners}
        bar = self._targets_bar(len(runners))
        try:
            with turns.whole_run():
                for batch in batches:
                    try:
                        self.start_batch(pairs, batch)
                        for key, runner in runners.items():
                            with turns.turn(runner):
                                scores = self.score_batch(runner, batch, options_of[key])
                            if scores.shape != (batch.size, runner.num_units):
                                raise RuntimeError(
                                    f"{type(self).__name__} scored a batch of {runner.label} with shape "
                                    f"{tuple(scores.shape)}, expected {(batch.size, runner.num_units)}"
                                )
                            accumulators[key].add(scores)
                    finally:
                        self.end_batch()
                    bar.update(1)
        finally:
            bar.close()
        return self._results(accumulators)

    def _finish(self, scores: torch.Tensor) -> np.ndarray:
        """Data-free metrics: treat the scores as a single example so ``reduction`` applies (in a
        distributed run, every rank returns rank 0's)."""
        array = scores.detach().to("cpu", torch.float64).numpy().reshape(1, -1)
        result = reduce_scores(array, self.reduction)
        return result if self._shards is None else self._shards.exchange(result)[0]
