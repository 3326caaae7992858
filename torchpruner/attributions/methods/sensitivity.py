"""Gradient magnitude of the loss at each unit (Mittal et al., 2018)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..base import AttributionMetric
from ..data import Batch
from ..runner import Runner


class SensitivityAttributionMetric(AttributionMetric):
    """``Σ_s |∂ℓₙ/∂z[n, c, s]|`` per example n and unit c; for a coupled group ``Σ_e Σ_s |g_e|``
    over the group's entry points e (``g_e`` the total derivative at e)."""

    name: ClassVar[str] = "Sensitivity"
    shares_pass: ClassVar[bool] = True

    def score_batch(self, runner: Runner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        return runner.sum_per_unit((point, g.abs()) for point, _, g in runner.activations_and_gradients(batch))
