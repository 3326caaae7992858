"""Gradient magnitude of the loss at each unit (Mittal et al., 2018)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..base import AttributionMetric, Batch, SiteRunner, sum_positions


class SensitivityAttributionMetric(AttributionMetric):
    """``Σ_s |∂ℓₙ/∂z[n, c, s]|`` per example n and unit c."""

    name: ClassVar[str] = "Sensitivity"

    def score_batch(self, runner: SiteRunner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        _, grad = runner.activation_and_gradient(batch)
        return sum_positions(grad.abs(), runner.unit_axis)

    def score_group_batch(self, runner: Any, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        """``Σ_p Σ_s |g_p|`` over the group's mask points p (``g_p`` the total derivative at p)."""
        pairs = runner.activations_and_gradients(batch)
        return runner.sum_per_unit([g.abs() for _, g in pairs])
