"""First-order Taylor estimate of the loss change when a unit is removed (Molchanov et al., 2017)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..base import AttributionMetric, Batch, SiteRunner, sum_positions, wide


class TaylorAttributionMetric(AttributionMetric):
    """``|Σ_s −∂ℓₙ/∂z[n, c, s] · z[n, c, s]|`` per example n and unit c.

    ``−g·z`` is the first-order estimate of ``ℓ(z_c = 0) − ℓ(z)``: positive when removing the unit
    would increase the loss.

    Options:
        signed (bool): keep the sign (no absolute value), default ``False``.
    """

    name: ClassVar[str] = "Taylor"
    default_options: ClassVar[dict[str, Any]] = {"signed": False}

    def score_batch(self, runner: SiteRunner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        z, grad = runner.activation_and_gradient(batch)
        scores = sum_positions(-wide(grad) * wide(z), runner.unit_axis)
        return scores if options["signed"] else scores.abs()

    def score_group_batch(self, runner: Any, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        """``|Σ_p Σ_s −g_p·z_p|`` over the group's mask points p, the absolute value of the joint
        sum (``g_p`` the total derivative at p): ``−dℓ/dt`` for scaling the unit by ``1 − t``
        everywhere it is removed, the first-order estimate of ``ℓ(unit pruned) − ℓ``."""
        pairs = runner.activations_and_gradients(batch)
        scores = runner.sum_per_unit([-wide(g) * wide(z) for z, g in pairs])
        return scores if options["signed"] else scores.abs()
