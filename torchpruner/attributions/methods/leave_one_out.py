"""Leave-one-out scores: the loss increase when one unit alone is removed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from torchpruner.graph import ModelGraph

from ..data import Batch
from ..runner import Runner
from ..suffix import DEFAULT_MAX_BATCH_ELEMENTS
from .shapley import ALGORITHMS, FastEvaluator, PrefixSharingMetric


class LeaveOneOutAttributionMetric(PrefixSharingMetric):
    """``ℓₙ(every unit but c) − ℓₙ(every unit)``: how much the loss grows when unit c alone is
    zeroed at the evaluation point (for a group: at every read point, which is pruning it).
    Positive = the unit helps. ``units + 1`` coalitions per batch, evaluated like fast Shapley
    (prefix once, stacked suffix, the incremental form through a first linear layer).

    ``run_all(targets)`` draws each batch once and computes the model's prefix once per batch for
    every target (see :class:`~torchpruner.attributions.methods.shapley.PrefixSharingMetric`).

    Options:
        algorithm (str): ``"fast"`` (default) or ``"reference"`` (the whole model per coalition).
        max_batch_elements (int): memory budget of the fast algorithm (see Shapley).
        incremental (bool): allow the incremental form (default True).
    """

    name: ClassVar[str] = "LeaveOneOut"
    shares_batches: ClassVar[bool] = True
    default_options: ClassVar[dict[str, Any]] = {
        "algorithm": "fast",
        "max_batch_elements": DEFAULT_MAX_BATCH_ELEMENTS,
        "incremental": True,
    }

    def _state(self) -> dict[Runner, tuple[FastEvaluator | None, list[str | None]]]:
        """Per runner: its fast evaluator and (in a list, to update) the path used so far."""
        state: dict[Runner, tuple[FastEvaluator | None, list[str | None]]] = self.__dict__.setdefault("_runners", {})
        return state

    def evaluator(self, runner: Runner) -> FastEvaluator | None:
        return self._state()[runner][0]

    def path(self, runner: Runner) -> str | None:
        return self._state()[runner][1][0]

    def _score(
        self, graph: ModelGraph, runner: Runner, batches: Iterable[Batch], options: dict[str, Any]
    ) -> np.ndarray:
        try:
            return super()._score(graph, runner, batches, options)
        finally:
            self._state().clear()  # nothing of a run outlives it

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
            self._state().clear()

    def prepare(self, runner: Runner, options: dict[str, Any]) -> None:
        if options["algorithm"] not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {options['algorithm']!r}")
        budget = options["max_batch_elements"]
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"max_batch_elements must be a positive int, got {budget!r}")
        fast = FastEvaluator(runner, options, self.name) if options["algorithm"] == "fast" else None
        self._state()[runner] = (fast, ["reference" if fast is None else None])
        self.last_path = "reference" if fast is None else None

    def score_batch(self, runner: Runner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        units = runner.num_units
        # rows: every unit but c (c = 0 .. units-1), then every unit, then none
        keeps = ~torch.eye(units, dtype=torch.bool)
        keeps = torch.cat([keeps, torch.ones(1, units, dtype=torch.bool), torch.zeros(1, units, dtype=torch.bool)])
        values = None
        fast, path = self._state()[runner]
        if fast is not None and fast.path != "reference":
            first = fast.first
            env = fast.environment(batch, self.known_prefix(batch))
            fast.first = False
            if env is not None:
                values = fast.single_values(env, batch, keeps)
                if first and not fast.check(batch, -values[units + 1], -values[units]):
                    values = None
        if values is None:
            path[0] = "reference"
            values = torch.stack([-runner.losses(batch, keep).cpu() for keep in keeps[: units + 1]])
        else:
            assert fast is not None  # the values came from the fast evaluator
            path[0] = fast.path
        self.last_path = path[0]
        return (values[units][None, :] - values[:units]).T  # [N, units]: ℓ(all but c) − ℓ(all)
