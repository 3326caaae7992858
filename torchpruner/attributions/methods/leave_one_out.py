"""Leave-one-out scores: the loss increase when one unit alone is removed."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..base import AttributionMetric
from ..data import Batch
from ..runner import Runner
from ..suffix import DEFAULT_MAX_BATCH_ELEMENTS
from .shapley import ALGORITHMS, FastEvaluator


class LeaveOneOutAttributionMetric(AttributionMetric):
    """``ℓₙ(every unit but c) − ℓₙ(every unit)``: how much the loss grows when unit c alone is
    zeroed at the evaluation point (for a group: at every read point, which is pruning it).
    Positive = the unit helps. ``units + 1`` coalitions per batch, evaluated like fast Shapley
    (prefix once, stacked suffix, the incremental form through a first linear layer).

    Options:
        algorithm (str): ``"fast"`` (default) or ``"reference"`` (the whole model per coalition).
        max_batch_elements (int): memory budget of the fast algorithm (see Shapley).
        incremental (bool): allow the incremental form (default True).
    """

    name: ClassVar[str] = "LeaveOneOut"
    default_options: ClassVar[dict[str, Any]] = {
        "algorithm": "fast",
        "max_batch_elements": DEFAULT_MAX_BATCH_ELEMENTS,
        "incremental": True,
    }

    def prepare(self, runner: Runner, options: dict[str, Any]) -> None:
        if options["algorithm"] not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {options['algorithm']!r}")
        budget = options["max_batch_elements"]
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"max_batch_elements must be a positive int, got {budget!r}")
        self._fast = FastEvaluator(runner, options, self.name) if options["algorithm"] == "fast" else None
        self._first = True
        self.last_path = "reference" if self._fast is None else None

    def score_batch(self, runner: Runner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        units = runner.num_units
        # rows: every unit but c (c = 0 .. units-1), then every unit, then none
        keeps = ~torch.eye(units, dtype=torch.bool)
        keeps = torch.cat([keeps, torch.ones(1, units, dtype=torch.bool), torch.zeros(1, units, dtype=torch.bool)])
        values = None
        fast = self._fast
        if fast is not None and fast.path != "reference":
            env = fast.setup(batch) if self._first else fast.prefix(batch)
            if env is not None:
                values = fast.single_values(env, batch, keeps)
                if self._first and not fast.check(batch, -values[units + 1], -values[units]):
                    values = None
                self._first = False
        if values is None:
            self.last_path = "reference"
            values = torch.stack([-runner.losses(batch, keep).cpu() for keep in keeps[: units + 1]])
        else:
            assert fast is not None  # the values came from the fast evaluator
            self.last_path = fast.path
        return (values[units][None, :] - values[:units]).T  # [N, units]: ℓ(all but c) − ℓ(all)
