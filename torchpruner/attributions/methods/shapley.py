"""Shapley values of units by permutation sampling (Ancona et al., 2020), with their uncertainty.

Two algorithms compute the same estimator on the same orderings (both draw them from ``seed``):

``"reference"``
    Every coalition runs the whole model (``sv_samples · (units + 1)`` forward passes per batch).
``"fast"`` (default)
    The part of the model before the evaluation point runs once per batch; per coalition only
    the nodes of the traced graph after it run, many coalitions stacked along the batch dimension
    within ``max_batch_elements`` (:class:`~torchpruner.attributions.suffix.Suffix`). When the
    units reach the output only through one linear layer (after per-channel ops such as ReLU,
    pooling or flatten), a permutation is walked incrementally: switching unit c on adds its
    contribution ``W·z_c`` to that layer's output, so a step costs only the ops after that layer
    (:class:`~torchpruner.attributions.suffix.Incremental`). Models that torch.fx cannot trace use
    the reference algorithm. On the first batch the fast algorithm checks the losses of the empty
    and the full coalition against whole-model evaluation and falls back (with a warning) when
    they differ.

``run_all(targets)`` draws each batch once and scores every target on it in turn, each with the
orderings ``run(target)`` draws; the fast algorithm computes, once per batch, every node of the
traced graph that any target's prefix needs, and each target evaluates its coalitions from there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, Literal, overload

import numpy as np
import torch
from torch import fx, nn

from torchpruner.graph import CallSite, ModelGraph
from torchpruner.graph.dependency import Group

from ..base import AttributionMetric, Reduction, Target, batch_statistics_modules
from ..collectives import scoring_model
from ..data import Batch
from ..runner import Runner
from ..suffix import DEFAULT_MAX_BATCH_ELEMENTS, Incremental, Suffix, SuffixUnavailable, repeat_rows, state_buffer

logger = logging.getLogger(__name__)

ALGORITHMS = ("fast", "reference")


class Orderings:
    """The orderings a Shapley run draws, from one private generator seeded with ``seed``
    (``None``: a fresh seed from the OS). ``antithetic=True`` follows each ordering with its
    reverse. Successive :meth:`draw` calls continue the same stream, so an adaptive run's first
    round is the plain run with the same seed."""

    def __init__(self, seed: int | None = None, antithetic: bool = False) -> None:
        self.generator = torch.Generator().manual_seed(int(secrets.randbits(63) if seed is None else seed))
        self.antithetic = antithetic

    def draw(self, num_units: int, count: int) -> list[torch.Tensor]:
        if not self.antithetic:
            return [torch.randperm(num_units, generator=self.generator) for _ in range(count)]
        out: list[torch.Tensor] = []
        for _ in range(math.ceil(count / 2)):
            order = torch.randperm(num_units, generator=self.generator)
            out += [order, order.flip(0)]
        return out


def draw_permutations(num_units: int, samples: int, seed: int | None = None) -> list[torch.Tensor]:
    """The orderings a Shapley run uses: ``samples`` permutations of ``range(num_units)`` from a
    private generator seeded with ``seed`` (``None``: a fresh seed from the OS). Exposed so that
    faster implementations can be checked against this one on the same orderings."""
    _check_samples(samples, "sv_samples")
    return Orderings(seed).draw(num_units, samples)


def _check_samples(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def marginals_from_values(values: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """``phi [P, N, units]`` from the values ``[P, units + 1, N]`` of the coalitions along each
    ordering (``values[p, t]``: the first ``t`` units of ``orders[p]`` on)."""
    steps = (values[:, 1:] - values[:, :-1]).transpose(1, 2)  # [P, N, units], by step
    phi = torch.zeros_like(steps)
    index = orders.to(steps.device)[:, None, :].expand_as(steps)
    return phi.scatter_(2, index, steps)


def check_truncation_tolerance(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # NaN fails >= 0
        raise ValueError(f"truncation_tolerance must be a non-negative number or None, got {value!r}")


def reached_full(values: torch.Tensor, full: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Bool, shaped like ``values`` (``[..., N]``): the value is within ``tolerance`` of the
    full coalition's ``full`` (``[N]``)."""
    return (values - full).abs() <= tolerance


def truncate_values(values: torch.Tensor, full: torch.Tensor, tolerance: float | None) -> torch.Tensor:
    """The values ``[P, units + 1, N]`` along each ordering with the ordering truncated, per
    example, at its first coalition whose value is within ``tolerance`` of the full coalition's
    ``full`` (``[N]``): every later coalition takes that coalition's value, so the later units get
    a zero marginal. ``None``: no truncation (``values`` as they are)."""
    if tolerance is None:
        return values
    reached = reached_full(values, full, tolerance)
    reached[:, -1] = True  # the full coalition itself always ends the ordering
    first = reached.to(torch.int8).argmax(1, keepdim=True)  # [P, 1, N]: the first step within tolerance
    step = torch.arange(values.shape[1])[None, :, None]
    held = values.gather(1, first.expand_as(values))
    return torch.where(step > first, held, values)


def prefix_coalitions(orders: torch.Tensor) -> torch.Tensor:
    """Bool ``[P · (units − 1), units]``: for each ordering, the coalitions of its first
    ``1 .. units − 1`` units (the empty and the full coalition are shared by all orderings)."""
    num, units = orders.shape
    rank = torch.empty_like(orders)
    rank.scatter_(1, orders, torch.arange(units).expand(num, units))
    steps = torch.arange(1, units)[None, :, None]
    return (rank[:, None, :] < steps).reshape(num * (units - 1), units)


#: How many examples of the first batch the fast algorithm checks against whole-model evaluation.
CHECKED_EXAMPLES = 8


def batch_rows(batch: Batch, count: int) -> Batch:
    """The first ``count`` examples of ``batch`` (tensors with the batch on dim 0 are sliced,
    in tuples, lists and dicts too; anything else is kept)."""
    if count >= batch.size:
        return batch
    rows = slice(0, count)
    return Batch(
        args=repeat_rows(batch.args, rows, 1, batch.size),
        kwargs=repeat_rows(batch.kwargs, rows, 1, batch.size),
        target=repeat_rows(batch.target, rows, 1, batch.size),
        size=count,
    )


#: States of at most this many elements are walked side by side, several orderings per step (an
#: add of fewer elements costs about as much as its dispatch on the CPU); larger ones one by one.
SIDE_BY_SIDE_ELEMENTS = 8192


def walk_side_by_side(
    states: torch.Tensor, orders: torch.Tensor, contributions: torch.Tensor, empty: torch.Tensor
) -> None:
    """Fill ``states`` (contiguous, ``[P · units, *empty.shape]``) with the walk's states along the
    orderings ``orders`` (``[P, units]``): ``states[p · units + t]`` is ``empty`` plus the
    contributions of the first ``t + 1`` units of ordering ``p``. The contributions are gathered
    in order first, then each step adds the state before it in place, for every ordering at once:
    the same float additions as a walk one state at a time (addition commutes exactly), with one
    add per step instead of one per step and ordering."""
    num, units = orders.shape
    torch.index_select(contributions, 0, orders.reshape(-1), out=states)
    steps = states.view(num, units, *empty.shape).unbind(1)
    steps[0].add_(empty)
    for t in range(1, units):
        steps[t].add_(steps[t - 1])


class FastEvaluator:
    """Values ``−ℓ`` of coalitions for one run: a :class:`Suffix` (and its incremental form when
    the graph allows it), built on the first batch and checked there against whole-model
    evaluation. ``path`` says what is used: ``"incremental"``, ``"suffix"`` or ``"reference"``."""

    def __init__(self, runner: Runner, options: dict[str, Any], metric: str) -> None:
        self.runner = runner
        self.metric = metric
        self.budget = options["max_batch_elements"]
        self.allow_incremental = options["incremental"]
        self.path: str | None = None
        self.reason: str | None = None
        self.suffix: Suffix | None = None
        self.walk: Incremental | None = None
        #: no batch has been evaluated yet (the first one builds the walk and is checked)
        self.first = True

    def build(self) -> bool:
        """Build the suffix (once); False when the reference is used (the reason logged)."""
        if self.path == "reference":
            return False
        if self.suffix is not None:
            return True
        runner = self.runner
        try:
            if runner.graph is None:
                raise SuffixUnavailable("no traced graph")
            if batch_statistics_modules(runner.graph.model):
                # stacking coalitions along the batch would change the statistics of the batch
                raise SuffixUnavailable("a BatchNorm normalises with the statistics of each batch")
            self.suffix = Suffix(runner.graph, runner.read_points, runner.criterion, self.budget)
        except SuffixUnavailable as error:
            self._fallback(str(error))
            return False
        return True

    def prefix_nodes(self) -> list[fx.Node]:
        """The nodes the prefix environment holds (after :meth:`build`)."""
        assert self.suffix is not None
        return self.suffix.prefix_nodes + (self.walk.prefix_nodes if self.walk is not None else [])

    def setup(self, batch: Batch, known: dict[fx.Node, Any] | None = None) -> dict[fx.Node, Any] | None:
        """Build on the first batch; returns the prefix environment (None: use the reference).
        ``known``: a prefix environment of the same batch whose values are reused."""
        runner = self.runner
        if not self.build():
            return None
        assert self.suffix is not None
        try:
            env = self.suffix.prefix(batch, known=known)
        except SuffixUnavailable as error:
            self._fallback(str(error))
            return None
        if self.allow_incremental:
            try:
                self.walk = self.suffix.incremental(env, batch)
            except SuffixUnavailable as error:
                logger.debug("%s %s: no incremental walk (%s)", self.metric, runner.label, error)
        self.path = "incremental" if self.walk is not None else "suffix"
        logger.debug("%s %s: %s evaluation", self.metric, runner.label, self.path)
        return self.prefix(batch, env)

    def environment(self, batch: Batch, known: dict[fx.Node, Any] | None = None) -> dict[fx.Node, Any] | None:
        """The prefix environment of ``batch`` (built and set up on the first batch), reusing
        ``known``; None when the reference is used."""
        if self.path == "reference":
            return None
        return self.setup(batch, known) if self.first else self.prefix(batch, known)

    def _fallback(self, reason: str) -> None:
        self.path, self.reason = "reference", reason
        logger.info("%s %s: evaluating whole model per coalition (%s)", self.metric, self.runner.label, reason)

    def prefix(self, batch: Batch, known: dict[fx.Node, Any] | None = None) -> dict[fx.Node, Any]:
        """The prefix environment of ``batch`` (reusing ``known``, a prefix of the same batch)."""
        assert self.suffix is not None
        extra = self.walk.prefix_nodes if self.walk is not None else ()
        return self.suffix.prefix(batch, extra, known)

    def check(self, batch: Batch, empty: torch.Tensor, full: torch.Tensor) -> bool:
        """Compare the losses ``[N]`` of the empty and full coalitions with whole-model ones, on
        the first :data:`CHECKED_EXAMPLES` examples of the batch (a whole-model forward of a few
        examples per coalition keeps the check cheap next to the run)."""
        units = self.runner.num_units
        count = min(batch.size, CHECKED_EXAMPLES)
        few = batch_rows(batch, count)
        for keep, got in ((torch.zeros(units, dtype=torch.bool), empty), (torch.ones(units, dtype=torch.bool), full)):
            if few is batch:  # the whole batch: errors of the model or the criterion are the caller's
                expected = self.runner.losses(few, keep).cpu()
            else:
                try:
                    expected = self.runner.losses(few, keep).cpu()
                except Exception as error:  # the whole model does not run on fewer examples
                    self.refuse(f"the whole model could not be checked on {count} examples ({error})")
                    return False
            got = got[:count].cpu()
            if not torch.allclose(got, expected, rtol=1e-3, atol=1e-5 * (1 + float(expected.abs().max()))):
                self.refuse(
                    "evaluating the part of the model after the evaluation point gave other "
                    "losses than running the whole model"
                )
                return False
        return True

    def refuse(self, why: str) -> None:
        warnings.warn(
            f"{self.metric} {self.runner.label}: {why} (the model may depend on the batch size in a way "
            "the traced graph does not show); using whole-model evaluation (algorithm='reference')",
            RuntimeWarning,
            stacklevel=2,
        )
        self._fallback(why)

    # ---------------------------------------------------------------- coalition values
    def ordering_values(
        self,
        env: dict[fx.Node, Any],
        batch: Batch,
        orders: torch.Tensor,
        progress: Callable[[int], None] = lambda done: None,
        truncation: float | None = None,
    ) -> torch.Tensor:
        """Values ``[P, units + 1, N]`` (float64) of the coalitions along each ordering;
        ``progress(k)`` is told when the first ``k`` orderings are done. With ``truncation``,
        the incremental walk skips the rest of an ordering once every example has reached the
        full coalition's value (the skipped values are left to :func:`truncate_values`)."""
        if self.walk is not None:
            return self._walk_values(env, batch, orders, progress, truncation)
        assert self.suffix is not None
        num, units = orders.shape
        keeps = torch.cat(
            [torch.zeros(1, units, dtype=torch.bool), torch.ones(1, units, dtype=torch.bool), prefix_coalitions(orders)]
        )
        rows_done = lambda rows: progress(num if units < 2 else min(num, max(0, rows - 2) // (units - 1)))
        values = -self.suffix.coalition_losses(env, batch, keeps, rows_done).cpu()  # [rows, N]
        out = torch.empty(num, units + 1, batch.size, dtype=torch.float64)
        out[:, 0], out[:, units] = values[0], values[1]
        out[:, 1:units] = values[2:].reshape(num, units - 1, batch.size)
        return out

    def _walk_values(
        self,
        env: dict[fx.Node, Any],
        batch: Batch,
        orders: torch.Tensor,
        progress: Callable[[int], None],
        truncation: float | None,
    ) -> torch.Tensor:
        walk = self.walk
        assert walk is not None and self.suffix is not None
        num, units = orders.shape
        out = torch.empty(num, units + 1, batch.size, dtype=torch.float64)
        chunk = max(1, min(batch.size, self.budget // max(1, walk.elements_per_example())))
        storage: torch.Tensor | None = None  # the walk's states, one allocation for every chunk
        for start in range(0, batch.size, chunk):
            rows = slice(start, min(batch.size, start + chunk))
            n = rows.stop - rows.start
            empty, contributions = walk.contributions(env, rows)
            out[:, 0, rows] = -walk.rest_losses(env, batch, rows, empty).cpu()[0]
            full: torch.Tensor | None = None
            if truncation is not None:  # the full coalition first, to know when an ordering is done
                every = torch.add(empty, contributions.sum(0, dtype=torch.float64).to(empty.dtype))
                full = -walk.rest_losses(env, batch, rows, every).cpu()[0]

            def finished(p: int, t: int) -> bool:
                """Every example of ``rows`` reached the full value by step ``t`` of ordering ``p``
                (only steps already evaluated are looked at)."""
                if full is None or truncation is None or t == 0:  # full is known only with a truncation
                    return False
                return bool(reached_full(out[p, 1 : t + 1, rows], full, truncation).any(0).all())

            per_call = min(self.suffix.coalitions_per_call(walk.program, n), num * units)
            # the walk's states, written in place: each adds the next unit's contribution to the
            # state before it (in the model's dtype, like the layer itself)
            if storage is None or storage.numel() < per_call * empty.numel():
                storage = torch.empty(per_call * empty.numel(), dtype=empty.dtype, device=empty.device)
            buffer = state_buffer(per_call, empty, storage)
            pending: list[tuple[int, int, int]] = []  # (ordering, first step, steps) in the buffer
            filled = 0

            def flush() -> None:
                # the buffer's states are not read again (a state an ordering goes on from is copied)
                stacked = buffer[:filled].reshape(-1, *empty.shape[1:])
                losses = walk.rest_losses(env, batch, rows, stacked, scratch=True).cpu()
                offset = 0
                for p, t0, k in pending:
                    out[p, t0 + 1 : t0 + 1 + k, rows] = -losses[offset : offset + k]
                    offset += k
                last, t_last, k_last = pending[-1]
                if rows.stop == batch.size:
                    progress(last + 1 if t_last + k_last == units else last)
                pending.clear()

            # one view per state slot and per unit's contribution, taken once (when first walked
            # one state at a time), not per step
            slots: tuple[torch.Tensor, ...] = ()
            parts: tuple[torch.Tensor, ...] = ()
            side_by_side = (
                empty.numel() <= SIDE_BY_SIDE_ELEMENTS
                and buffer.is_contiguous()
                and contributions.is_contiguous()
                and contributions.dtype == empty.dtype
            )
            p, t0, state = 0, 0, empty
            while units and p < num:
                if pending == [] and finished(p, t0):  # the steps so far are evaluated: skip the rest
                    out[p, t0 + 1 :, rows] = out[p, t0, rows]
                    p, t0, state = p + 1, 0, empty
                    continue
                count = min((per_call - filled) // units, num - p) if t0 == 0 and side_by_side else 0
                if count:  # whole orderings, walked side by side
                    walk_side_by_side(
                        buffer[filled : filled + count * units], orders[p : p + count], contributions, empty
                    )
                    pending += [(q, 0, units) for q in range(p, p + count)]
                    filled += count * units
                    p += count
                else:
                    if not slots:
                        slots, parts = buffer.unbind(0), contributions.unbind(0)
                    k = min(per_call - filled, units - t0)
                    for j, unit in enumerate(orders[p, t0 : t0 + k].tolist()):
                        state = torch.add(state, parts[unit], out=slots[filled + j])
                    pending.append((p, t0, k))
                    filled += k
                    t0 += k
                    if t0 == units:
                        p, t0, state = p + 1, 0, empty
                if filled == per_call:
                    if t0:  # an ordering goes on in the next call: its state must outlive the buffer
                        state = state.clone()
                    flush()
                    filled = 0
            if pending:
                flush()
            if full is not None:  # one full value for every ordering, as in the reference
                out[:, units, rows] = full
        return out

    def single_values(self, env: dict[fx.Node, Any], batch: Batch, keeps: torch.Tensor) -> torch.Tensor:
        """Values ``[K, N]`` of arbitrary coalitions ``keeps`` (bool ``[K, units]``)."""
        if self.walk is None:
            assert self.suffix is not None
            return -self.suffix.coalition_losses(env, batch, keeps).cpu()
        walk, suffix = self.walk, self.suffix
        assert suffix is not None  # the walk is built on the suffix
        out = torch.empty(keeps.shape[0], batch.size, dtype=torch.float64)
        chunk = max(1, min(batch.size, self.budget // max(1, walk.elements_per_example())))
        for start in range(0, batch.size, chunk):
            rows = slice(start, min(batch.size, start + chunk))
            n = rows.stop - rows.start
            empty, contributions = walk.contributions(env, rows)
            per_call = suffix.coalitions_per_call(walk.program, n)
            weights = keeps.to(contributions.device, torch.float64)
            flat = contributions.to(torch.float64).reshape(contributions.shape[0], -1)
            for k0 in range(0, keeps.shape[0], per_call):
                chosen = weights[k0 : k0 + per_call]
                block = empty.to(torch.float64)[None] + (chosen @ flat).reshape(chosen.shape[0], *empty.shape)
                stacked = block.to(empty.dtype).reshape(-1, *empty.shape[1:])
                out[k0 : k0 + chosen.shape[0], rows] = -walk.rest_losses(env, batch, rows, stacked).cpu()
        return out


def shared_prefix(evaluators: list[FastEvaluator], batch: Batch) -> dict[fx.Node, Any] | None:
    """One evaluation, on ``batch``, of every node that the prefix of any of ``evaluators`` (all
    on one traced graph) needs: the environment each of them then reads its prefix from
    (``known=``), so that the model's prefix runs once per batch for all of them. None when no
    evaluator uses the fast algorithm (or the graph cannot be evaluated; each evaluator then meets
    the same problem on its own, as it would alone)."""
    live = [evaluator for evaluator in evaluators if evaluator.build()]
    if not live:
        return None
    first = live[0].suffix
    assert first is not None
    nodes = {node: None for evaluator in live for node in evaluator.prefix_nodes()}  # ordered, unique
    try:
        return first.prefix(batch, extra=list(nodes))
    except SuffixUnavailable:
        return None


class PrefixSharingMetric(AttributionMetric):
    """A masked-evaluation metric built on :class:`FastEvaluator` (Shapley, leave-one-out): its
    state is kept per runner, so ``run_all`` draws each batch once and evaluates, once per batch,
    the prefix that every target's evaluator needs (:func:`shared_prefix`).

    After ``run_all``, ``last_paths`` says how each target's coalitions were evaluated. A
    subclass sets ``shares_batches = True`` next to its ``score_batch``."""

    #: After ``run_all``: ``{key: "incremental" | "suffix" | "reference"}`` per target.
    last_paths: dict[str, str | None] = {}
    _prefix_batch: Batch | None = None
    _prefix_env: dict[fx.Node, Any] | None = None

    def evaluator(self, runner: Runner) -> FastEvaluator | None:
        """The fast evaluator of ``runner`` (None with the reference algorithm)."""
        raise NotImplementedError

    def path(self, runner: Runner) -> str | None:
        """How ``runner``'s coalitions were evaluated so far."""
        raise NotImplementedError

    def start_batch(self, runners: list[tuple[Runner, dict[str, Any]]], batch: Batch) -> None:
        evaluators = [e for runner, _ in runners if (e := self.evaluator(runner)) is not None]
        self._prefix_batch, self._prefix_env = batch, shared_prefix(evaluators, batch)

    def end_batch(self) -> None:
        self._prefix_batch = self._prefix_env = None

    def known_prefix(self, batch: Batch) -> dict[fx.Node, Any] | None:
        """The shared prefix environment of ``batch`` (``run_all``), else None."""
        return self._prefix_env if self._prefix_batch is batch else None

    def run_all(
        self,
        targets: Iterable[Target] | None = None,
        find_best_evaluation_module: bool = False,
        **kwargs: Any,
    ) -> dict[str, np.ndarray]:
        self.last_paths = {}
        return super().run_all(targets, find_best_evaluation_module, **kwargs)

    def _score_batchwise(
        self,
        model: nn.Module,
        graph: ModelGraph,
        runners: dict[str, Runner],
        batches: Iterable[Batch],
        options_of: dict[str, dict[str, Any]],
    ) -> dict[str, np.ndarray]:
        try:
            return super()._score_batchwise(model, graph, runners, batches, options_of)
        finally:
            self.last_paths = {**self.last_paths, **{key: self.path(runner) for key, runner in runners.items()}}


class _Target:
    """What a Shapley run keeps for one scored target: its stream of orderings and its sample
    statistics over every round, and the current round's orderings and fast evaluator."""

    def __init__(self, reduction: Reduction, options: dict[str, Any]) -> None:
        self.orderings: Orderings | None = None
        self.stats = _SampleStats(reduction, bool(options["antithetic"]))
        self.round: int = options["sv_samples"]
        self.permutations: list[torch.Tensor] = []
        self.fast: FastEvaluator | None = None
        self.path: str | None = None

    def converged(self, options: dict[str, Any]) -> bool:
        """Adaptive mode is done with this target (always, without a ``tolerance``)."""
        tolerance = options["tolerance"]
        # max_samples counts orderings (an antithetic pair is one sample but two orderings)
        if tolerance is None or self.stats.orderings >= options["max_samples"]:
            return True
        stderr = self.stats.stderr()
        estimate = self.stats.mean()
        spread = float(np.nanmax(estimate) - np.nanmin(estimate)) if estimate.size else 0.0
        return bool(np.all(np.isfinite(stderr)) and float(stderr.max(initial=0.0)) <= tolerance * spread)

    def next_round(self, options: dict[str, Any]) -> None:
        self.round = min(options["sv_samples"], options["max_samples"] - self.stats.orderings)
        self.stats.start_round()


class ShapleyAttributionMetric(PrefixSharingMetric):
    """Shapley value of unit c in the game ``v(S) = −ℓₙ(only the units in S active)``.

    Units outside S are zeroed at the evaluation point. Estimated by permutation sampling: for each
    of ``sv_samples`` random orderings of the units, units are switched on one at a time and each
    gets its marginal ``v(S ∪ {c}) − v(S)``; the estimate is the mean over orderings. Per ordering
    the marginals telescope, so one sample's scores sum to ``ℓ(no unit) − ℓ(all units)`` for each
    example. The same orderings are used for every batch, and payoffs are per example so every
    ``reduction`` applies.

    For a coupled group (``run(group)``) the players are the group units and a coalition zeroes
    the units outside it at every tensor the group's consumers read, which is exactly pruning them:
    the loss of the coalition "all but c" is the loss after ``Pruner.prune_model`` removes c.

    Options:
        sv_samples (int): number of sampled orderings, default 5 (per round in adaptive mode).
        seed (int | None): seed of the private generator that draws the orderings; ``None``
            (default) draws a fresh seed from the OS on every ``run``. Both algorithms draw the
            same orderings from the same seed.
        algorithm (str): ``"fast"`` (default) or ``"reference"`` (see the module docstring).
        antithetic (bool): each ordering is followed by its reverse (``sv_samples`` rounded up to
            even); the pair is one sample for the standard error. Default False.
        max_batch_elements (int): memory budget of the fast algorithm: the largest stacked
            activation holds at most this many elements (default ``2**21``).
        incremental (bool): let the fast algorithm walk orderings through the first linear layer
            when the graph allows it (default True; False always evaluates the whole suffix).
        tolerance (float | None): adaptive mode: draw rounds of ``sv_samples`` orderings until the
            largest standard error is below ``tolerance`` times the range of the scores (each
            round is one pass over the data). Default None (one round).
        max_samples (int): adaptive mode stops after this many orderings (default 1000).
        truncation_tolerance (float | None): truncate each ordering, per example, at the first
            coalition whose loss is within this absolute tolerance of the full model's loss
            (``|ℓₙ(S) − ℓₙ(all units)| ≤ truncation_tolerance``): the units after it in that
            ordering get a zero marginal, and their coalitions are not evaluated where the
            algorithm can skip them (the reference algorithm, and the incremental walk once a
            stacked evaluation ends inside the ordering, when every example of the batch is
            truncated). Default None: no truncation. **This biases the estimate**: an ordering
            sums to ``ℓₙ(∅) − ℓₙ(S_truncated)`` instead of ``ℓₙ(∅) − ℓₙ(all units)`` (off by at
            most the tolerance), and units that would have moved the loss away from and back
            to the full model's (e.g. a harmful unit followed by a helpful one) get zero instead of
            their marginals. It is exact only when no coalition after the truncation point
            changes the loss (a loss that saturates). Both algorithms truncate the same way.

    ``run(..., return_stderr=True)`` returns ``(scores, stderr)``: the standard error of each
    estimate over the sampled orderings (of pairs with ``antithetic=True``), shaped like the
    scores (NaN with a single sample); not defined for a callable ``reduction``.
    """

    name: ClassVar[str] = "Shapley"
    shares_batches: ClassVar[bool] = True
    default_options: ClassVar[dict[str, Any]] = {
        "sv_samples": 5,
        "seed": None,
        "algorithm": "fast",
        "antithetic": False,
        "max_batch_elements": DEFAULT_MAX_BATCH_ELEMENTS,
        "incremental": True,
        "tolerance": None,
        "max_samples": 1000,
        "truncation_tolerance": None,
    }

    #: After a run: ``"incremental"``, ``"suffix"`` or ``"reference"`` (how coalitions were evaluated).
    last_path: str | None = None
    #: After a run: how many orderings were sampled.
    last_samples: int = 0
    _single: _Target | None = None
    _targets: dict[Runner, _Target]
    _stderrs: dict[str, np.ndarray]

    @overload
    def run(
        self,
        module: nn.Module | CallSite | Group,
        find_best_evaluation_module: bool = False,
        *,
        call_index: int = 0,
        return_stderr: Literal[False] = False,
        **kwargs: Any,
    ) -> np.ndarray: ...

    @overload
    def run(
        self,
        module: nn.Module | CallSite | Group,
        find_best_evaluation_module: bool = False,
        *,
        call_index: int = 0,
        return_stderr: Literal[True],
        **kwargs: Any,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    @overload
    def run(
        self,
        module: nn.Module | CallSite | Group,
        find_best_evaluation_module: bool = False,
        *,
        call_index: int = 0,
        return_stderr: bool,
        **kwargs: Any,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...

    def run(
        self,
        module: nn.Module | CallSite | Group,
        find_best_evaluation_module: bool = False,
        *,
        call_index: int = 0,
        return_stderr: bool = False,
        **kwargs: Any,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Score the units of ``module`` (see :meth:`AttributionMetric.run`); with
        ``return_stderr=True`` return ``(scores, stderr)``."""
        options = self._checked(kwargs, return_stderr)
        # the orderings are drawn in prepare(), from the seed the run settled on (rank 0's in a
        # distributed run), and kept over the adaptive rounds of this run
        self._single = _Target(self.reduction, options)
        self._targets = {}
        try:
            with _warnings_for_the_caller():
                return self._rounds(module, find_best_evaluation_module, call_index, return_stderr, options, kwargs)
        finally:
            self._single, self._targets = None, {}

    @overload
    def run_all(
        self,
        targets: Iterable[Target] | None = None,
        find_best_evaluation_module: bool = False,
        *,
        return_stderr: Literal[False] = False,
        **kwargs: Any,
    ) -> dict[str, np.ndarray]: ...

    @overload
    def run_all(
        self,
        targets: Iterable[Target] | None = None,
        find_best_evaluation_module: bool = False,
        *,
        return_stderr: Literal[True],
        **kwargs: Any,
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]: ...

    @overload
    def run_all(
        self,
        targets: Iterable[Target] | None = None,
        find_best_evaluation_module: bool = False,
        *,
        return_stderr: bool,
        **kwargs: Any,
    ) -> dict[str, np.ndarray] | dict[str, tuple[np.ndarray, np.ndarray]]: ...

    def run_all(
        self,
        targets: Iterable[Target] | None = None,
        find_best_evaluation_module: bool = False,
        *,
        return_stderr: bool = False,
        **kwargs: Any,
    ) -> dict[str, np.ndarray] | dict[str, tuple[np.ndarray, np.ndarray]]:
        """Score several layers and groups (see :meth:`AttributionMetric.run_all`): each batch is
        drawn once and every target scored on it with the orderings ``run(target)`` draws (the
        same ``seed`` gives every target the orderings it gets alone), the model's prefix computed
        once per batch for every target the fast algorithm serves. Adaptive mode
        (``tolerance=``) makes one more pass over the data per round for the targets that have not
        converged yet. With ``return_stderr=True`` each value is ``(scores, stderr)``, as
        ``run`` returns it. ``last_paths`` tells each target's path, ``last_path`` and
        ``last_samples`` are the last target's."""
        self._checked(kwargs, return_stderr)
        self._targets, self._stderrs = {}, {}
        try:
            with _warnings_for_the_caller():
                scores = super().run_all(targets, find_best_evaluation_module, **kwargs)
            if return_stderr:
                return {key: (value, self._stderrs[key]) for key, value in scores.items()}
            return scores
        finally:
            self._targets, self._stderrs = {}, {}

    def _checked(self, kwargs: dict[str, Any], return_stderr: bool) -> dict[str, Any]:
        """The run's options; ValueError naming a bad one."""
        options = self.options(kwargs)
        _check_samples(options["sv_samples"], "sv_samples")
        _check_samples(options["max_samples"], "max_samples")
        if options["algorithm"] not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {options['algorithm']!r}")
        budget = options["max_batch_elements"]
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"max_batch_elements must be a positive int, got {budget!r}")
        tolerance = options["tolerance"]
        if tolerance is not None and (not isinstance(tolerance, (int, float)) or not tolerance > 0):
            raise ValueError(f"tolerance must be a positive number or None, got {tolerance!r}")
        check_truncation_tolerance(options["truncation_tolerance"])
        if (return_stderr or tolerance is not None) and callable(self.reduction):
            raise ValueError(
                "the standard error (return_stderr=True, tolerance=) is defined for "
                "reduction 'mean', 'sum' or 'none', not for a callable reduction"
            )
        _, shards = scoring_model(self.model, self.process_group)
        if shards is not None and (return_stderr or tolerance is not None):
            raise ValueError(
                "return_stderr=True and tolerance= are not available in a distributed run yet "
                "(each rank would stop after its own number of orderings); score with a fixed "
                "sv_samples"
            )
        return options

    def _rounds(
        self,
        module: nn.Module | CallSite | Group,
        find_best_evaluation_module: bool,
        call_index: int,
        return_stderr: bool,
        options: dict[str, Any],
        kwargs: dict[str, Any],
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        single = self._single
        assert single is not None
        scores = super().run(module, find_best_evaluation_module, call_index=call_index, **kwargs)
        while not single.converged(options):
            single.next_round(options)
            super().run(module, find_best_evaluation_module, call_index=call_index, **kwargs)
        if options["tolerance"] is not None:
            scores = single.stats.mean()
        self.last_samples = single.stats.orderings
        if return_stderr:
            return scores, single.stats.stderr()
        return scores

    def _score_batchwise(
        self,
        model: nn.Module,
        graph: ModelGraph,
        runners: dict[str, Runner],
        batches: Iterable[Batch],
        options_of: dict[str, dict[str, Any]],
    ) -> dict[str, np.ndarray]:
        """``run_all``'s passes: the first over ``batches``, then one more over the data per
        adaptive round, for the targets that have not converged (each as ``run`` would)."""
        for key, runner in runners.items():
            self._targets[runner] = _Target(self.reduction, options_of[key])
        scores = super()._score_batchwise(model, graph, runners, batches, options_of)
        active = {
            key: runner for key, runner in runners.items() if not self._targets[runner].converged(options_of[key])
        }
        while active:
            for key, runner in active.items():
                self._targets[runner].next_round(options_of[key])
            with contextlib.closing(self._batches(model)) as more:
                super()._score_batchwise(model, graph, active, more, options_of)
            active = {
                key: runner for key, runner in active.items() if not self._targets[runner].converged(options_of[key])
            }
        for key, runner in runners.items():
            target = self._targets[runner]
            if options_of[key]["tolerance"] is not None:
                scores[key] = target.stats.mean()
            self._stderrs[key] = target.stats.stderr()
            self.last_samples = target.stats.orderings
        return scores

    def _target(self, runner: Runner) -> _Target:
        targets: dict[Runner, _Target] = self.__dict__.setdefault("_targets", {})
        target = targets.get(runner)
        if target is None:
            # a new round of run() (its runner is new), or scored without run() (a subclass' loop)
            target = self._single if self._single is not None else _Target(self.reduction, self._prepare_options)
            targets[runner] = target
        return target

    def evaluator(self, runner: Runner) -> FastEvaluator | None:
        return self._target(runner).fast

    def path(self, runner: Runner) -> str | None:
        return self._target(runner).path

    def prepare(self, runner: Runner, options: dict[str, Any]) -> None:
        self._prepare_options = options
        target = self._target(runner)
        if target.orderings is None:
            target.orderings = Orderings(options["seed"], bool(options["antithetic"]))
        target.permutations = target.orderings.draw(runner.num_units, target.round)
        target.fast = FastEvaluator(runner, options, self.name) if options["algorithm"] == "fast" else None
        target.path = self.last_path = "reference" if target.fast is None else None
        runner.description = f"Shapley {runner.label}: 0/{len(target.permutations)} permutations"

    def score_batch(self, runner: Runner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        """The players are the units (of the layer, or of the group: a coalition then zeroes the
        units outside it at every read point of the group together)."""
        target = self._target(runner)
        phi = None
        if target.fast is not None and target.fast.path != "reference":
            phi = self._fast_marginals(runner, target, batch, options)
        if phi is None:
            target.path = "reference"
            phi = self._reference_marginals(runner, target, batch, options["truncation_tolerance"])
        self.last_path = target.path
        target.stats.add(phi)
        return phi.sum(0) / phi.shape[0]

    def _fast_marginals(
        self, runner: Runner, target: _Target, batch: Batch, options: dict[str, Any]
    ) -> torch.Tensor | None:
        fast = target.fast
        assert fast is not None
        first = fast.first
        env = fast.environment(batch, self.known_prefix(batch))
        fast.first = False
        if env is None:
            return None
        orders = torch.stack(target.permutations)
        shown = [-1]

        def progress(done: int) -> None:
            if done != shown[0]:
                shown[0] = done
                runner.set_progress(f"Shapley {runner.label}: {done}/{len(orders)} permutations")

        progress(0)
        truncation = options["truncation_tolerance"]
        if not first:
            values = fast.ordering_values(env, batch, orders, progress, truncation)
        else:
            try:
                values = fast.ordering_values(env, batch, orders, progress, truncation)
            except Exception as error:  # the stacked suffix did not run: a model fx does not fully describe
                fast.refuse(f"evaluating the part of the model after the evaluation point failed ({error})")
                return None
            if not fast.check(batch, -values[0, 0], -values[0, -1]):
                return None
        target.path = fast.path
        values = truncate_values(values, values[0, -1], options["truncation_tolerance"])
        return marginals_from_values(values, orders)

    def _reference_marginals(
        self, runner: Runner, target: _Target, batch: Batch, truncation: float | None
    ) -> torch.Tensor:
        """Every coalition runs the whole model: ``sv_samples · (units + 1)`` forward passes
        (with ``truncation``, one for the full coalition and, per ordering, only until every
        example of the batch is within the tolerance of it)."""
        num_units = runner.num_units
        orders = torch.stack(target.permutations)
        values = torch.empty(len(orders), num_units + 1, batch.size, dtype=torch.float64)
        full = -runner.losses(batch, torch.ones(num_units, dtype=torch.bool)).cpu() if truncation is not None else None
        reached = torch.zeros(batch.size, dtype=torch.bool)
        label = runner.label
        for k, permutation in enumerate(orders):
            runner.set_progress(f"Shapley {label}: {k}/{len(orders)} permutations")
            keep = torch.zeros(num_units, dtype=torch.bool)
            values[k, 0] = -runner.losses(batch, keep).cpu()
            reached.zero_()
            for t, unit in enumerate(permutation.tolist(), start=1):
                if full is not None and truncation is not None:  # full is known only with a truncation
                    reached |= reached_full(values[k, t - 1], full, truncation)
                    if bool(reached.all()):  # the rest of this ordering is truncated for every example
                        values[k, t:] = values[k, t - 1]
                        break
                keep[unit] = True
                values[k, t] = -runner.losses(batch, keep).cpu()
            if full is not None:
                values[k, num_units] = full
        runner.set_progress(f"Shapley {label}: {len(orders)}/{len(orders)} permutations")
        return marginals_from_values(truncate_values(values, values[0, -1], truncation), orders)


@contextlib.contextmanager
def _warnings_for_the_caller() -> Iterator[None]:
    """Warnings that the base class points at the caller of ``AttributionMetric.run`` would point
    at this module's ``run`` override: re-emit them at the caller of ``ShapleyAttributionMetric.run``
    (each once per run, also across the rounds of adaptive mode); others keep their place."""
    here = __file__
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        _reemit(caught, here)


def _reemit(caught: list[warnings.WarningMessage], here: str) -> None:
    seen: set[tuple[type, str]] = set()
    for record in caught:
        key = (record.category, str(record.message))
        if key in seen:
            continue
        seen.add(key)
        if record.filename == here:
            warnings.warn(record.message, record.category, stacklevel=5)
        else:
            warnings.warn_explicit(
                record.message, record.category, record.filename, record.lineno, source=record.source
            )


class _SampleStats:
    """Per-sample statistics for the standard error, over every batch and round of a run.

    A sample is one ordering (an antithetic pair with ``antithetic=True``). For ``"mean"`` and
    ``"sum"`` each sample's total over the examples is kept (``[samples, units]``); for ``"none"``
    each example's sum and sum of squares over the samples."""

    def __init__(self, reduction: Reduction, antithetic: bool) -> None:
        self.reduction = reduction
        self.antithetic = antithetic
        self.rounds: list[np.ndarray] = []
        self.current: np.ndarray | None = None
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []
        self.row = 0
        self.count = 0
        self.samples = 0
        self.orderings = 0
        self._round_samples = 0
        self._round_orderings = 0

    def start_round(self) -> None:
        if self.current is not None:
            self.rounds.append(self.current)
        self.current = None
        self.row = 0
        self.count = 0

    def add(self, phi: torch.Tensor) -> None:
        if self.antithetic and phi.shape[0] % 2 == 0:
            phi = phi.reshape(phi.shape[0] // 2, 2, *phi.shape[1:]).mean(1)
        samples = phi.numpy()  # [S, n, units]
        n = samples.shape[1]
        if self.row == 0:
            self.samples += samples.shape[0]
            self.orderings += samples.shape[0] * (2 if self.antithetic else 1)
        self.count += n
        if self.reduction == "none":
            total, squares = samples.sum(0), (samples**2).sum(0)
            if self.row < len(self.rows):
                old_total, old_squares = self.rows[self.row]
                self.rows[self.row] = (old_total + total, old_squares + squares)
            else:
                self.rows.append((total, squares))
        else:
            per_sample = samples.sum(1)
            self.current = per_sample if self.current is None else self.current + per_sample
        self.row += 1

    def _totals(self) -> np.ndarray:
        parts = self.rounds + ([self.current] if self.current is not None else [])
        totals = np.concatenate(parts, axis=0)
        return totals / self.count if self.reduction == "mean" else totals

    def mean(self) -> np.ndarray:
        if self.reduction == "none":
            return np.concatenate([total for total, _ in self.rows], axis=0) / self.samples
        means: np.ndarray = self._totals().mean(0)
        return means

    def stderr(self) -> np.ndarray:
        s = self.samples
        if self.reduction == "none":
            total = np.concatenate([t for t, _ in self.rows], axis=0)
            squares = np.concatenate([q for _, q in self.rows], axis=0)
            if s < 2:
                return np.full_like(total, np.nan)
            variance = np.maximum(squares - total**2 / s, 0.0) / (s - 1)
            return np.sqrt(variance / s)
        totals = self._totals()
        if s < 2:
            return np.full(totals.shape[1:], np.nan)
        spread: np.ndarray = totals.std(axis=0, ddof=1) / math.sqrt(s)
        return spread
